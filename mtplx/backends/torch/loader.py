"""Build a Qwen35Model (+ MTP head) from canonical weights.

    model = load_torch_model("path/to/checkpoint", dtype=torch.bfloat16, device="cpu")
    model = load_torch_model(canonical_iterator, config=cfg)        # (name, np.ndarray) pairs
    model = load_torch_model(raw_tensors_mapping, config=cfg)       # e.g. an HF state_dict as numpy

A folder goes through `mtplx.checkpoint.canonical.load_canonical` (inspect's tensor gate: a
checkpoint inspect rejects fails with inspect's reason). The model skeleton is built on the meta
device and every parameter is allocated once in its final dtype; each canonical tensor (a
memory-mapped view where the checkpoint layer needs no conversion) is copied straight into its
slot, so the weights are never held twice. Norm weights, A_log, dt_bias and the conv kernel stay
fp32. MLX-quantized tensors are dequantized with `mtplx.checkpoint.quant`.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mtplx.checkpoint.config import ModelConfig, load_config
from mtplx.checkpoint.errors import CheckpointError
from mtplx.checkpoint.shard import local_config, shard_rule, take_shard, vocab_slice

from .model import Qwen35Model
from .mtp import MtpHead

FP32_PARAMS = {"input_norm", "post_norm", "q_norm", "k_norm", "norm", "norm_emb", "norm_hid",
               "A_log", "dt_bias", "conv_w"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
PROGRESS_MIN_BYTES = 512 << 20


def _materialize(module: nn.Module, dtype: torch.dtype, device) -> None:
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is None:
                continue
            dt = torch.float32 if name in FP32_PARAMS else dtype
            m._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=dt, device=device), requires_grad=False)


def build_model(cfg: ModelConfig, dtype=torch.float32, device="cpu", mtp_layers: int = 0) -> Qwen35Model:
    """An uninitialised model (and head when mtp_layers > 0), every tensor allocated once."""
    with torch.device("meta"):
        model = Qwen35Model(cfg)
        if mtp_layers:
            model.mtp = MtpHead(cfg, mtp_layers)
    _materialize(model, dtype, device)
    model.rope.reset(device)
    if model.mtp is not None:
        model.mtp.attach(model)
    model.eval()
    return model


def _to_torch(a) -> torch.Tensor:
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        a = a.view(np.uint16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.from_numpy(a).view(torch.bfloat16)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("="))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.from_numpy(a)


_LAYER = re.compile(r"^(mtp\.)?layers\.(\d+)\.(.+)$")


def _slot(model: Qwen35Model, name: str):
    """canonical name -> (destination tensor view, expected shape or None)."""
    cfg = model.cfg
    top = {"embed_tokens.weight": model.embed, "norm.weight": model.norm}
    if name in top:
        return top[name]
    if name == "lm_head.weight":
        if model.lm_head is None:
            return None  # tied config with an lm_head tensor present: ignore
        return model.lm_head
    if name.startswith("mtp.") and not name.startswith("mtp.layers."):
        head = model.mtp
        sub = {"mtp.fc.weight": "fc", "mtp.pre_fc_norm_embedding.weight": "norm_emb",
               "mtp.pre_fc_norm_hidden.weight": "norm_hid", "mtp.norm.weight": "norm"}.get(name)
        if sub is None:
            raise KeyError(name)
        return getattr(head, sub)
    m = _LAYER.match(name)
    if not m:
        raise KeyError(name)
    layers = model.mtp.layers if m[1] else model.layers
    i, rest = int(m[2]), m[3]
    layer = layers[i]
    if rest == "input_layernorm.weight":
        return layer.input_norm
    if rest == "post_attention_layernorm.weight":
        return layer.post_norm
    mix = layer.mixer
    if rest.startswith("self_attn."):
        r = rest[len("self_attn."):]
        q, kv = mix.q_rows, mix.kv_rows
        return {"q_proj.weight": lambda: mix.qkv[:q], "k_proj.weight": lambda: mix.qkv[q:q + kv],
                "v_proj.weight": lambda: mix.qkv[q + kv:], "o_proj.weight": lambda: mix.o_proj,
                "q_norm.weight": lambda: mix.q_norm, "k_norm.weight": lambda: mix.k_norm}[r]()
    if rest.startswith("linear_attn."):
        r = rest[len("linear_attn."):]
        C, vd, nv = mix.C, mix.value_dim, mix.nv
        return {"in_proj_qkv.weight": lambda: mix.in_proj[:C], "in_proj_z.weight": lambda: mix.in_proj[C:C + vd],
                "in_proj_b.weight": lambda: mix.in_proj[C + vd:C + vd + nv],
                "in_proj_a.weight": lambda: mix.in_proj[C + vd + nv:],
                "conv1d.weight": lambda: mix.conv_w, "A_log": lambda: mix.A_log, "dt_bias": lambda: mix.dt_bias,
                "norm.weight": lambda: mix.gnorm, "out_proj.weight": lambda: mix.out_proj}[r]()
    if rest.startswith("mlp."):
        r = rest[len("mlp."):]
        mlp = layer.mlp
        if hasattr(mlp, "router"):  # MoE
            I, sI = mlp.I, mlp.shared.I
            table = {"gate.weight": lambda: mlp.router,
                     "experts.gate_proj": lambda: mlp.gate_up[:, :I], "experts.up_proj": lambda: mlp.gate_up[:, I:],
                     "experts.down_proj": lambda: mlp.down,
                     "shared_expert.gate_proj.weight": lambda: mlp.shared.gate_up[:sI],
                     "shared_expert.up_proj.weight": lambda: mlp.shared.gate_up[sI:],
                     "shared_expert.down_proj.weight": lambda: mlp.shared.down,
                     "shared_expert_gate.weight": lambda: mlp.shared_gate}
        else:
            I = mlp.I
            table = {"gate_proj.weight": lambda: mlp.gate_up[:I], "up_proj.weight": lambda: mlp.gate_up[I:],
                     "down_proj.weight": lambda: mlp.down}
        return table[r]()
    raise KeyError(name)


def _in_dim(name: str, cfg: ModelConfig) -> int | None:
    """The unquantized in-dim of canonical module `name` (from the config), or None."""
    from mtplx.checkpoint.layout import canonical_shapes

    shapes = getattr(cfg, "_mtplx_canon_shapes", None)
    if shapes is None:
        shapes = canonical_shapes(cfg, 1)
        object.__setattr__(cfg, "_mtplx_canon_shapes", shapes)
    key = re.sub(r"^mtp\.layers\.\d+\.", "mtp.layers.0.", name)
    shp = shapes.get(key) or shapes.get(key + ".weight")
    return shp[-1] if shp else None


def _dequantize(name: str, parts: dict, cfg: ModelConfig) -> np.ndarray:
    try:
        from mtplx.checkpoint import quant
    except ImportError as e:  # pragma: no cover
        raise CheckpointError(f"{name} is MLX-quantized and mtplx.checkpoint.quant is unavailable: {e}") from None
    # bits and group size from the packed width, the group count and the module's in-dim: right for
    # per-module overrides too (the config default group size alone would misread a module quantized
    # with another group size, e.g. an 8-bit g64 router in a g32 model)
    W, G, K = parts["weight"].shape[-1], parts["scales"].shape[-1], _in_dim(name, cfg)
    if K and G and K % G == 0 and (W * 32) % K == 0 and W * 32 // K in quant.SUPPORTED_BITS:
        gs, bits = K // G, W * 32 // K
    else:
        gs = cfg.quantization.group_size if cfg.quantization else 64
        bits = quant.infer_bits(parts["weight"].shape, parts["scales"].shape, gs)
    if bits is None:
        raise CheckpointError(f"{name}: cannot infer quantization bits from weight {parts['weight'].shape} "
                              f"and scales {parts['scales'].shape} with group size {gs}")
    return quant.dequantize(np.asarray(parts["weight"]), np.asarray(parts["scales"]), np.asarray(parts["biases"]),
                            gs, bits, dtype=np.float32)


def _mtp_layer_count(cfg: ModelConfig) -> int:
    return int(cfg.num_mtp_layers) if cfg.num_mtp_layers else 1


def _checkpoint_bytes(path: Path) -> int:
    try:
        return sum(f.stat().st_size for f in path.rglob("*.safetensors"))
    except OSError:
        return 0


def load_torch_model(source, dtype=torch.bfloat16, device="cpu", *, config: ModelConfig | None = None,
                     include_mtp: bool = True, progress: bool | None = None, mtp_hidden: str = "post",
                     source_norm_convention="auto", kernel: str | None = None,
                     quantize: str | None = None, draft_lm_head: str = "auto",
                     shard: tuple[int, int] | None = None) -> Qwen35Model:
    """Load a model from a checkpoint folder, a canonical (name, array) iterable, or a raw tensor
    mapping (+ config). Returns an eval-mode Qwen35Model with `model.mtp` set when the checkpoint
    has a head (and include_mtp). kernel: the exact path (Qwen35Model.set_kernel): "auto" (default,
    or $MTPLX_KERNEL: the compiled kernels where the CPU has them, built once on first use),
    "fused" (the whole step in one compiled call), "rowmm" (the compiled ops one by one) or
    "torch". draft_lm_head:
    the lm_head precision the MTP head drafts with, "auto" | "int8" | "full" (MtpHead.set_draft_lm_head).
    shard: (rank, world) loads only that tensor-parallel rank's slice of every tensor
    (mtplx.checkpoint.shard; a memory-mapped checkpoint then reads only those bytes): the model
    of one rank, to be run by mtplx.backends.torch.tp."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported; use one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    # tensor parallel: the checkpoint layer yields this rank's slices (each expert sliced before
    # stacking); what it cannot slice (a raw canonical iterator, MLX-quantized parts) is sliced here
    select = None if shard is None else (lambda name, a: take_shard(a, shard_rule(name, cfg, *shard)))
    presliced = shard is not None and isinstance(source, (str, Path, Mapping))
    cfg, items, nbytes = _canonical_items(source, config, include_mtp, source_norm_convention, select)

    model = _build(cfg, dtype, device, shard)
    if mtp_hidden not in ("post", "pre"):
        raise ValueError(f"mtp_hidden must be 'post' or 'pre', got {mtp_hidden!r}")
    model.mtp_hidden = mtp_hidden
    filled: set[tuple[int, str]] = set()  # (storage pointer of the parameter, canonical name)
    quant_parts: dict[str, dict] = {}

    def assign(name: str, arr, sliced: bool = presliced) -> None:
        if name.startswith("mtp.") and model.mtp is None:
            if not include_mtp:
                return
            m = re.match(r"^mtp\.layers\.(\d+)\.", name)
            n_layers = max(_mtp_layer_count(cfg), int(m[1]) + 1 if m else 1)
            with torch.device("meta"):
                model.mtp = MtpHead(model.cfg, n_layers)
            _materialize(model.mtp, dtype, device)
            model.mtp.attach(model)
        try:
            dst = _slot(model, name)
        except (KeyError, IndexError, AttributeError):
            raise CheckpointError(f"canonical tensor {name!r} has no place in the {cfg.model_type} model "
                                  f"(layers={cfg.num_hidden_layers}, moe={cfg.is_moe}); is the config right?") from None
        if dst is None:
            return
        if shard is not None and not sliced:
            arr = take_shard(arr, shard_rule(name, cfg, *shard))
        src = _to_torch(arr)
        if tuple(src.shape) != tuple(dst.shape):
            raise CheckpointError(f"{name}: shape {tuple(src.shape)} in the checkpoint, the config expects "
                                  f"{tuple(dst.shape)}")
        with torch.no_grad():
            dst.copy_(src)
        filled.add((dst.untyped_storage().data_ptr(), name))

    bar, task = _progress_bar(progress if progress is not None else nbytes >= PROGRESS_MIN_BYTES, nbytes)
    try:
        for name, arr in items:
            if name.endswith((".scales", ".biases")) or (name.endswith(".weight") and np.asarray(arr).dtype == np.uint32):
                mod, part = name.rsplit(".", 1)
                parts = quant_parts.setdefault(mod, {})
                parts[part] = arr
                if len(parts) == 3:
                    w = _dequantize(mod, quant_parts.pop(mod), cfg)
                    tgt = mod if re.search(r"experts\.(gate|up|down)_proj$", mod) else mod + ".weight"
                    assign(tgt, w, sliced=False)
            else:
                assign(name, arr)
            if bar is not None:
                bar.update(task, advance=int(getattr(arr, "nbytes", 0)), name=name)
    finally:
        if bar is not None:
            bar.stop()
    if quant_parts:
        raise CheckpointError(f"quantized module {next(iter(quant_parts))} lacks one of weight/scales/biases")
    _check_complete(model, filled, cfg)
    if shard is not None and model.lm_head is None:  # tied: this rank's vocab rows of the embedding
        a, b, _ = vocab_slice(cfg, *shard)
        model.lm_head = nn.Parameter(model.embed[a:b], requires_grad=False)
    return _finish(model, quantize, kernel, draft_lm_head)


