"""Build an MlxModel (+ MTP head) from canonical weights (mtplx.checkpoint.canonical).

    model = load_mlx_model("path/to/checkpoint", dtype="float32")
    model = load_mlx_model(canonical_iterator, config=cfg)       # (name, np.ndarray) pairs
    model = load_mlx_model(raw_tensors_mapping, config=cfg)      # e.g. an HF state_dict as numpy

Every layout (HF per-expert / fused experts, MLX-converted, MLX-quantized, `qwen3_5_mtp` sidecar
folders) has already been turned into canonical names and conventions by the checkpoint layer;
this file is the thin canonical -> mlx-lm mapping:

    embed_tokens.* / norm.weight / layers.i.*   ->  model.embed_tokens.* / model.norm.weight / model.layers.i.*
    lm_head.*                                   ->  lm_head.*          (dropped when tied)
    mtp.*                                       ->  mtp.*              (attribute names mirror canonical)
    ...mlp.experts.{gate,up,down}_proj[.part]   ->  ...mlp.switch_mlp.{gate,up,down}_proj.{weight|part}
    ...linear_attn.conv1d.weight [C, K]         ->  [C, K, 1]          (mlx Conv1d layout)

Norms: canonical norms are multipliers `1 + w` and mlx-lm's RMSNorm takes a multiplier: they
load unchanged (never shifted here; the checkpoint layer shifted zero-centred files exactly once).

Quantized modules (canonical `X.weight` uint32 + `X.scales` + `X.biases`) become mlx-lm's
QuantizedLinear / QuantizedEmbedding / QuantizedSwitchLinear with bits and group size read off
the shapes (input width from the module, so per-module overrides such as 8-bit routers need no
config lookup). Float tensors are cast to `dtype` except `A_log` (fp32, as mlx-lm does).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mtplx.checkpoint.config import ModelConfig, load_config
from mtplx.checkpoint.errors import CheckpointError

from .model import DEFAULT_ROW_BUCKET, MlxModel
from .mtp import MtpHead

DTYPES = {"float32": mx.float32, "fp32": mx.float32, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
          "float16": mx.float16, "fp16": mx.float16}

_EXPERTS = re.compile(r"^(?P<mlp>.*\.mlp)\.experts\.(?P<proj>gate_proj|up_proj|down_proj)(?:\.(?P<part>weight|scales|biases))?$")


def mlx_name(name: str) -> str:
    """Canonical tensor name -> mlx parameter path in MlxModel."""
    m = _EXPERTS.match(name)
    if m:
        name = f"{m['mlp']}.switch_mlp.{m['proj']}.{m['part'] or 'weight'}"
    if name.startswith(("mtp.", "lm_head.")):
        return name
    return "model." + name


def to_mx(a) -> mx.array:
    """numpy (incl. ml_dtypes bfloat16) -> mx.array."""
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        return mx.array(a.view(np.uint16)).view(mx.bfloat16)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("="))
    return mx.array(a)


def _mtp_layers(cfg: ModelConfig, names) -> int:
    n = int(cfg.num_mtp_layers) if cfg.num_mtp_layers else 1
    for name in names:
        m = re.match(r"^mtp\.layers\.(\d+)\.", name)
        if m:
            n = max(n, int(m[1]) + 1)
    return n


def _quant_spec(module, path: str, w: np.ndarray, scales: np.ndarray) -> dict:
    """(bits, group_size) of a quantized module from its float module's input width."""
    if isinstance(module, nn.Embedding):
        k = module.weight.shape[1]
    else:
        k = module.weight.shape[-1]
    gs = k // scales.shape[-1] if scales.shape[-1] else 0
    bits = (w.shape[-1] * 32) // k if k else 0
    if not gs or k % scales.shape[-1] or bits not in (2, 3, 4, 5, 6, 8) or w.shape[-1] * 32 != bits * k:
        raise CheckpointError(f"{path}: cannot read quantization from weight {tuple(w.shape)} and scales "
                              f"{tuple(scales.shape)} for an input width of {k}")
    return {"group_size": int(gs), "bits": int(bits)}


