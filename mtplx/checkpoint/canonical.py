"""Every storage layout -> canonical names and conventions (docs/architecture.md).

`canonical_weights(tensors, config)` takes a TensorStore or any Mapping[str, np.ndarray]
(e.g. a transformers state_dict converted to numpy) and yields (canonical_name, array):

- prefixes `model.language_model.`, `language_model.model.`, `model.`, `mtp.` stripped
  (MTP tensors come out as `mtp.<rest>`), `model.visual.*` skipped;
- RMSNorm weights as fp32 MULTIPLIERS: `1 + w` for zero-centred files, as-is for `1 + w`
  files; `linear_attn.norm` passes through unchanged;
- conv1d `[C, 1, K]` / `[C, K, 1]` -> `[C, K]`; `A_log` as fp32;
- Qwen3-Next `in_proj_qkvz` / `in_proj_ba` split into `in_proj_qkv` (rows [q heads | k heads |
  v heads]), `in_proj_z`, `in_proj_b`, `in_proj_a`;
- MoE experts stacked `mlp.experts.{gate,up,down}_proj` [E, out, in] from per-expert 2-D,
  fused `gate_up_proj` (gate rows first) or MLX `switch_mlp`;
- MLX-quantized modules pass through as `X.weight` (uint32), `X.scales`, `X.biases` under the
  canonical module name X (for stacked experts X = `...mlp.experts.gate_proj`, so the three
  are `...experts.gate_proj.weight/.scales/.biases`; unquantized experts have no suffix).

Arrays are yielded lazily (memory-mapped where no conversion is needed).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import CheckpointError
from .names import is_norm, split_key
from .norms import ONE_PLUS_W, ZERO_CENTERED, resolve_conventions

_PER_EXPERT = re.compile(r"^(?P<mlp>(?:layers\.\d+\.)?mlp)\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<part>weight|scales|biases)$")
_FUSED = re.compile(r"^(?P<mlp>(?:layers\.\d+\.)?mlp)\.experts\.(?P<proj>gate_up_proj|down_proj)(?:\.weight)?$")
_SWITCH = re.compile(r"^(?P<mlp>(?:layers\.\d+\.)?mlp)\.switch_mlp\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<part>weight|scales|biases)$")
_QKVZ = re.compile(r"^(?P<la>layers\.\d+\.linear_attn)\.(?P<proj>in_proj_qkvz|in_proj_ba)\.(?P<part>weight|scales|biases)$")

PROJS = ("gate_proj", "up_proj", "down_proj")


def _norm_fn(arr_fn: Callable[[], np.ndarray], convention: str) -> Callable[[], np.ndarray]:
    if convention == ZERO_CENTERED:
        return lambda: np.float32(1.0) + np.asarray(arr_fn()).astype(np.float32)
    return lambda: np.asarray(arr_fn()).astype(np.float32)


def split_qkvz(w: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-Next `in_proj_qkvz` rows (grouped per k-head as q, k, v, z) -> (qkv, z).

    Works on any array whose first axis is the output rows (weights, MLX scales/biases).
    qkv rows: [all q heads | all k heads | all v heads], z rows: v-head order.
    """
    nk, dk, dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    r = cfg.linear_num_value_heads // nk
    per = 2 * dk + 2 * r * dv
    if w.shape[0] != nk * per:
        raise CheckpointError(f"in_proj_qkvz has {w.shape[0]} rows, expected {nk}*{per}={nk * per} from the config")
    g = w.reshape(nk, per, *w.shape[1:])
    q = g[:, :dk].reshape(nk * dk, *w.shape[1:])
    k = g[:, dk:2 * dk].reshape(nk * dk, *w.shape[1:])
    v = g[:, 2 * dk:2 * dk + r * dv].reshape(nk * r * dv, *w.shape[1:])
    z = g[:, 2 * dk + r * dv:].reshape(nk * r * dv, *w.shape[1:])
    return np.concatenate([q, k, v], axis=0), np.ascontiguousarray(z)