def _progress_bar(show: bool, nbytes: int):
    """A started rich progress bar over the checkpoint's bytes and its task, or (None, None)."""
    if not show:
        return None, None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("loading weights"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[name]}"), transient=True)
    bar.start()
    return bar, bar.add_task("load", total=nbytes or None, name="")


def _canonical_items(source, config, include_mtp: bool, norm_convention, select):
    """-> (config, canonical (name, array) iterator, checkpoint bytes or 0) of a folder, a raw
    tensor mapping (+ config) or a canonical iterator (+ config)."""
    if isinstance(source, (str, Path)):
        from mtplx.checkpoint.canonical import load_canonical

        path = Path(source)
        cfg = config or load_config(path)
        items = load_canonical(path, include_mtp=include_mtp, source_norm_convention=norm_convention, select=select)
        return cfg, items, _checkpoint_bytes(path)
    if isinstance(source, Mapping):
        if config is None:
            raise ValueError("load_torch_model: a tensor mapping needs config=ModelConfig")
        from mtplx.checkpoint.canonical import canonical_weights

        items = canonical_weights(source, config, include_mtp=include_mtp, source_norm_convention=norm_convention,
                                  select=select)
        return config, items, 0
    if isinstance(source, Iterable):
        if config is None:
            raise ValueError("load_torch_model: a canonical iterator needs config=ModelConfig")
        return config, iter(source), 0
    raise TypeError(f"load_torch_model: expected a folder, a mapping or an iterable, got {type(source).__name__}")


