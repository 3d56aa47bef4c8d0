"""MlxSession: one sequence being generated (the Session protocol of mtplx/backends/base.py).

The bookkeeping (positions, the head's pending pairs, commit) is `SessionBase`'s; this file holds
the MLX hooks. MLX is lazy: arrays are evaluated where the loop needs their values. The head cache
is mlx-lm's KVCache, which appends: draft-time entries are trimmed at commit.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from mtplx.backends.session_base import SessionBase

from . import sampling


class MlxSession(SessionBase):
    sampling = sampling

    def __init__(self, model, max_context: int | None = None, hidden_source: str | None = None):
        super().__init__(model, model.head, max_context, hidden_source)
        self.head_cache = KVCache() if model.head is not None else None

    def make_rng(self, seed: int | None) -> sampling.MlxRng:
        return sampling.make_rng(seed)

    def _ids(self, ids: list[int]) -> mx.array:
        return mx.array(ids, dtype=mx.int32)

    def _cat(self, arrays: list[mx.array]) -> mx.array:
        return mx.concatenate(arrays)

    def _head_rows(self, hid, ids, head_pos: int):
        return self.model.head.rows(self.model, hid, ids, self.head_cache)  # position = cache offset

    def _materialize(self, *arrays) -> None:
        mx.eval(*arrays)

    def _drop_draft_head_entries(self) -> None:
        extra = self.head_cache.offset - self.head_len
        if extra > 0:
            self.head_cache.trim(extra)

    def peak_memory_bytes(self) -> int:
        """mlx's peak memory on Apple GPUs (0 on CPU: the loop falls back to the process RSS)."""
        if not mx.metal.is_available():
            return 0
        fn = getattr(mx, "get_peak_memory", None) or getattr(mx.metal, "get_peak_memory", None)
        return int(fn()) if fn else 0


__all__ = ["MlxSession"]