def load_mlx_model(source, dtype="float32", *, config: ModelConfig | None = None, include_mtp: bool = True,
                   mtp_hidden: str = "post", source_norm_convention="auto",
                   row_bucket: int | None = DEFAULT_ROW_BUCKET) -> MlxModel:
    """A checkpoint folder, a canonical (name, array) iterable or a raw tensor mapping (+ config)
    -> an MlxModel with `model.head` set when the checkpoint has an MTP head (and include_mtp)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported by the mlx backend; use one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if mtp_hidden not in ("post", "pre"):
        raise ValueError(f"mtp_hidden must be 'post' or 'pre', got {mtp_hidden!r}")
    if isinstance(source, (str, Path)):
        from mtplx.checkpoint.canonical import load_canonical

        cfg = config or load_config(Path(source))
        items = load_canonical(Path(source), include_mtp=include_mtp, source_norm_convention=source_norm_convention)
    elif isinstance(source, Mapping):
        if config is None:
            raise ValueError("load_mlx_model: a tensor mapping needs config=ModelConfig")
        from mtplx.checkpoint.canonical import canonical_weights

        cfg = config
        items = canonical_weights(source, cfg, include_mtp=include_mtp, source_norm_convention=source_norm_convention)
    elif isinstance(source, Iterable):
        if config is None:
            raise ValueError("load_mlx_model: a canonical iterator needs config=ModelConfig")
        cfg, items = config, iter(source)
    else:
        raise TypeError(f"load_mlx_model: expected a folder, a mapping or an iterable, got {type(source).__name__}")

    canon: dict[str, np.ndarray] = {}
    for name, arr in items:
        if name.startswith("mtp.") and not include_mtp:
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        canon[name] = arr

    model = MlxModel(cfg, row_bucket=row_bucket)
    model.mtp_hidden = mtp_hidden
    model.dtype = dtype
    if any(n.startswith("mtp.") for n in canon):
        model.mtp = MtpHead(cfg, _mtp_layers(cfg, canon))

    # quantized modules -> mlx-lm's quantized classes (bits / group size from the shapes)
    modules = dict(model.named_modules())
    qspec: dict[str, dict] = {}
    for name in canon:
        if name.endswith(".scales"):
            base = name[: -len(".scales")]
            if base + ".weight" not in canon or base + ".biases" not in canon:
                raise CheckpointError(f"quantized module {base} lacks one of weight/scales/biases")
            path = mlx_name(base + ".weight")[: -len(".weight")]
            mod = modules.get(path)
            if mod is None:
                raise CheckpointError(f"canonical tensor {name!r} has no place in the {cfg.model_type} model")
            qspec[path] = _quant_spec(mod, path, np.asarray(canon[base + ".weight"]), np.asarray(canon[name]))
    if qspec:
        nn.quantize(model, class_predicate=lambda p, m: qspec.get(p, False))

    expected = dict(tree_flatten(model.parameters()))
    weights = []
    for name, arr in canon.items():
        path = mlx_name(name)
        if path not in expected:
            raise CheckpointError(f"canonical tensor {name!r} has no place in the {cfg.model_type} model "
                                  f"(layers={cfg.num_hidden_layers}, moe={cfg.is_moe}); is the config right?")
        a = np.asarray(arr)
        if name.endswith("linear_attn.conv1d.weight") and a.ndim == 2:
            a = a[:, :, None]
        x = to_mx(a)
        if mx.issubdtype(x.dtype, mx.floating) and not name.endswith("A_log"):
            x = x.astype(dtype)
        elif name.endswith("A_log"):
            x = x.astype(mx.float32)
        if tuple(x.shape) != tuple(expected[path].shape):
            raise CheckpointError(f"{name}: shape {tuple(x.shape)} in the checkpoint, the config expects "
                                  f"{tuple(expected[path].shape)}")
        weights.append((path, x))
    got = {p for p, _ in weights}
    missing = [p for p in expected if p not in got]
    if missing:
        where = "MTP head" if missing[0].startswith("mtp.") else "model"
        raise CheckpointError(f"the checkpoint does not provide {where} parameter {missing[0]} "
                              f"({len(missing)} missing); is the checkpoint complete?")
    model.load_weights(weights, strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model


__all__ = ["load_mlx_model", "mlx_name", "DTYPES"]
