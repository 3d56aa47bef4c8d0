"""Weight-only int8 on load (`--quantize int8`): per-output-row symmetric int8 weights, matmul by
`torch._weight_int8pack_mm` (activations stay in the model dtype, no activation quantization).

    quantize_int8(model)   # in place; returns the number of matrices converted

Why weight-only: dynamic int8 (torch.ao) quantizes activations with one scale per CALL, so a
row's result depends on the other rows of the batch: verify would no longer equal decode and
greedy MTP would drift from depth 0. `_weight_int8pack_mm` computes each row on its own
(measured: rows of 1..8-row calls are bit-identical), so the exact path keeps its contract.
Left in the model dtype: embeddings (gathered, not multiplied), routers and the shared-expert
gate (fp32-sensitive routing), the MTP head's fc (called through F.linear directly), 1-D params.
See docs/quantization.md for the measured speed.
"""

from __future__ import annotations

import torch

# parameter names that are [.., out, in] matrices fed to exact_linear / plain_linear
_MATRICES = ("qkv", "o_proj", "in_proj", "out_proj", "gate_up", "down", "lm_head")


class Int8Weight:
    """int8 codes [.., N, K] and scales [.., N] (model dtype); w ~ q * scale[:, None]."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        self.q, self.scale = q, scale

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "Int8Weight":
        wf = w.detach().float()
        scale = (wf.abs().amax(-1) / 127.0).clamp_min(1e-12)
        q = torch.round(wf / scale[..., None]).clamp_(-127, 127).to(torch.int8).contiguous()
        # scales (and the matmul's activations) in bf16 whatever the model dtype: the kernel's fast
        # path on CPU (fp32 activations measured ~6x slower than bf16 ones)
        return cls(q, scale.to(torch.bfloat16).contiguous())

    @property
    def shape(self):
        return self.q.shape

    @property
    def dtype(self):
        return self.scale.dtype

    @property
    def ndim(self):
        return self.q.ndim

    def __getitem__(self, idx) -> "Int8Weight":  # experts: w[e]
        return Int8Weight(self.q[idx], self.scale[idx])

    @property
    def scale_f32(self) -> torch.Tensor:  # the fixed-order kernel's scales (kernels.py)
        if getattr(self, "_scale_f32", None) is None:
            self._scale_f32 = self.scale.float().contiguous()
        return self._scale_f32

    def dequantize(self) -> torch.Tensor:
        return self.q.to(self.scale.dtype) * self.scale[..., None]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N]."""
        lead = x.shape[:-1]
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(self.scale.dtype).contiguous(), self.q, self.scale)
        return y.reshape(*lead, -1).to(x.dtype)


def quantize_int8(model) -> int:
    """Convert the model's (and head's) linear matrices to Int8Weight in place."""
    n = 0
    tied = getattr(model, "lm_head", None) is None
    for mod in model.modules():
        for name in _MATRICES:
            p = mod._parameters.get(name)
            if p is None or p.ndim < 2 or not p.dtype.is_floating_point:
                continue
            if name == "lm_head" and tied:
                continue
            w = Int8Weight.from_float(p)
            del mod._parameters[name]
            setattr(mod, name, w)
            n += 1
    model.quantized = "int8"
    return n


__all__ = ["Int8Weight", "quantize_int8"]
