"""MlxSession: one sequence being generated (the Session protocol of mtplx/backends/base.py).

The bookkeeping (positions, the head's pending pairs, commit) is `SessionBase`'s; this file holds
the MLX hooks. MLX is lazy: arrays are evaluated where the loop needs their values. The head cache
is mlx-lm's KVCache, which appends: draft-time entries are trimmed at commit. Prefix-cache
payloads (mtplx/prefix): "k.i" / "v.i" [1, nkv, B, hd] of attention layer i, "conv.i"
[1, K-1, C] / "state.i" of GatedDeltaNet layer i, "head.k" / "head.v", "hid" [1, H]; copies
(`_own`), so a stored block never keeps a session's whole buffer alive.
"""

from __future__ import annotations

import mlx.core as mx
from mtplx.backends.session_base import SessionBase

from . import sampling
from .model import AttnState


def _own(a: mx.array) -> mx.array:
    """A copy in its own buffer (a slice may be a view of the whole cache); x * 1 keeps every bit."""
    return a * mx.array(1, dtype=a.dtype)


class MlxSession(SessionBase):
    sampling = sampling

    def __init__(self, model, max_context: int | None = None, hidden_source: str | None = None,
                 prefix_cache=None, prefill_block: int | None = None):
        super().__init__(model, model.head, max_context, hidden_source, prefix_cache, prefill_block)
        self.head_cache = model.new_head_cache() if model.head is not None else None

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

    def _export_block(self, start: int, end: int) -> dict:
        out = cache_parts(self.cache, self.head_cache if self.has_head else None, start, end)
        if self.has_head:
            out["hid"] = _own(self._pend_h[0])
        if hasattr(self.model, "export_parts"):  # tensor parallel: the other ranks' slices too
            out.update(self.model.export_parts(self.cache, self.head_cache, start, end))
        mx.eval(*out.values())
        return out

    def _import_blocks(self, payloads: list[dict], end: int) -> None:
        if hasattr(self.model, "import_parts"):
            self.model.import_parts(self.cache, self.head_cache, payloads, end)
        restore_parts(self.cache, self.head_cache if self.has_head else None, payloads, end)

    def peak_memory_bytes(self) -> int:
        """mlx's peak memory on Apple GPUs (0 on CPU: the loop falls back to the process RSS)."""
        if not mx.metal.is_available():
            return 0
        fn = getattr(mx, "get_peak_memory", None) or getattr(mx.metal, "get_peak_memory", None)
        return int(fn()) if fn else 0


def cache_parts(cache, head_cache, start: int, end: int) -> dict:
    """Copies of what positions start..end-1 left in one rank's caches (see the module docstring)."""
    out = {}
    for i, c in enumerate(cache.layers):
        if isinstance(c, AttnState):
            out[f"k.{i}"] = _own(c.inner.keys[..., start:end, :])
            out[f"v.{i}"] = _own(c.inner.values[..., start:end, :])
        else:
            out[f"conv.{i}"], out[f"state.{i}"] = _own(c.inner[0]), _own(c.inner[1])
    if head_cache is not None and head_cache.keys is not None:
        a = max(start - 1, 0)
        out["head.k"] = _own(head_cache.keys[..., a:end - 1, :])
        out["head.v"] = _own(head_cache.values[..., a:end - 1, :])
    return out


def restore_parts(cache, head_cache, payloads: list[dict], end: int) -> None:
    """Set one rank's caches to the state after positions 0..end-1 from consecutive block payloads."""
    for i, c in enumerate(cache.layers):
        if isinstance(c, AttnState):
            k = mx.concatenate([p[f"k.{i}"] for p in payloads], axis=2)
            v = mx.concatenate([p[f"v.{i}"] for p in payloads], axis=2)
            c.inner.state = (k, v, end)
        else:
            c.inner[0], c.inner[1] = payloads[-1][f"conv.{i}"], payloads[-1][f"state.{i}"]
    cache.length = end
    parts = [p for p in payloads if "head.k" in p]
    if head_cache is not None and parts:
        head_cache.state = (mx.concatenate([p["head.k"] for p in parts], axis=2),
                            mx.concatenate([p["head.v"] for p in parts], axis=2), end - 1)


def payload_nbytes(payload: dict) -> int:
    return sum(a.nbytes for a in payload.values())


__all__ = ["MlxSession", "payload_nbytes", "cache_parts", "restore_parts"]
