"""Prefix cache across requests (exact: see cache.py for why restoring blocks changes nothing).

    model = mtplx.load(None)
    model.enable_prefix_cache(gb=2)          # RAM tier; cache_dir=... adds the disk tier
    mtplx.generate(model, long_prompt)       # stats.cached_tokens on later, similar prompts
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .cache import DEFAULT_BLOCK, Block, CacheCounters, PrefixCache, chain_keys
from .disk import TOKENS, DiskTier, ForeignCacheError, weights_fingerprint

GB = 1 << 30


def model_identity(model, block: int) -> dict:
    """What must match for a stored block to reproduce this model's computation."""
    cfg_text = ""
    if model.path is not None and (Path(model.path) / "config.json").is_file():
        cfg_text = (Path(model.path) / "config.json").read_text()
    ident = {
        "config": hashlib.sha256(cfg_text.encode()).hexdigest(),
        "weights": weights_fingerprint(model.path),
        "backend": model.backend,
        "dtype": model.dtype,
        "device": str(model.device).split(":")[0],
        "block": int(block),
        "mtp_hidden": getattr(model.model, "mtp_hidden", "post"),
        "load_options": json.dumps(model.load_options, sort_keys=True, default=str),
    }
    if model.backend == "torch":
        import torch

        ident["framework"] = f"torch {torch.__version__}"
        ident["threads"] = getattr(model.model, "prefill_threads", None) or torch.get_num_threads()  # blocks' bits
        ident["kernel"] = getattr(model.model, "kernel", "torch")
    else:
        import mlx.core as mx

        ident["framework"] = f"mlx {getattr(mx, '__version__', '?')}"
    return ident


def _torch_io(device):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    def save(path: Path, payload: dict, meta: dict, tokens: list) -> None:
        t = {k: v.detach().cpu().clone() for k, v in payload.items()}  # own storage each (views of one buffer)
        t[TOKENS] = torch.tensor(tokens, dtype=torch.int32)
        save_file(t, str(path), metadata=meta)

    def load(path: Path) -> tuple[dict, dict]:
        from mtplx.backends.torch.session import packed_copy

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            return packed_copy(tensors), dict(f.metadata() or {})

    return save, load


def _mlx_io():
    import mlx.core as mx

    def save(path: Path, payload: dict, meta: dict, tokens: list) -> None:
        arrays = dict(payload)
        arrays[TOKENS] = mx.array(tokens, dtype=mx.int32)
        mx.save_safetensors(str(path), arrays, metadata=meta)

    def load(path: Path) -> tuple[dict, dict]:
        arrays, meta = mx.load(str(path), return_metadata=True)
        return dict(arrays), dict(meta)

    return save, load


def make_prefix_cache(model, gb: float = 4.0, block: int | None = None, ttl_s: float | None = None,
                      cache_dir: str | Path | None = None, disk_gb: float | None = None) -> PrefixCache:
    """A PrefixCache sized for `model` (an mtplx.api.Model): `gb` of RAM (or device memory),
    blocks of `block` tokens, optional TTL, optional disk tier in `cache_dir` (`disk_gb`, default
    4x the RAM budget)."""
    if gb < 0:
        raise ValueError(f"prefix cache size must be >= 0 GB, got {gb}")
    if ttl_s is not None and ttl_s <= 0:
        raise ValueError(f"prefix cache TTL must be > 0 seconds, got {ttl_s}")
    block = int(block or DEFAULT_BLOCK)
    if block < 1:
        raise ValueError(f"prefix cache block must be >= 1 token, got {block}")
    if model.backend == "torch":
        from mtplx.backends.torch.session import payload_nbytes

        io = _torch_io(model.device)
    else:
        from mtplx.backends.mlx.session import payload_nbytes

        io = _mlx_io()
    disk = None
    if cache_dir is not None:
        budget = disk_gb if disk_gb is not None else max(4 * gb, 1.0)
        disk = DiskTier(cache_dir, model_identity(model, block), block, int(budget * GB), *io)
    return PrefixCache(max_bytes=int(gb * GB), block_size=block, ttl_s=ttl_s, nbytes=payload_nbytes, disk=disk)


def default_cache_gb(device: str = "cpu") -> float:
    """4 GB, or a fifth of the memory when that is less (RAM on CPU, the GPU's on CUDA)."""
    total = 0
    try:
        if device.startswith("cuda"):
            import torch

            total = torch.cuda.get_device_properties(0).total_memory
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError, ImportError):
        total = 0
    return min(4.0, total / 5 / GB) if total else 4.0


__all__ = ["PrefixCache", "Block", "CacheCounters", "DiskTier", "ForeignCacheError", "chain_keys",
           "make_prefix_cache", "model_identity", "default_cache_gb", "DEFAULT_BLOCK"]