def _finish(model: Qwen35Model, quantize: str | None, kernel: str | None, draft_lm_head: str) -> Qwen35Model:
    """Weight-only int8 (backends/torch/int8.py, docs/quantization.md), the exact-path kernel and
    the MTP head's draft lm_head."""
    if quantize is not None:
        if quantize != "int8":
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        from .int8 import quantize_int8

        quantize_int8(model)
    model.set_kernel(kernel or os.environ.get("MTPLX_KERNEL", "auto"))
    if model.mtp is not None:
        model.mtp.set_draft_lm_head(draft_lm_head)
    return model


def _build(cfg: ModelConfig, dtype, device, shard) -> Qwen35Model:
    """The skeleton to fill: the whole model, or one tensor-parallel rank's shard of it (heads
    and widths divided, its own slice of the lm_head rows)."""
    if shard is None:
        return build_model(cfg, dtype, device, mtp_layers=0)
    rank, world = shard
    model = build_model(local_config(cfg, world), dtype, device, mtp_layers=0)
    if model.lm_head is not None:
        a, b, _ = vocab_slice(cfg, rank, world)
        model.lm_head = nn.Parameter(torch.empty(b - a, cfg.hidden_size, dtype=dtype, device=device),
                                     requires_grad=False)
    return model


def _check_complete(model: Qwen35Model, filled: set, cfg: ModelConfig) -> None:
    """Every parameter must have been written (fused ones by all their parts)."""
    written: dict[int, set] = {}
    for ptr, name in filled:
        written.setdefault(ptr, set()).add(name)
    need_parts = {}
    for layer in list(model.layers) + (list(model.mtp.layers) if model.mtp is not None else []):
        mix = layer.mixer
        if layer.is_attn:
            need_parts[id(mix.qkv)] = 3
        else:
            need_parts[id(mix.in_proj)] = 4
        mlp = layer.mlp
        need_parts[id(mlp.gate_up)] = 2
        if hasattr(mlp, "shared"):
            need_parts[id(mlp.shared.gate_up)] = 2
    for n, p in model.named_parameters():
        got = len(written.get(p.untyped_storage().data_ptr(), ()))
        if got < need_parts.get(id(p), 1):
            where = "MTP head" if n.startswith("mtp.") else "model"
            raise CheckpointError(f"the checkpoint does not provide {where} parameter {n} "
                                  f"(found {got} of {need_parts.get(id(p), 1)} parts); is the checkpoint complete?")