def split_ba(w: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-Next `in_proj_ba` rows (grouped per k-head as b, a) -> (b [nv, ...], a [nv, ...])."""
    nk = cfg.linear_num_key_heads
    r = cfg.linear_num_value_heads // nk
    if w.shape[0] != nk * 2 * r:
        raise CheckpointError(f"in_proj_ba has {w.shape[0]} rows, expected {nk * 2 * r} from the config")
    g = w.reshape(nk, 2 * r, *w.shape[1:])
    b = g[:, :r].reshape(nk * r, *w.shape[1:])
    a = g[:, r:].reshape(nk * r, *w.shape[1:])
    return np.ascontiguousarray(b), np.ascontiguousarray(a)


def fuse_qkvz(qkv: np.ndarray, z: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Inverse of split_qkvz (used by the synthetic writer)."""
    nk, dk, dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    r = cfg.linear_num_value_heads // nk
    rest = qkv.shape[1:]
    q = qkv[:nk * dk].reshape(nk, dk, *rest)
    k = qkv[nk * dk:2 * nk * dk].reshape(nk, dk, *rest)
    v = qkv[2 * nk * dk:].reshape(nk, r * dv, *rest)
    zz = z.reshape(nk, r * dv, *rest)
    return np.concatenate([q, k, v, zz], axis=1).reshape(-1, *rest)


def fuse_ba(b: np.ndarray, a: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    nk = cfg.linear_num_key_heads
    r = cfg.linear_num_value_heads // nk
    rest = b.shape[1:]
    return np.concatenate([b.reshape(nk, r, *rest), a.reshape(nk, r, *rest)], axis=1).reshape(-1, *rest)


def canonical_weights(
    tensors: Mapping[str, np.ndarray],
    config: ModelConfig,
    *,
    source_norm_convention="auto",
    include_mtp: bool = True,
    select: Callable[[str, np.ndarray], np.ndarray] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (canonical_name, array) for every text-model tensor of `tensors`.

    source_norm_convention: "auto" (declared format, else weight statistics; per group),
    "zero_centered", "one_plus_w", or {"backbone": ..., "mtp": ...}.
    select(name, array) -> the part of it to yield (a tensor-parallel rank's slice,
    mtplx.checkpoint.shard), applied to each expert before stacking: a rank then never holds a
    whole layer's experts. Not applied to MLX-quantized parts (packed words: sliced after
    dequantizing).
    """
    conventions = resolve_conventions(tensors, source_norm_convention)
    plan = build_plan(tensors, config, conventions, include_mtp=include_mtp, select=select)
    for name, fn in plan:
        yield name, fn()


def _quant_part(name: str, a) -> bool:
    return name.endswith((".scales", ".biases")) or np.asarray(a).dtype == np.uint32


def _selected(select, name: str, fn):
    def thunk():
        a = fn()
        return a if _quant_part(name, a) else select(name, a)
    return thunk


def build_plan(tensors: Mapping, config: ModelConfig, conventions: dict[str, str], *,
               include_mtp: bool = True, select=None) -> list[tuple[str, Callable[[], np.ndarray]]]:
    """The list of (canonical_name, thunk) without reading any tensor data."""
    plan: list[tuple[str, Callable[[], np.ndarray]]] = []
    per_expert: dict[tuple[str, str, str], dict[int, str]] = {}  # (out_prefix, proj, part) -> {e: key}
    order: list[tuple[str, tuple]] = []  # keeps experts/qkvz near their layer in the output

    def get(key: str) -> Callable[[], np.ndarray]:
        return lambda: tensors[key]

    keys = list(tensors.keys())
    quantized_modules = set()
    for key in keys:
        if key.endswith(".scales"):
            quantized_modules.add(key[: -len(".scales")])

    for key in keys:
        s = split_key(key)
        if s is None:
            continue
        group, rest = s
        if group == "mtp" and not include_mtp:
            continue
        out_prefix = "mtp." if group == "mtp" else ""
        if rest.startswith("lm_head.") and config.tie_word_embeddings:
            continue
        m = _PER_EXPERT.match(rest)
        if m:
            k3 = (out_prefix + m["mlp"], m["proj"], m["part"])
            if k3 not in per_expert:
                per_expert[k3] = {}
                order.append(("per_expert", k3))
            per_expert[k3][int(m["e"])] = key
            continue
        m = _SWITCH.match(rest)
        if m:
            base = f"{out_prefix}{m['mlp']}.experts.{m['proj']}"
            quant = key[: -len(m["part"]) - 1] in quantized_modules
            name = f"{base}.{m['part']}" if (quant or m["part"] != "weight") else base
            plan.append((name, get(key)))
            continue
        m = _FUSED.match(rest)
        if m:
            mlp = out_prefix + m["mlp"]
            if m["proj"] == "down_proj":
                plan.append((f"{mlp}.experts.down_proj", get(key)))
            else:
                def gate_fn(key=key):
                    a = tensors[key]
                    return a[:, : a.shape[1] // 2]

                def up_fn(key=key):
                    a = tensors[key]
                    return a[:, a.shape[1] // 2:]

                plan.append((f"{mlp}.experts.gate_proj", gate_fn))
                plan.append((f"{mlp}.experts.up_proj", up_fn))
            continue
        m = _QKVZ.match(rest)
        if m:
            la = out_prefix + m["la"]
            part = m["part"]
            if m["proj"] == "in_proj_qkvz":
                plan.append((f"{la}.in_proj_qkv.{part}", lambda key=key: split_qkvz(tensors[key], config)[0]))
                plan.append((f"{la}.in_proj_z.{part}", lambda key=key: split_qkvz(tensors[key], config)[1]))
            else:
                plan.append((f"{la}.in_proj_b.{part}", lambda key=key: split_ba(tensors[key], config)[0]))
                plan.append((f"{la}.in_proj_a.{part}", lambda key=key: split_ba(tensors[key], config)[1]))
            continue
        name = out_prefix + rest
        if is_norm(group, rest):
            plan.append((name, _norm_fn(get(key), conventions[group])))
        elif rest.endswith("linear_attn.conv1d.weight"):
            def conv_fn(key=key):
                a = tensors[key]
                if a.ndim == 3:
                    if a.shape[1] == 1:
                        return a.reshape(a.shape[0], a.shape[2])
                    return a.reshape(a.shape[0], a.shape[1])
                return a
            plan.append((name, conv_fn))
        elif rest.endswith("linear_attn.A_log"):
            plan.append((name, lambda key=key: np.asarray(tensors[key]).astype(np.float32)))
        else:
            plan.append((name, get(key)))

    if select is not None:  # the stacked experts (below) apply it to each expert
        plan = [(name, _selected(select, name, fn)) for name, fn in plan]
    stacked: set[str] = set()
    for kind, k3 in order:
        prefix, proj, part = k3
        experts = per_expert[k3]
        n = max(experts) + 1
        missing = [e for e in range(n) if e not in experts]
        if missing:
            raise CheckpointError(f"{prefix}.experts: expert {missing[0]} has no {proj}.{part} (found {len(experts)} of {n})")
        module = f"{prefix}.experts.{proj}"
        src_module = experts[0][: -len(part) - 1]
        quant = src_module in quantized_modules
        name = f"{module}.{part}" if (quant or part != "weight") else module
        ks = [experts[e] for e in range(n)]
        pick = select if select is not None and not quant else (lambda _, a: a)
        plan.append((name, lambda ks=ks, name=name, pick=pick:
                     np.stack([np.asarray(pick(name, tensors[k])) for k in ks], axis=0)))
        stacked.add(name)

    seen = set()
    for name, _ in plan:
        if name in seen:
            raise CheckpointError(f"two source tensors map to canonical {name!r}: mixed layouts in one checkpoint")
        seen.add(name)
    return plan


def canonical_dict(tensors: Mapping, config: ModelConfig, **kw) -> dict[str, np.ndarray]:
    """All canonical tensors in a dict (convenience for tests and small models)."""
    return dict(canonical_weights(tensors, config, **kw))


def load_canonical(model_dir: str | Path, *, include_mtp: bool = True,
                   source_norm_convention="auto", select=None) -> Iterator[tuple[str, np.ndarray]]:
    """Open `model_dir`, parse its config, run the tensor gate, and yield canonical tensors.

    Raises CheckpointError (inspect's one-line reason) when inspect would reject the checkpoint:
    unreadable, unsupported architecture, or a present-but-invalid MTP head (when include_mtp).
    A checkpoint without a head yields the backbone only.
    """
    from .inspect import inspect_checkpoint, VERDICT_HEAD_INVALID, REJECTING_VERDICTS

    report = inspect_checkpoint(model_dir)
    if report.verdict in REJECTING_VERDICTS and not (report.verdict == VERDICT_HEAD_INVALID and not include_mtp):
        raise CheckpointError(report.reason)
    store, config = report.store, report.config
    if report.verdict == VERDICT_HEAD_INVALID:
        include_mtp = False
    conv = source_norm_convention
    if conv == "auto":
        conv = {g: (r.convention or ZERO_CENTERED) for g, r in report.norms.items()}
    return canonical_weights(store, config, source_norm_convention=conv, include_mtp=include_mtp, select=select)


__all__ = [
    "canonical_weights", "canonical_dict", "load_canonical", "split_qkvz", "split_ba",
    "fuse_qkvz", "fuse_ba", "ONE_PLUS_W", "ZERO_CENTERED",
]
