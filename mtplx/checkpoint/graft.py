"""`graft(base, head, out)`: attach an MTP head from elsewhere to a base checkpoint.

    rep = graft("Qwen3.5-122B-A10B-4bit", "mtp-sidecar/", "out/", head_dtype="bf16")
    rep.to_dict()   # what was converted and why (also written to out/mtplx_graft.json)

HEAD is any of: a safetensors file (`mtp.safetensors`, keys with or without `mtp.`), an MLX
MTP sidecar folder (`model_type: qwen3_5_mtp`, keys without `mtp.`, norms `1 + w`, experts
`switch_mlp`, often quantized), or a checkpoint folder whose head is embedded or beside it.

What happens, in order (numpy + safetensors only, nothing is loaded whole):
1. Refusals first: OUT exists (without `force`), BASE unreadable / not a model, HEAD without a
   head, a head for another model (hidden size, attention heads, expert count, MoE vs dense,
   vocabulary, widths): each error says what was expected, what was found and what to do.
2. The head is brought to canonical form (experts stacked, prefixes stripped, MLX-quantized
   modules dequantized when the output is not `keep`), its norm convention decided from the
   declared format AND the weights themselves (see `decide_norm_convention`): a head whose norms
   are stored in the other convention than its format declares is detected and healed.
3. It is written in the base's own layout: `mtp.` prefix, the base's expert storage
   (per-expert, fused 3-D or MLX `switch_mlp`), the base's norm convention, dtype bf16 unless
   asked (`keep`: as the source; `q8` / `q4`: MLX affine, which warns for an MoE head).
   Norm vectors stay fp32 (a `1 + w` vector in bf16 would lose the head's trained offsets).
4. OUT gets the base's weight files as symlinks (hard links where symlinks are not allowed),
   never copies, plus `model.safetensors.index.json` listing the base's text/vision tensors and
   the head file; the base's own head (embedded or sidecar) is left out. Small files (config,
   tokenizer) are copied; config.json gets the MTP layer count and, for quantized heads or
   bases, the per-module quantization entries the tensor gate and loaders read.
5. `mtplx_graft.json` records provenance: the head's source and files, every conversion, the
   norm evidence, the dtype, warnings. Finally `inspect_checkpoint(out)` must pass.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from .canonical import build_plan
from .config import MTP_SIDECAR_MODEL_TYPE, ModelConfig, QuantizationConfig
from .errors import CheckpointError, UnsupportedArchitecture
from .inspect import (VERDICT_BACKBONE_INVALID, VERDICT_OK, VERDICT_UNREADABLE, VERDICT_UNSUPPORTED,
                      inspect_checkpoint)
from .layout import EXPERTS_FUSED, EXPERTS_NONE, EXPERTS_PER_EXPERT, EXPERTS_SWITCH, canonical_shapes
from .names import is_norm, split_key
from .norms import ONE_PLUS_W, ZERO_CENTERED, declared_backbone_convention, detect_norm_convention
from .quant import dequantize as mlx_dequantize
from .quant import quantize as mlx_quantize
from .store import (DTYPES, HEAD_EMBEDDED, HEAD_MLX_SIDECAR, INDEX_NAME, NUMPY_TO_ST, TensorInfo,
                    TensorStore, open_store, read_safetensors_header)

PROVENANCE_NAME = "mtplx_graft.json"
HEAD_FILE_NAME = "mtplx-graft-mtp.safetensors"
HEAD_DTYPES = ("bf16", "keep", "q8", "q4")
NORM_CHOICES = ("auto", ZERO_CENTERED, ONE_PLUS_W)
SMALL_FILE_BYTES = 64 << 20  # non-weight files up to this size are copied, bigger ones linked
_BF16 = np.dtype(ml_dtypes.bfloat16)
# statistics decide against a declared convention only when they are this far from 0.5
DECISIVE_MARGIN = 0.25


class GraftError(CheckpointError):
    """A refusal: `code` is stable (tests, --json), the message says what to do."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# ---- the head source --------------------------------------------------------------------------
@dataclass
class HeadInput:
    kind: str  # "file" | "mlx_sidecar" | "checkpoint:<embedded|sidecar_file|...>"
    path: Path
    tensors: Mapping[str, np.ndarray]  # keys `mtp.<rest>` only
    config: ModelConfig | None
    declared: str | None  # declared norm convention, None when the format does not say
    declared_why: str
    files: list[Path] = field(default_factory=list)


class _InfoMapping(Mapping):
    """Mapping[name -> memmap] over TensorInfos (a subset of a store, or a bare file)."""

    def __init__(self, infos: dict[str, TensorInfo]):
        self.infos = infos

    def __getitem__(self, k):
        return TensorStore.load(self.infos[k])

    def __iter__(self):
        return iter(self.infos)

    def __len__(self):
        return len(self.infos)

    def shapes(self):
        return {k: v.shape for k, v in self.infos.items()}


def _mtp_name(key: str) -> str:
    """A head file key -> `mtp.<rest>` (keys without any prefix get `mtp.`)."""
    s = split_key(key)
    if s and s[0] == "mtp":
        return "mtp." + s[1]
    return "mtp." + key