__all__ = ["load_torch_model", "build_model", "DTYPES"]


# Below this many bytes of weights a CPU model runs on ONE torch thread by default: its ops are
# too small to split (each costs microseconds), and with 2+ OpenMP threads on a shared, loaded
# machine the workers spin-wait for a busy core. Measured on the embedded default model (15 MB),
# 2-core machine with a background job: 1 thread 39-112 tok/s, 2 threads 2-11 tok/s.
SMALL_MODEL_BYTES = 256 * 2**20


def default_threads(model) -> int | None:
    """The torch thread count to use for `model` when the user chose none: 1 for a small CPU
    model, None (torch's own choice) otherwise or when OMP_NUM_THREADS / MTPLX_THREADS is set
    (MTPLX_THREADS wins)."""
    env = os.environ.get("MTPLX_THREADS")
    if env:
        return max(1, int(env))
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        if model.device.type != "cpu":
            return None
        size = sum(p.numel() * p.element_size() for p in model.parameters())
    except Exception:
        return None
    return 1 if size < SMALL_MODEL_BYTES else None


def apply_default_threads(model) -> int:
    """Set torch's thread count to `default_threads(model)` when it gives one; returns the count in use.
    A small model lowered to one decode thread keeps torch's own count for its prefill blocks
    (`model.prefill_threads`): 256-token blocks are big ops, which split well (measured on the
    default model, 2 cores: 8k-token prefill 5 240 tok/s on 2 threads, 2 462 on 1)."""
    import torch

    if getattr(model, "tp", None) is not None:  # tensor parallel: each rank has set its own count
        return torch.get_num_threads()
    n = default_threads(model)
    if n is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        if before > n and getattr(model, "device", None) is not None and model.device.type == "cpu":
            model.prefill_threads = before
    return torch.get_num_threads()
