"""The MLX backend (Apple Silicon; runs on Linux CPU with `mlx[cpu]` for tests, slowly).

Built on mlx-lm's Qwen3.5 / Qwen3.5-MoE modules; adds the MTP head, caches with per-position
GatedDeltaNet rollback, a batch-invariant verify path and MLX-native exact acceptance.
Importing this package needs `mlx` and `mlx-lm` (`pip install 'mtplx[mlx]'`).

    from mtplx.backends.mlx import load
    model = load("path/to/checkpoint", dtype="bfloat16")
    session = model.new_session()          # an MlxSession (mtplx/backends/base.py protocol)
"""

from __future__ import annotations

from .loader import load_mlx_model
from .model import MlxModel
from .session import MlxSession

load = load_mlx_model


def default_dtype() -> str:
    """bfloat16 on Apple GPUs; float32 on CPU (mlx's CPU GatherMM, used by MoE, is fp32-only)."""
    import mlx.core as mx

    return "bfloat16" if mx.metal.is_available() else "float32"


def device_name() -> str:
    import mlx.core as mx

    return "gpu" if mx.metal.is_available() else "cpu"


__all__ = ["load", "load_mlx_model", "MlxModel", "MlxSession", "default_dtype", "device_name"]