def load_head(path: str | Path) -> HeadInput:
    """Open a head source lazily (headers only)."""
    path = Path(path)
    if not path.exists():
        raise GraftError("head-unreadable", f"HEAD {path}: no such file or folder")
    if path.is_file():
        hdr = read_safetensors_header(path)
        keys = list(hdr.tensors)
        has_mtp = any((split_key(k) or ("",))[0] == "mtp" for k in keys)
        infos = {}
        for key, (dtype, shape, start, nbytes) in hdr.tensors.items():
            if has_mtp and (split_key(key) or ("",))[0] != "mtp":
                continue  # a checkpoint shard given as HEAD: take its mtp.* tensors only
            name = _mtp_name(key)
            if name in infos:
                raise GraftError("head-unreadable", f"HEAD {path}: tensor {name!r} appears twice")
            infos[name] = TensorInfo(name, key, dtype, shape, path, start, nbytes)
        if not infos:
            raise GraftError("no-head", f"HEAD {path} holds no tensors; pass the mtp.safetensors sidecar, "
                                        "an MLX MTP folder, or a checkpoint with an mtp.* head")
        cfg = None
        sib = path.parent / "config.json"
        if sib.is_file():  # a sidecar next to its model's config: check against that too
            try:
                cfg = ModelConfig.from_dict(json.loads(sib.read_text()))
            except (CheckpointError, UnsupportedArchitecture, OSError, ValueError):
                cfg = None
        declared, why = None, ""
        if str(hdr.metadata.get("format", "")).lower() == "mlx" or not has_mtp:
            declared = ONE_PLUS_W
            why = (f"{path.name} metadata format=mlx" if has_mtp else
                   f"{path.name} keys lack the mtp. prefix (an MLX sidecar's weights)") + ": mlx-lm stores 1 + w"
        return HeadInput("file", path, _InfoMapping(infos), cfg, declared, why, [path])

    store = open_store(path)  # raises CheckpointError with the store's reason
    if store.head is None:
        raise GraftError("no-head", f"HEAD {path} has no MTP head (no mtp.* tensors, no sidecar): "
                                    "nothing to graft; use `mtplx forge` to train one")
    infos = {k: v for k, v in store.infos.items() if (split_key(k) or ("",))[0] == "mtp"}
    cfg = None
    try:  # the head folder's own config (an MLX sidecar's, or the checkpoint's)
        cfg = ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
    except (CheckpointError, UnsupportedArchitecture, OSError, ValueError):
        cfg = None
    rep = detect_norm_convention(store, "mtp")
    declared = rep.convention if rep.source == "declared" else None
    why = rep.evidence.split("; median")[0] if declared else ""
    kind = "mlx_sidecar" if store.head_only else f"checkpoint:{store.head.kind}"
    return HeadInput(kind, path, _InfoMapping(infos), cfg, declared, why, list(store.head.files))


# ---- canonical head ---------------------------------------------------------------------------
@dataclass
class CanonTensor:
    """One canonical head tensor (no data read until `get` / `triple` is called)."""

    name: str  # canonical name (`mtp.fc.weight`, `mtp.layers.0.mlp.experts.gate_proj`, ...)
    shape: tuple[int, ...]  # float: the logical shape; quantized: the packed weight's shape
    dtype: np.dtype  # float: the source dtype; quantized: the scales' dtype
    get: Callable[[], np.ndarray]  # -> float array (dequantized once `resolve` knows bits/group)
    scales_shape: tuple[int, ...] | None = None  # quantized only
    quant: tuple[int, int] | None = None  # (bits, group_size), set by `_resolve`
    triple: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None


_PE = re.compile(r"^(?P<mlp>layers\.\d+\.mlp)\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<part>weight|scales|biases)$")
_SW = re.compile(r"^(?P<mlp>layers\.\d+\.mlp)\.switch_mlp\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<part>weight|scales|biases)$")
_FU = re.compile(r"^(?P<mlp>layers\.\d+\.mlp)\.experts\.(?P<proj>gate_up_proj|down_proj)(?:\.weight)?$")


