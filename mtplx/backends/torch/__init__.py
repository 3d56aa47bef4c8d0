"""The torch backend: our own Qwen3.5 / Qwen3.6 / Qwen3-Next model code with an MTP head.

    from mtplx.backends.torch import load_torch_model
    model = load_torch_model("ckpt/", dtype="bfloat16", device="cpu", kernel="auto")
    session = model.new_session(max_context=None, hidden_source=None)   # a TorchSession
    session.prefill(ids); first = session.sample_first(params, rng) ...  (mtplx/backends/base.py)

Training entry points (autograd-safe, parallel path):
    post, pre, logits = model.forward_hidden(ids [B, T])                # hiddens after / before norm
    logits = model.mtp.forward_train(hidden [B, T, H], next_ids [B, T])  # head, teacher-forced

Files: model.py (numerics, layers, target model), mtp.py (head), cache.py (caches with rollback),
loader.py (canonical weights -> model), session.py (the Session protocol), kernels.py (optional
compiled fixed-order few-row matmul), sampling.py (filtering, sampling, exact acceptance),
tp.py / tp_comm.py / tp_launch.py (tensor parallelism over torch.distributed, docs/tensor-parallel.md).
"""

from __future__ import annotations


def __getattr__(name):  # lazy: importing the package does not import torch
    if name in ("load_torch_model", "build_model"):
        from . import loader

        return getattr(loader, name)
    if name == "TorchSession":
        from .session import TorchSession

        return TorchSession
    if name in ("Qwen35Model", "check_row_invariance"):
        from . import model

        return getattr(model, name)
    if name == "MtpHead":
        from .mtp import MtpHead

        return MtpHead
    raise AttributeError(name)


__all__ = ["load_torch_model", "build_model", "TorchSession", "Qwen35Model", "MtpHead", "check_row_invariance"]
