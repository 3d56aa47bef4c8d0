"""TorchSession: one sequence being generated (the Session protocol of mtplx/backends/base.py).

The bookkeeping (positions, the head's pending pairs, commit) is `SessionBase`'s; this file holds
the torch hooks. The head cache is a preallocated AttnCache written by position, so draft-time
entries need no trimming: the next batched head rebuild overwrites them. Prefix-cache payloads
(mtplx/prefix): "k.i" / "v.i" [nkv, B, hd] of attention layer i, "conv.i" [K-1, C] / "state.i"
[nv, dk, dv] of GatedDeltaNet layer i, "head.k" / "head.v" [nkv, n, hd], "hid" [1, H].
"""

from __future__ import annotations

import torch

from mtplx.backends.session_base import SessionBase

from . import sampling
from .cache import AttnCache


class TorchSession(SessionBase):
    sampling = sampling

    def __init__(self, model, max_context: int | None = None, hidden_source: str | None = None,
                 prefix_cache=None, prefill_block: int | None = None):
        super().__init__(model, model.mtp, max_context, hidden_source, prefix_cache, prefill_block)
        cfg = model.cfg
        self.head_cache = (AttnCache(cfg.num_key_value_heads, cfg.head_dim, model.dtype, model.device,
                                     self.max_context) if model.mtp is not None else None)

    def make_rng(self, seed: int | None) -> torch.Generator:
        return sampling.make_generator(seed, self.model.device)

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.model.device)

    def _cat(self, arrays: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(arrays)

    def _head_rows(self, hid, ids, head_pos: int):
        return self.model.mtp.rows(hid, ids, head_pos, self.head_cache, drafting=True)

    def _export_block(self, start: int, end: int) -> dict:
        out = {}
        for i, c in enumerate(self.cache.layers):
            if isinstance(c, AttnCache):
                out[f"k.{i}"], out[f"v.{i}"] = (t[:, start:end].clone() for t in (c.k, c.v))
            else:
                out[f"conv.{i}"], out[f"state.{i}"] = c.conv.clone(), c.state.clone()
        if self.has_head:
            a = max(start - 1, 0)
            out["head.k"], out["head.v"] = (t[:, a:end - 1].clone() for t in (self.head_cache.k, self.head_cache.v))
            out["hid"] = self._pend_h[0].clone()  # h[end-1], [1, H]
        return out

    def _import_blocks(self, payloads: list[dict], end: int) -> None:
        for i, c in enumerate(self.cache.layers):
            if isinstance(c, AttnCache):
                c.ensure(end)
                c.k[:, :end] = torch.cat([p[f"k.{i}"] for p in payloads], 1)
                c.v[:, :end] = torch.cat([p[f"v.{i}"] for p in payloads], 1)
            else:
                c.conv, c.state = payloads[-1][f"conv.{i}"].clone(), payloads[-1][f"state.{i}"].clone()
        self.cache.length = end
        if self.has_head and end > 1:
            hc = self.head_cache
            hc.ensure(end - 1)
            hc.k[:, :end - 1] = torch.cat([p["head.k"] for p in payloads], 1)
            hc.v[:, :end - 1] = torch.cat([p["head.v"] for p in payloads], 1)


def payload_nbytes(payload: dict) -> int:
    return sum(t.numel() * t.element_size() for t in payload.values())


# every protocol call runs without autograd bookkeeping
for _name in ("prefill", "sample_first", "draft", "verify", "accept", "commit"):
    setattr(TorchSession, _name, torch.inference_mode()(getattr(SessionBase, _name)))

__all__ = ["TorchSession", "payload_nbytes"]