def _source_shapes(infos: dict[str, TensorInfo]) -> dict[str, dict[str, tuple[tuple[int, ...], np.dtype]]]:
    """canonical module -> {part: (shape, dtype)} from headers only (experts stacked, fused split)."""
    out: dict[str, dict] = {}
    experts: dict[tuple[str, str], int] = {}
    for name, info in infos.items():
        rest = name[len("mtp."):]
        sd = (tuple(info.shape), info.np_dtype)
        m = _PE.match(rest)
        if m:
            mod = f"mtp.{m['mlp']}.experts.{m['proj']}"
            experts[(mod, m["part"])] = experts.get((mod, m["part"]), 0) + 1
            out.setdefault(mod, {})[m["part"]] = sd
            continue
        m = _SW.match(rest)
        if m:
            out.setdefault(f"mtp.{m['mlp']}.experts.{m['proj']}", {})[m["part"]] = sd
            continue
        m = _FU.match(rest)
        if m:
            if m["proj"] == "down_proj":
                out.setdefault(f"mtp.{m['mlp']}.experts.down_proj", {})["weight"] = sd
            else:
                E, two_i, *rest_dims = sd[0]
                for p in ("gate_proj", "up_proj"):
                    out.setdefault(f"mtp.{m['mlp']}.experts.{p}", {})["weight"] = ((E, two_i // 2, *rest_dims), sd[1])
            continue
        for part in ("weight", "scales", "biases"):
            if name.endswith("." + part):
                out.setdefault(name[: -len(part) - 1], {})[part] = sd
                break
        else:
            out.setdefault(name, {})["weight"] = sd
    for (mod, part), n in experts.items():
        shape, dt = out[mod][part]
        out[mod][part] = ((n, *shape), dt)
    return out


def canonical_head(head: HeadInput, base_cfg: ModelConfig) -> tuple[dict[str, CanonTensor], dict[str, np.ndarray]]:
    """(canonical tensors, raw norm vectors as stored, fp32) of the head. Reads only the norms."""
    plan = dict(build_plan(head.tensors, base_cfg, {"backbone": ONE_PLUS_W, "mtp": ONE_PLUS_W}, include_mtp=True))
    src = _source_shapes(head.tensors.infos)
    out: dict[str, CanonTensor] = {}
    norms: dict[str, np.ndarray] = {}
    for mod, parts in src.items():
        expert = _is_expert(mod)
        if "scales" in parts:
            if "biases" not in parts or "weight" not in parts:
                raise GraftError("incomplete-head", f"quantized head module {mod} lacks its "
                                                    f"{'biases' if 'biases' not in parts else 'weight'}")
            logical = mod if expert else mod + ".weight"
            fns = tuple(plan[f"{mod}.{p}"] for p in ("weight", "scales", "biases"))
            out[logical] = CanonTensor(logical, parts["weight"][0], parts["scales"][1], lambda: None,
                                       parts["scales"][0], None,
                                       lambda fns=fns: tuple(np.asarray(f()) for f in fns))
            continue
        logical = mod if expert else (mod if mod.endswith((".A_log", ".dt_bias")) else mod + ".weight")
        if logical not in plan:
            logical = mod
        shape, dt = parts["weight"]
        if is_norm("mtp", logical[len("mtp."):]):
            norms[logical] = np.asarray(plan[logical]()).astype(np.float32)
            continue
        out[logical] = CanonTensor(logical, shape, dt, plan[logical])
    return out, norms


def _is_expert(mod: str) -> bool:
    return ".experts." in mod and mod.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")


def _resolve(ct: CanonTensor, expected: tuple[int, ...] | None) -> None:
    """Quantized tensors: bits and group size from the packed width, the scales' group count and
    the in-dim the base expects (robust to per-module overrides); the logical shape follows."""
    if ct.scales_shape is None or expected is None:
        return
    W, G, K = ct.shape[-1], ct.scales_shape[-1], expected[-1]
    if G == 0 or K % G or (W * 32) % K or tuple(ct.shape[:-1]) != tuple(expected[:-1]):
        raise GraftError("shape-mismatch", f"quantized head module {ct.name}: packed weight {list(ct.shape)} / scales "
                                           f"{list(ct.scales_shape)} do not fit the shape {list(expected)} this base "
                                           "needs; the head was made for another model")
    bits, gs = W * 32 // K, K // G
    ct.quant = (bits, gs)
    ct.shape = tuple(expected)
    ct.get = lambda t=ct.triple, bits=bits, gs=gs: mlx_dequantize(*t(), group_size=gs, bits=bits, dtype=np.float32)


# ---- validation -------------------------------------------------------------------------------
def _n_layers(names) -> int:
    idx = {int(n.split(".")[2]) for n in names if n.startswith("mtp.layers.") and n.split(".")[2].isdigit()}
    return max(idx) + 1 if idx else 0


def validate_head(head: HeadInput, base_cfg: ModelConfig, canon: dict[str, CanonTensor],
                  norms: dict[str, np.ndarray]) -> int:
    """Refuse a head built for another model. Returns the head's MTP layer count."""
    bc, hc = base_cfg, head.config
    if hc is not None and hc.mtp_is_moe != bc.mtp_is_moe:
        raise GraftError("moe-mismatch", f"the head was made for a {'MoE' if hc.is_moe else 'dense'} model, the base is "
                                         f"{'MoE' if bc.is_moe else 'dense'} ({bc.num_experts} experts); use the MTP "
                                         "head made for this base model")
    if hc is not None:
        for attr, code, label in (("hidden_size", "hidden-size-mismatch", "hidden size"),
                                  ("vocab_size", "vocab-mismatch", "vocabulary size"),
                                  ("num_experts", "expert-count-mismatch", "expert count"),
                                  ("num_attention_heads", "attention-mismatch", "attention heads"),
                                  ("num_key_value_heads", "attention-mismatch", "key/value heads"),
                                  ("head_dim", "attention-mismatch", "head_dim")):
            hv, bv = getattr(hc, attr), getattr(bc, attr)
            if hv != bv:
                raise GraftError(code, f"the head was made for a model with {label} {hv}, the base has {bv} "
                                       f"(from {head.path}/config.json and the base's config.json); use the MTP head "
                                       "released with this base model, or train one for it with `mtplx forge`")
    names = set(canon) | set(norms)
    n_layers = _n_layers(names)
    if n_layers == 0:
        raise GraftError("incomplete-head", f"HEAD {head.path} has no mtp.layers.* tensors: not an MTP head")
    exp = {k: v for k, v in canonical_shapes(bc, n_layers).items() if k.startswith("mtp.")}

    def rows(n):  # every dim but the last (packing leaves them alone)
        if n in canon:
            return tuple(canon[n].shape[:-1])
        return None

    H = bc.hidden_size
    fc = canon.get("mtp.fc.weight")
    if fc is not None and fc.shape[0] != H:
        raise GraftError("hidden-size-mismatch",
                         f"the head was made for hidden size {fc.shape[0]} (mtp.fc.weight has {fc.shape[0]} rows), "
                         f"the base has hidden size {H}; use the MTP head made for this base model")
    head_moe = any(".mlp.gate.weight" in n or ".mlp.experts." in n for n in names)
    if head_moe != bc.mtp_is_moe:
        raise GraftError("moe-mismatch", f"the head has a {'MoE' if head_moe else 'dense'} MLP, the base is "
                                         f"{'MoE' if bc.is_moe else 'dense'} and needs a "
                                         f"{'MoE' if bc.mtp_is_moe else 'dense'} head; use the head made for this base")
    for j in range(n_layers):
        r = rows(f"mtp.layers.{j}.mlp.gate.weight")
        if head_moe and r is not None and r[0] != bc.num_experts:
            raise GraftError("expert-count-mismatch",
                             f"the head routes to {r[0]} experts (mtp.layers.{j}.mlp.gate.weight has {r[0]} rows), the "
                             f"base has {bc.num_experts} experts; use the head made for this base model")
        for p in ("q_proj", "k_proj"):
            n = f"mtp.layers.{j}.self_attn.{p}.weight"
            if rows(n) is not None and n in exp and rows(n)[0] != exp[n][0]:
                raise GraftError("attention-mismatch",
                                 f"the head's {p} has {rows(n)[0]} rows, the base needs {exp[n][0]} "
                                 f"({bc.num_attention_heads} heads / {bc.num_key_value_heads} kv heads of {bc.head_dim}); "
                                 "use the MTP head made for this base model")
    missing = sorted(n for n in exp if n not in names)
    if missing:
        raise GraftError("incomplete-head", f"the head lacks {len(missing)} of {len(exp)} tensors a "
                                            f"{n_layers}-layer {'MoE' if head_moe else 'dense'} head needs, first: "
                                            f"{missing[0]}; the sidecar is incomplete: re-extract or re-download it")
    extra = sorted(n for n in names if n not in exp)
    if extra:
        raise GraftError("extra-tensors", f"the head holds {len(extra)} tensors an MTP head for this base does not "
                                          f"have, first: {extra[0]}; is HEAD really an MTP head for this model?")
    for name, ct in canon.items():
        _resolve(ct, exp[name])
    for n, e in exp.items():
        s = tuple(canon[n].shape) if n in canon else tuple(norms[n].shape)
        if s != tuple(e):
            raise GraftError("shape-mismatch", f"head tensor {n} is {list(s)}, this base needs {list(e)} (from its "
                                               "config.json); the head was made for another model")
    return n_layers


# ---- norm convention --------------------------------------------------------------------------
@dataclass
class NormDecision:
    convention: str  # how the head's file holds its norms
    declared: str | None
    declared_why: str
    statistics: str | None
    mean: float | None
    per_tensor: dict[str, float]
    source: str  # "declared" | "statistics" | "caller" | "default"
    healed: bool  # declared and stored conventions disagreed: corrected
    evidence: str
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"convention": self.convention, "declared": self.declared, "declared_why": self.declared_why,
                "statistics": self.statistics, "median_mean": self.mean, "per_tensor_mean": self.per_tensor,
                "source": self.source, "healed": self.healed, "evidence": self.evidence,
                "warnings": list(self.warnings)}


def decide_norm_convention(norms: dict[str, np.ndarray], declared: str | None, declared_why: str,
                           override: str = "auto") -> NormDecision:
    """Which convention the head's norm vectors are stored in.

    Trained and synthetic zero-centred norm weights sit near 0, `1 + w` ones near 1. When the
    weights are decisive (median of per-tensor means more than 0.25 away from 0.5) they win over
    a declared format: a sidecar that says `1 + w` but holds `w` (never shifted), or an HF file
    that holds `1 + w` (shifted twice), gives ~0% acceptance and is healed here. Otherwise the
    declared format decides, and without one zero-centred (the HF convention) is assumed, with a
    warning."""
    per = {k: float(np.mean(v)) for k, v in sorted(norms.items()) if v.size}
    mean = float(np.median(list(per.values()))) if per else None
    stat = None if mean is None else (ONE_PLUS_W if mean >= 0.5 else ZERO_CENTERED)
    stat_txt = "no norm tensors" if mean is None else (
        f"median over {len(per)} head norm vectors of their mean is {mean:.3f} "
        f"(near {'1: stored 1 + w' if stat == ONE_PLUS_W else '0: stored zero-centred w'})")
    decisive = mean is not None and abs(mean - 0.5) > DECISIVE_MARGIN
    if override != "auto":
        if override not in (ZERO_CENTERED, ONE_PLUS_W):
            raise ValueError(f"head norm convention must be auto, {ZERO_CENTERED} or {ONE_PLUS_W}, got {override!r}")
        d = NormDecision(override, declared, declared_why, stat, mean, per, "caller", False,
                         f"given by the caller; {stat_txt}")
        if decisive and stat != override:
            d.warnings.append(f"--head-norms {override} contradicts the weights ({stat_txt}): expect ~0% acceptance")
        return d
    if declared is not None:
        if decisive and stat != declared:
            return NormDecision(stat, declared, declared_why, stat, mean, per, "statistics", True,
                                f"format declares {declared} ({declared_why}) but {stat_txt}: the head was "
                                f"{'never shifted' if stat == ZERO_CENTERED else 'shifted twice'}; healed: read as {stat}",
                                [f"head norms stored {stat} although the format declares {declared}: healed"])
        return NormDecision(declared, declared, declared_why, stat, mean, per, "declared", False,
                            f"declared {declared} ({declared_why}); {stat_txt}")
    if decisive:
        return NormDecision(stat, None, "", stat, mean, per, "statistics", False, stat_txt)
    d = NormDecision(ZERO_CENTERED, None, "", stat, mean, per, "default", False,
                     f"no declared format and undecided weights ({stat_txt}): assumed zero-centred (HF)")
    d.warnings.append("head norm convention undecided: assumed zero-centred; check with `mtplx inspect OUT --probe` "
                      "and pass --head-norms to override")
    return d


# ---- writing ----------------------------------------------------------------------------------
def _head_quant_plan(head_dtype: str, module: str, in_dim: int, ct: CanonTensor) -> tuple[int, int] | None:
    """(bits, group_size) to write `module` with, or None for a float tensor."""
    if head_dtype == "keep":
        return ct.quant
    if head_dtype in ("q8", "q4"):
        router = module.endswith(("mlp.gate", "shared_expert_gate"))
        bits, gs = (8, 64) if (head_dtype == "q8" or router) else (4, 64)
        if in_dim % gs == 0:
            return bits, gs
    return None


class _StreamWriter:
    """Writes a safetensors file tensor by tensor: header from declared shapes, data streamed."""

    def __init__(self):
        self.entries: list[tuple[str, np.dtype, tuple[int, ...], Callable[[], np.ndarray]]] = []

    def add(self, name, dtype, shape, fn):
        self.entries.append((name, np.dtype(dtype), tuple(int(s) for s in shape), fn))

    def write(self, path: Path, metadata: dict, progress=None) -> int:
        header: dict = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
        off = 0
        for name, dt, shape, _ in self.entries:
            n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            header[name] = {"dtype": NUMPY_TO_ST[dt], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * ((8 - len(blob) % 8) % 8)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for i, (name, dt, shape, fn) in enumerate(self.entries):
                a = np.ascontiguousarray(fn())
                if a.dtype != dt or tuple(a.shape) != shape:
                    raise CheckpointError(f"internal: {name} produced {a.dtype}{list(a.shape)}, declared {dt}{list(shape)}")
                f.write(a.tobytes())
                if progress:
                    progress("writing head", i + 1, len(self.entries))
        return off


@dataclass
class GraftReport:
    base: Path
    head: Path
    out: Path
    head_kind: str
    head_dtype: str
    n_layers: int
    head_layout_in: str
    head_layout_out: str
    norm: NormDecision
    base_norm_convention: str
    conversions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    linked: list[dict] = field(default_factory=list)
    head_file: str = ""
    head_tensors: int = 0
    head_bytes: int = 0
    head_sha256: str = ""
    quantization: dict | None = None
    inspect_verdict: str = ""
    inspect_reason: str = ""

    def to_dict(self) -> dict:
        from mtplx import __version__ as v  # noqa: PLC0415

        return {
            "schema_version": 1, "tool": f"mtplx {v}",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "base": str(self.base), "head_source": {"path": str(self.head), "kind": self.head_kind,
                                                    "layers": self.n_layers, "layout": self.head_layout_in},
            "out": str(self.out), "head_file": self.head_file, "head_layout": self.head_layout_out,
            "head_dtype": self.head_dtype, "head_tensors": self.head_tensors, "head_bytes": self.head_bytes,
            "head_sha256": self.head_sha256, "head_quantization": self.quantization,
            "norms": {**self.norm.to_dict(), "written_as": self.base_norm_convention},
            "conversions": list(self.conversions), "warnings": list(self.warnings),
            "base_files": list(self.linked),
            "inspect": {"verdict": self.inspect_verdict, "reason": self.inspect_reason},
        }


def _cast_float(a: np.ndarray, head_dtype: str, src_dtype) -> np.ndarray:
    if head_dtype == "keep":
        dt = np.dtype(src_dtype) if src_dtype is not None else np.dtype(np.float32)
        if dt.kind not in "fV" and dt != _BF16:
            dt = np.dtype(np.float32)
        return np.asarray(a).astype(dt)
    return np.asarray(a).astype(_BF16)


def _link(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(src, dst)
        return "symlink"
    except (OSError, NotImplementedError):
        pass
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError as e:
        raise GraftError("cannot-link", f"cannot link {dst.name} to {src} (neither a symlink nor a hard link: {e}); "
                                        "put OUT on the same filesystem as BASE, or enable symlinks") from None


def _check_out(out: Path, base: Path, head: Path, force: bool) -> None:
    o = out.resolve()
    for p, label in ((base, "BASE"), (head, "HEAD")):
        r = p.resolve()
        if o == r or r in o.parents or (r.is_dir() and o in r.parents):
            raise GraftError("out-overlaps", f"OUT {out} overlaps {label} {p}: choose a new folder for OUT")
    if out.exists() or out.is_symlink():
        if not force:
            raise GraftError("out-exists", f"OUT {out} already exists: choose another folder, or pass --force "
                                           "to replace it")
        if out.is_dir() and not out.is_symlink():
            entries = list(out.iterdir())
            if entries and not (out / PROVENANCE_NAME).is_file():
                raise GraftError("out-exists", f"OUT {out} exists and is not a graft output (no {PROVENANCE_NAME}); "
                                               "--force only replaces earlier graft outputs: remove it yourself "
                                               "or choose another folder")
            shutil.rmtree(out)
        else:
            raise GraftError("out-exists", f"OUT {out} exists and is not a folder: choose another path")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _head_layout_in(names) -> str:
    if any(".switch_mlp." in n for n in names):
        return EXPERTS_SWITCH
    if any(".experts.gate_up_proj" in n for n in names):
        return EXPERTS_FUSED
    if any(".experts." in n for n in names):
        return EXPERTS_PER_EXPERT
    return EXPERTS_NONE


def graft(base, head, out, *, head_dtype: str = "bf16", force: bool = False, head_norms: str = "auto",
          head_layout: str | None = None, progress: Callable[[str, int, int], None] | None = None) -> GraftReport:
    """Graft HEAD onto BASE into the new folder OUT. Raises GraftError (a refusal with its reason).

    progress(stage, done, total) is called while reading, linking and writing."""
    base, head, out = Path(base), Path(head), Path(out)
    if head_dtype not in HEAD_DTYPES:
        raise GraftError("bad-argument", f"--head-dtype must be one of {', '.join(HEAD_DTYPES)}, got {head_dtype!r}")
    if head_norms not in NORM_CHOICES:
        raise GraftError("bad-argument", f"--head-norms must be one of {', '.join(NORM_CHOICES)}, got {head_norms!r}")
    if not base.is_dir():
        raise GraftError("base-unreadable", f"BASE {base} is not a checkpoint folder")
    if not head.exists():
        raise GraftError("head-unreadable", f"HEAD {head}: no such file or folder")
    _check_out(out, base, head, force)

    # -- base
    brep = inspect_checkpoint(base)
    if brep.verdict in (VERDICT_UNREADABLE, VERDICT_UNSUPPORTED, VERDICT_BACKBONE_INVALID):
        raise GraftError("base-" + brep.verdict, f"BASE {base} cannot be grafted: {brep.reason}")
    if brep.head_only:
        raise GraftError("base-is-head", f"BASE {base} is an MTP head alone (an MLX sidecar), not a model: "
                                         "pass the model folder as BASE and this folder as HEAD")
    bcfg, bstore = brep.config, brep.store
    bgate = brep.gate.groups["backbone"]
    bnorm = brep.norms["backbone"].convention or ZERO_CENTERED
    conversions: list[str] = []
    warnings: list[str] = []

    # -- head
    hin = load_head(head)
    canon, norms = canonical_head(hin, bcfg)
    n_layers = validate_head(hin, bcfg, canon, norms)
    layout_in = _head_layout_in(hin.tensors.keys())
    decision = decide_norm_convention(norms, hin.declared, hin.declared_why, head_norms)
    warnings += decision.warnings
    if progress:
        progress("reading head", 1, 1)

    # -- output layout: the base's own head layout when it has a valid one, else its backbone's
    if head_layout is None:
        bm = brep.gate.groups.get("mtp")
        if not bcfg.mtp_is_moe:
            head_layout = EXPERTS_NONE
        elif brep.head_present and bm is not None and bm.ok and bm.format.experts != EXPERTS_NONE:
            head_layout = bm.format.experts
        else:
            head_layout = bgate.format.experts
    quant_any = head_dtype in ("q8", "q4") or (head_dtype == "keep" and any(c.quant for c in canon.values()))
    if head_layout == EXPERTS_FUSED and quant_any:
        head_layout = EXPERTS_PER_EXPERT
        conversions.append("experts written per-expert: a fused gate_up_proj has no quantized form")
    if bcfg.mtp_is_moe and head_layout != layout_in:
        conversions.append(f"experts {layout_in} -> {head_layout} (the base's layout)")
    if any(not i.file_key.startswith("mtp.") for i in hin.tensors.infos.values()):
        conversions.append("keys prefixed mtp. (embedded in the base's index)")
    if bcfg.mtp_is_moe and head_dtype in ("q8", "q4"):
        warnings.append(f"quantizing an MoE MTP head ({head_dtype}) cost most of its acceptance elsewhere "
                        "(4-bit: 5-11% against 79-85% in bf16); keep it bf16 unless memory forces it")

    # -- norms: stored convention -> multiplier -> the base's convention, fp32
    mult = {k: (v if decision.convention == ONE_PLUS_W else np.float32(1.0) + v).astype(np.float32)
            for k, v in norms.items()}
    written_norms = {k: (m - np.float32(1.0) if bnorm == ZERO_CENTERED else m).astype(np.float32)
                     for k, m in mult.items()}
    if decision.healed:
        conversions.append(f"norms healed: {decision.evidence}")
    if decision.convention != bnorm:
        conversions.append(f"norms {decision.convention} -> {bnorm} (the base's convention), fp32")

    # -- plan the head file
    w = _StreamWriter()
    module_q: dict[str, tuple[int, int] | None] = {}
    n_deq = 0

    def emit_linear(module: str, ct: CanonTensor, get, shape, triple):
        nonlocal n_deq
        q = _head_quant_plan(head_dtype, module, shape[-1], ct)
        module_q[module] = q
        if q is None:
            n_deq += ct.quant is not None
            dt = np.dtype(ct.dtype) if (head_dtype == "keep" and ct.quant is None) else _BF16
            w.add(module + ".weight", dt, shape, lambda get=get, dt=dt: np.asarray(get()).astype(dt))
            return
        *lead, N, K = shape
        if head_dtype == "keep":  # the source's own codes, untouched
            sdt = np.dtype(ct.dtype)
            parts = tuple((lambda i=i, t=triple: np.asarray(t()[i])) for i in range(3))
        else:
            sdt = _BF16
            memo: dict = {}

            def part(i, get=get, q=q, memo=memo):
                if "v" not in memo:
                    memo["v"] = mlx_quantize(np.asarray(get()).astype(np.float32).astype(_BF16), group_size=q[1], bits=q[0])
                v = memo["v"][i]
                if i == 2:
                    memo.clear()
                return v
            parts = tuple((lambda i=i, part=part: part(i)) for i in range(3))
        w.add(module + ".weight", np.uint32, (*lead, N, K * q[0] // 32), parts[0])
        w.add(module + ".scales", sdt, (*lead, N, K // q[1]), parts[1])
        w.add(module + ".biases", sdt, (*lead, N, K // q[1]), parts[2])

    for name in sorted(set(canon) | set(written_norms), key=_order_key):
        if name in written_norms:
            w.add(name, np.float32, written_norms[name].shape, lambda a=written_norms[name]: a)
            continue
        ct = canon[name]
        if _is_expert(name):
            mlp, proj = name.rsplit(".experts.", 1)
            E = ct.shape[0]
            if head_layout == EXPERTS_SWITCH:
                emit_linear(f"{mlp}.switch_mlp.{proj}", ct, ct.get, ct.shape, ct.triple)
            elif head_layout == EXPERTS_PER_EXPERT:
                memo: dict = {}

                def stacked(ct=ct, memo=memo):  # dequantize / read the stack once for all experts
                    if memo.get("name") != ct.name:
                        memo.clear()
                        memo["name"], memo["v"] = ct.name, np.asarray(ct.get())
                    return memo["v"]
                for e in range(E):
                    tri = None if ct.triple is None else (lambda ct=ct, e=e: tuple(np.asarray(p)[e] for p in ct.triple()))
                    emit_linear(f"{mlp}.experts.{e}.{proj}", ct, lambda e=e, s=stacked: s()[e], ct.shape[1:], tri)
            else:  # fused 3-D: gate_up [E, 2I, H] (gate rows first), down [E, H, I]; float only
                if proj == "up_proj":
                    continue
                dt = np.dtype(ct.dtype) if (head_dtype == "keep" and ct.quant is None) else _BF16
                n_deq += ct.quant is not None
                if proj == "gate_proj":
                    up = canon[f"{mlp}.experts.up_proj"]
                    n_deq += up.quant is not None
                    w.add(f"{mlp}.experts.gate_up_proj", dt, (E, 2 * ct.shape[1], ct.shape[2]),
                          lambda g=ct, u=up, dt=dt: np.concatenate([np.asarray(g.get()), np.asarray(u.get())],
                                                                    axis=1).astype(dt))
                else:
                    w.add(f"{mlp}.experts.down_proj", dt, ct.shape, lambda c=ct, dt=dt: np.asarray(c.get()).astype(dt))
            continue
        emit_linear(name[: -len(".weight")], ct, ct.get, ct.shape, ct.triple)
    if n_deq:
        conversions.append(f"{n_deq} MLX-quantized head modules dequantized")
    if head_dtype == "bf16":
        conversions.append("head weights written bf16 (norm vectors fp32)")
    elif head_dtype in ("q8", "q4"):
        conversions.append(f"head linears MLX-affine quantized ({head_dtype}, group 64; router gates 8-bit)")

    # -- write OUT
    out.mkdir(parents=True)
    try:
        linked, head_bytes, qblock = _write_out(base, out, bstore, bcfg, brep, w, module_q, n_layers, progress)
        report = GraftReport(base, head, out, hin.kind, head_dtype, n_layers, layout_in, head_layout, decision, bnorm,
                             conversions, warnings, linked, HEAD_FILE_NAME, len(w.entries), head_bytes)
        report.head_sha256 = _sha256(out / HEAD_FILE_NAME)
        used = sorted({q for q in module_q.values() if q is not None})
        report.quantization = {"modes": [list(q) for q in used], "config_block": qblock} if used else None
        orep = inspect_checkpoint(out)
        report.inspect_verdict, report.inspect_reason = orep.verdict, orep.reason
        (out / PROVENANCE_NAME).write_text(json.dumps(report.to_dict(), indent=1))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    if orep.verdict != VERDICT_OK:
        raise GraftError("out-fails-inspect", f"the grafted checkpoint {out} does not pass inspect "
                                              f"({orep.verdict}: {orep.reason}); please report this graft bug with "
                                              f"{out / PROVENANCE_NAME}")
    return report


def _keep_parts(ct: CanonTensor):
    if ct.triple is None:
        return None
    return (lambda: np.asarray(ct.triple()[0]), lambda: np.asarray(ct.triple()[1]), lambda: np.asarray(ct.triple()[2]))


def _order_key(name: str):
    parts = name.split(".")
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def _quant_block(bcfg: ModelConfig, raw_block: dict | None, module_q: dict) -> dict | None:
    """The config quantization block OUT needs: the base's (its old mtp.* entries dropped) plus an
    entry per head module that differs from the default; for a float base with a quantized head,
    a new block whose default is the head's most common mode."""
    used = [q for q in module_q.values() if q is not None]
    if bcfg.quantization is not None:
        block = {k: v for k, v in (raw_block or bcfg.quantization.to_dict()).items() if not str(k).startswith("mtp.")}
        default = (bcfg.quantization.bits, bcfg.quantization.group_size)
    elif used:
        default = max(set(used), key=used.count)
        block = {"group_size": default[1], "bits": default[0], "mode": "affine"}
    else:
        return None
    for mod, q in module_q.items():
        if q is None:
            block[mod] = False
        elif q != default:
            block[mod] = {"group_size": q[1], "bits": q[0]}
    return block


def _write_out(base: Path, out: Path, bstore: TensorStore, bcfg: ModelConfig, brep, w: _StreamWriter,
               module_q: dict, n_layers: int, progress) -> tuple[list[dict], int, dict | None]:
    # base weight files: every file of the store except the base's own head (sidecars, mtp.* keys)
    head_files = set()
    if bstore.head is not None and bstore.head.kind != HEAD_EMBEDDED:
        head_files = {Path(f) for f in bstore.head.files}
    weight_map: dict[str, str] = {}
    files: dict[Path, str] = {}
    total = 0
    for name, info in bstore.infos.items():
        if info.file in head_files:
            continue
        s = split_key(name)
        if s is not None and s[0] == "mtp":
            continue
        try:
            rel = info.file.relative_to(base).as_posix()
        except ValueError:
            rel = info.file.name
        files.setdefault(info.file, rel)
        weight_map[info.file_key] = rel
        total += info.nbytes
    linked = []
    for i, (src, rel) in enumerate(sorted(files.items(), key=lambda kv: kv[1])):
        kind = _link(src.resolve(), out / rel)
        linked.append({"file": rel, "target": str(src.resolve()), "link": kind, "bytes": src.stat().st_size})
        if progress:
            progress("linking base", i + 1, len(files))
    meta = {"format": "mlx" if brep.gate.groups["backbone"].format.conv == "mlx" else "pt", "mtplx": "graft"}
    head_bytes = w.write(out / HEAD_FILE_NAME, meta, progress)
    for name, _, _, _ in w.entries:
        weight_map[name] = HEAD_FILE_NAME
    total += head_bytes
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total, "mtplx_graft": PROVENANCE_NAME},
                                              "weight_map": weight_map}, indent=1))
    # other files: small ones copied, big ones linked; never the base's head, index or weights
    skip = {INDEX_NAME, "config.json", PROVENANCE_NAME} | {p.name for p in head_files}
    for p in sorted(base.iterdir()):
        if p.name in skip or not p.is_file() or p.suffix == ".safetensors":
            continue
        if p.stat().st_size <= SMALL_FILE_BYTES:
            shutil.copy2(p, out / p.name)
        else:
            _link(p.resolve(), out / p.name)
    raw = json.loads((base / "config.json").read_text())
    text = raw["text_config"] if isinstance(raw.get("text_config"), dict) else raw
    if bcfg.family == "qwen3_5":
        text["mtp_num_hidden_layers"] = n_layers
    elif n_layers != 1 or "num_nextn_predict_layers" in text:
        text["num_nextn_predict_layers"] = n_layers
    keys = [k for k in ("quantization", "quantization_config") if isinstance(raw.get(k), dict)]
    block = _quant_block(bcfg, raw.get(keys[0]) if keys else None, module_q)
    if block is not None:
        for k in keys or ["quantization"]:
            raw[k] = {**({kk: vv for kk, vv in raw[k].items() if kk == "quant_method"} if k in raw else {}), **block}
    (out / "config.json").write_text(json.dumps(raw, indent=1))
    return linked, head_bytes, block


__all__ = ["graft", "GraftError", "GraftReport", "load_head", "canonical_head", "validate_head",
           "decide_norm_convention", "NormDecision", "PROVENANCE_NAME", "HEAD_FILE_NAME", "HEAD_DTYPES"]
