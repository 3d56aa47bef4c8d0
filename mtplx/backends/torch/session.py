"""TorchSession: one sequence being generated (the Session protocol of mtplx/backends/base.py).

The bookkeeping (positions, the head's pending pairs, commit) is `SessionBase`'s; this file holds
the torch hooks. The head cache is a preallocated AttnCache written by position, so draft-time
entries need no trimming: the next batched head rebuild overwrites them.
"""

from __future__ import annotations

import torch

from mtplx.backends.session_base import SessionBase

from . import sampling
from .cache import AttnCache


class TorchSession(SessionBase):
    sampling = sampling

    def __init__(self, model, max_context: int | None = None, hidden_source: str | None = None):
        super().__init__(model, model.mtp, max_context, hidden_source)
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


# every protocol call runs without autograd bookkeeping
for _name in ("prefill", "sample_first", "draft", "verify", "accept", "commit"):
    setattr(TorchSession, _name, torch.inference_mode()(getattr(SessionBase, _name)))

__all__ = ["TorchSession"]
