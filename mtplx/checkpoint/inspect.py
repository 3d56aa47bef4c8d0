"""`inspect_checkpoint(path)`: what is this checkpoint, can it run, is its MTP head complete.

Reads config.json and safetensors headers only (plus the few-KB norm vectors used for the
norm-convention statistics); never loads weights.

Verdicts and the exit codes of `mtplx inspect` (stable, documented):
    0  runnable-with-mtp         backbone and MTP head pass the tensor gate
    0  head-valid                the folder is an MTP head alone (MLX sidecar) and it passes
    3  runnable-without-mtp      backbone passes, no MTP head anywhere
    4  head-invalid              a head is present but fails the gate (reason_code says why:
                                 missing-tensors | wrong-shape | extra-tensors | hidden-size-mismatch)
    5  unsupported-architecture  config.json names a model_type mtplx does not run
    6  unreadable                missing/garbage config, truncated or garbage safetensors, missing shard
    7  backbone-invalid          the trunk itself does not match its config
    (2 is argparse's usage error, 1 an unexpected internal error.)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import FULL_ATTENTION, MTP_SIDECAR_MODEL_TYPE, ModelConfig, QuantizationConfig, load_config
from .errors import CheckpointError, UnsupportedArchitecture
from .gate import GateResult, GroupGate, run_gate
from .norms import NormReport, detect_norm_convention
from .store import HEAD_MLX_SIDECAR, TensorStore, open_store

VERDICT_OK = "runnable-with-mtp"
VERDICT_HEAD_VALID = "head-valid"
VERDICT_NO_HEAD = "runnable-without-mtp"
VERDICT_HEAD_INVALID = "head-invalid"
VERDICT_UNSUPPORTED = "unsupported-architecture"
VERDICT_UNREADABLE = "unreadable"
VERDICT_BACKBONE_INVALID = "backbone-invalid"

EXIT_CODES = {
    VERDICT_OK: 0,
    VERDICT_HEAD_VALID: 0,
    VERDICT_NO_HEAD: 3,
    VERDICT_HEAD_INVALID: 4,
    VERDICT_UNSUPPORTED: 5,
    VERDICT_UNREADABLE: 6,
    VERDICT_BACKBONE_INVALID: 7,
}
REJECTING_VERDICTS = (VERDICT_HEAD_INVALID, VERDICT_UNSUPPORTED, VERDICT_UNREADABLE, VERDICT_BACKBONE_INVALID,
                      VERDICT_HEAD_VALID)
JSON_SCHEMA_VERSION = 1
_LIST_LIMIT = 50  # names listed per category in --json (counts are always complete)


@dataclass
class InspectReport:
    path: Path
    verdict: str
    reason: str = ""
    reason_code: str = ""
    config: ModelConfig | None = None
    store: TensorStore | None = None
    gate: GateResult | None = None
    norms: dict[str, NormReport] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    head_only: bool = False
    elapsed_s: float = 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    @property
    def head_present(self) -> bool:
        return self.store is not None and self.store.head is not None

    def model_summary(self) -> dict | None:
        c = self.config
        if c is None:
            return None
        n_full = sum(1 for t in c.layer_types if t == FULL_ATTENTION)
        return {
            "model_type": c.model_type, "family": c.family, "moe": c.is_moe,
            "hidden_size": c.hidden_size, "layers": c.num_hidden_layers,
            "full_attention_layers": n_full, "linear_attention_layers": c.num_hidden_layers - n_full,
            "attention_heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "head_dim": c.head_dim,
            "experts": c.num_experts, "experts_per_token": c.num_experts_per_tok,
            "moe_intermediate_size": c.moe_intermediate_size, "intermediate_size": c.intermediate_size,
            "vocab_size": c.vocab_size, "tied_embeddings": c.tie_word_embeddings,
            "mtp_layers_declared": c.num_mtp_layers,
        }

    def to_dict(self) -> dict:
        st = self.store
        head = None
        if self.gate is not None and "mtp" in self.gate.groups and self.head_present:
            g = self.gate.groups["mtp"]
            head = {**st.head.to_dict(), "layout": g.format.experts, "quantized": g.format.quantized,
                    "layers": g.format.n_mtp_layers}
        q = self.config.quantization if self.config else None
        return {
            "schema_version": JSON_SCHEMA_VERSION,
            "path": str(self.path),
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "reason_code": self.reason_code,
            "head_only": self.head_only,
            "model": self.model_summary(),
            "quantization": None if q is None else {"bits": q.bits, "group_size": q.group_size, "mode": q.mode,
                                                    "overrides": len(q.overrides)},
            "tensors": None if st is None else {"count": len(st), "bytes": st.total_bytes(),
                                                "files": [str(f) for f in st.files]},
            "mtp_head": head,
            "gate": None if self.gate is None else {
                **{k: g.to_dict(_LIST_LIMIT) for k, g in self.gate.groups.items()},
                "ignored_count": len(self.gate.ignored)},
            "norms": {k: r.to_dict() for k, r in self.norms.items()},
            "warnings": list(self.warnings),
            "elapsed_s": round(self.elapsed_s, 4),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def _head_reason(g: GroupGate, cfg: ModelConfig) -> tuple[str, str]:
    fc = next((w for w in g.wrong_shape if w[0].endswith("fc.weight")), None)
    if fc is not None and len(fc[2]) == 2 and fc[2][1] == 2 * fc[2][0]:
        h = fc[2][0]
        return ("hidden-size-mismatch",
                f"MTP head was built for hidden size {h}, the trunk has {cfg.hidden_size} "
                f"({fc[0]} is {list(fc[2])}, expected {list(fc[1])}); use the head made for this model")
    if g.missing:
        return ("missing-tensors", f"MTP head incomplete: {len(g.missing)} of {g.expected} expected tensors "
                                   f"missing ({g.format.describe()} layout), first: {g.missing[0]}")
    if g.wrong_shape:
        n, e, f = g.wrong_shape[0]
        return ("wrong-shape", f"MTP tensor {n} has shape {list(f)}, expected {list(e)} "
                               f"({len(g.wrong_shape)} wrong-shape tensors)")
    if g.extra:
        return ("extra-tensors", f"unexpected tensor {g.extra[0]} in the MTP head ({len(g.extra)} extra; "
                                 f"expected {g.expected} for a {g.format.n_mtp_layers}-layer {g.format.describe()} head)")
    return "", ""


def _backbone_reason(g: GroupGate) -> tuple[str, str]:
    if g.missing:
        return "missing-tensors", (f"backbone incomplete: {len(g.missing)} of {g.expected} expected tensors missing, "
                                   f"first: {g.missing[0]}")
    if g.wrong_shape:
        n, e, f = g.wrong_shape[0]
        return "wrong-shape", f"backbone tensor {n} has shape {list(f)}, expected {list(e)} from config.json"
    return "extra-tensors", f"unexpected backbone tensor {g.extra[0]} ({len(g.extra)} extra)"


def _read_json(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def inspect_checkpoint(path: str | Path) -> InspectReport:
    """Inspect a checkpoint folder (or an MLX MTP sidecar folder). Never raises CheckpointError:
    failures become the `unreadable` / `unsupported-architecture` verdicts with a reason."""
    t0 = time.perf_counter()
    root = Path(path)
    rep = InspectReport(root, VERDICT_UNREADABLE)
    try:
        _inspect(root, rep)
    except UnsupportedArchitecture as e:
        rep.verdict, rep.reason, rep.reason_code = VERDICT_UNSUPPORTED, str(e), "unsupported-model-type"
    except CheckpointError as e:
        rep.verdict, rep.reason, rep.reason_code = VERDICT_UNREADABLE, str(e), "unreadable"
    rep.elapsed_s = time.perf_counter() - t0
    return rep


def _inspect(root: Path, rep: InspectReport) -> None:
    cfg = load_config(root)  # raises for missing/garbage config and unknown model_type
    rep.config = cfg
    raw = _read_json(root / "config.json") or {}
    store = open_store(root)
    rep.store = store
    shapes = store.shapes()
    rep.head_only = store.head_only or raw.get("model_type") == MTP_SIDECAR_MODEL_TYPE

    head_q: QuantizationConfig | None = None
    strip = ""
    n_layers = cfg.num_mtp_layers
    if store.head is not None and store.head.kind == HEAD_MLX_SIDECAR:
        strip = "mtp."
        hc = store.head.config or {}
        try:
            sidecar_cfg = ModelConfig.from_dict(hc)
            head_q = sidecar_cfg.quantization
            if sidecar_cfg.num_mtp_layers is not None:
                n_layers = sidecar_cfg.num_mtp_layers
        except CheckpointError:
            pass
        if head_q is None:
            q = hc.get("quantization")
            head_q = QuantizationConfig.from_dict(q) if isinstance(q, dict) else None
    has_head_keys = store.head is not None
    if not has_head_keys and n_layers:
        n_layers = None
    if has_head_keys and n_layers is None:
        n_layers = None  # counted from the weights by the layout
    gate = run_gate(shapes, cfg, head_quantization=head_q, head_quant_path_strip=strip,
                    n_mtp_layers=n_layers if has_head_keys else 0, include_backbone=not rep.head_only)
    rep.gate = gate
    if not rep.head_only:
        rep.norms["backbone"] = detect_norm_convention(store, "backbone")
    if has_head_keys:
        rep.norms["mtp"] = detect_norm_convention(store, "mtp")
    for r in rep.norms.values():
        rep.warnings.extend(r.warnings)
    if store.head is not None and store.head.ignored:
        rep.warnings.append(f"other MTP head locations ignored: {', '.join(store.head.ignored)}")
    if gate.ignored:
        rep.warnings.append(f"{len(gate.ignored)} tensors outside the text model ignored (e.g. {gate.ignored[0]})")

    bb = gate.groups.get("backbone")
    if bb is not None and not bb.ok:
        rep.verdict = VERDICT_BACKBONE_INVALID
        rep.reason_code, rep.reason = _backbone_reason(bb)
        return
    mtp = gate.groups["mtp"]
    if not has_head_keys:
        rep.verdict = VERDICT_NO_HEAD
        rep.reason = "no MTP head found (no mtp.* tensors, no sidecar); plain decoding only"
        rep.reason_code = "no-head"
        return
    if not mtp.ok:
        rep.verdict = VERDICT_HEAD_INVALID
        rep.reason_code, rep.reason = _head_reason(mtp, cfg)
        return
    rep.verdict = VERDICT_HEAD_VALID if rep.head_only else VERDICT_OK
    rep.reason = (f"MTP head passes the gate ({mtp.found}/{mtp.expected} tensors)"
                  + ("; graft it onto its base model to run" if rep.head_only else ""))


def render_text(rep: InspectReport) -> str:
    """A short human summary (plain text; the CLI renders it with rich)."""
    d = rep.to_dict()
    lines = [f"{rep.path}"]
    m = d["model"]
    if m:
        kind = f"MoE {m['experts']} experts, top-{m['experts_per_token']}" if m["moe"] else "dense"
        lines.append(f"  model             {m['model_type']} ({m['family']}), {kind}")
        lines.append(f"  layers            {m['layers']} ({m['linear_attention_layers']} GatedDeltaNet + "
                     f"{m['full_attention_layers']} full attention), hidden {m['hidden_size']}, vocab {m['vocab_size']}")
    if d["quantization"]:
        q = d["quantization"]
        lines.append(f"  quantized         MLX affine {q['bits']}-bit, group {q['group_size']}"
                     + (f", {q['overrides']} overrides" if q["overrides"] else ""))
    if d["tensors"]:
        t = d["tensors"]
        lines.append(f"  tensors           {t['count']} in {len(t['files'])} file(s), {t['bytes'] / 2**20:.1f} MiB")
    if d["gate"]:
        for g in ("backbone", "mtp"):
            gg = d["gate"].get(g)
            if gg is None or (g == "mtp" and not rep.head_present):
                continue
            status = "ok" if gg["ok"] else (f"{gg['missing_count']} missing, {gg['extra_count']} extra, "
                                            f"{gg['wrong_shape_count']} wrong shape")
            lines.append(f"  {'gate ' + g:<18}{gg['found']}/{gg['expected']} ({gg['layout']}"
                         f"{', quantized' if gg['quantized'] else ''}): {status}")
            for n in gg["missing"][:3]:
                lines.append(f"         missing {n}")
            for n in gg["extra"][:3]:
                lines.append(f"         extra   {n}")
            for w in gg["wrong_shape"][:3]:
                lines.append(f"         shape   {w['name']} {w['found']} (expected {w['expected']})")
    h = d["mtp_head"]
    if h:
        lines.append(f"  mtp head          {h['kind']} ({Path(h['path']).name}), {h['layers']} layer(s), {h['layout']}")
    elif d["model"]:
        lines.append("  mtp head          none")
    for g, r in d["norms"].items():
        if r["convention"]:
            lines.append(f"  {'norms ' + g:<18}{r['convention']} ({r['source']}: {r['evidence']})")
    for w in d["warnings"]:
        lines.append(f"  warning           {w}")
    lines.append(f"  verdict           {rep.verdict} (exit {rep.exit_code}){': ' + rep.reason if rep.reason else ''}")
    return "\n".join(lines)
