"""TorchSession: one sequence being generated (the Session protocol of mtplx/backends/base.py).

The bookkeeping (positions, the head's pending pairs, commit) is `SessionBase`'s; this file holds
the torch hooks. The head cache is a preallocated AttnCache written by position, so draft-time
entries need no trimming: the next batched head rebuild overwrites them. Prefix-cache payloads
(mtplx/prefix): "k.i" / "v.i" [nkv, B, hd] of attention layer i, "conv.i" [K-1, C] / "state.i"
[nv, dk, dv] of GatedDeltaNet layer i, "head.k" / "head.v" [nkv, n, hd], "hid" [1, H].
"""

from __future__ import annotations

import contextlib

import torch

from mtplx.backends.session_base import SessionBase

from . import sampling
from .cache import AttnCache


class TorchSession(SessionBase):
    sampling = sampling
    chain_drafts = True  # greedy drafts in one compiled call where the head allows (False: step by step)

    def __init__(self, model, max_context: int | None = None, hidden_source: str | None = None,
                 prefix_cache=None, prefill_block: int | None = None):
        super().__init__(model, model.mtp, max_context, hidden_source, prefix_cache, prefill_block)
        self.head_cache = model.new_head_cache(self.max_context) if model.mtp is not None else None

    def make_rng(self, seed: int | None) -> torch.Generator:
        return sampling.make_generator(seed, self.model.device)

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.model.device)

    def _cat(self, arrays: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(arrays)

    def _head_rows(self, hid, ids, head_pos: int):
        return self.model.mtp.rows(hid, ids, head_pos, self.head_cache, drafting=True)

    def _draft_chain(self, batch, depth: int, params) -> list[int] | None:
        """Greedy drafts without processors or an adaptive cut-off: all `depth` in one compiled
        call (mtp.draft_chain), else None (step by step)."""
        if self.processor is not None or params.draft_cutoff > 0 or not (params.greedy or params.greedy_draft):
            return None
        if not self.chain_drafts:
            return None
        hid, ids, pos = batch
        return self.model.mtp.draft_chain(hid, ids, pos, self.head_cache, depth, self.hidden_source == "post")

    @classmethod
    def _batch_threads(cls, model):  # exact path only: measured thread-invariant (set_batch_threads)
        return _threads(getattr(model, "batch_threads", None))

    @classmethod
    def _head_rows_many(cls, items: list) -> list:
        if len(items) == 1:
            return super()._head_rows_many(items)
        model = items[0][0].model
        spans = [(pos, hid.shape[0]) for _, hid, _, pos in items]
        g, u, logits = model.mtp.rows_many(torch.cat([h for _, h, _, _ in items]), torch.cat([x for _, _, x, _ in items]),
                                           spans, [s.head_cache for s, *_ in items])
        ends = [sum(T for _, T in spans[:i + 1]) for i in range(len(spans))]
        return [(g[e - 1:e], u[e - 1:e], logits[i]) for i, e in enumerate(ends)]

    def _export_block(self, start: int, end: int) -> dict:
        parts = cache_parts(self.cache, self.head_cache, start, end)
        if self.has_head:
            parts["hid"] = self._pend_h[0]  # h[end-1], [1, H]
        if hasattr(self.model, "export_parts"):  # tensor parallel: the other ranks' slices too
            parts.update(self.model.export_parts(self.cache, self.head_cache, start, end))
        return packed_copy(parts)

    def _import_blocks(self, payloads: list[dict], end: int) -> None:
        if hasattr(self.model, "import_parts"):
            self.model.import_parts(self.cache, self.head_cache, payloads, end)
        restore_parts(self.cache, self.head_cache, payloads, end)


def cache_parts(cache, head_cache, start: int, end: int) -> dict:
    """Views of what positions start..end-1 left in one rank's caches (see the module docstring)."""
    parts = {}
    for i, c in enumerate(cache.layers):
        if isinstance(c, AttnCache):
            parts[f"k.{i}"], parts[f"v.{i}"] = c.k[:, start:end], c.v[:, start:end]
        else:
            parts[f"conv.{i}"], parts[f"state.{i}"] = c.conv, c.state
    if head_cache is not None:
        a = max(start - 1, 0)
        parts["head.k"], parts["head.v"] = head_cache.k[:, a:end - 1], head_cache.v[:, a:end - 1]
    return parts


def restore_parts(cache, head_cache, payloads: list[dict], end: int) -> None:
    """Set one rank's caches to the state after positions 0..end-1 from consecutive block payloads."""
    for i, c in enumerate(cache.layers):
        if isinstance(c, AttnCache):
            c.ensure(end)
            c.k[:, :end] = torch.cat([p[f"k.{i}"] for p in payloads], 1)
            c.v[:, :end] = torch.cat([p[f"v.{i}"] for p in payloads], 1)
        else:
            c.conv, c.state = payloads[-1][f"conv.{i}"].clone(), payloads[-1][f"state.{i}"].clone()
    cache.length = end
    if head_cache is not None and end > 1:
        head_cache.ensure(end - 1)
        head_cache.k[:, :end - 1] = torch.cat([p["head.k"] for p in payloads], 1)
        head_cache.v[:, :end - 1] = torch.cat([p["head.v"] for p in payloads], 1)


def packed_copy(parts: dict) -> dict:
    """Copies of `parts` laid out in one buffer per dtype (a block is one allocation, not 30:
    what the allocator holds for it is then what it reports)."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, t in parts.items():
        by_dtype.setdefault(t.dtype, []).append(name)
    out = {}
    for dtype, names in by_dtype.items():
        flat = torch.empty(sum(parts[n].numel() for n in names), dtype=dtype, device=parts[names[0]].device)
        o = 0
        for n in names:
            t = parts[n]
            view = flat[o:o + t.numel()].view(t.shape)
            view.copy_(t)
            out[n] = view
            o += t.numel()
    return out


def payload_nbytes(payload: dict) -> int:
    return sum(t.numel() * t.element_size() for t in payload.values())


# every protocol call runs without autograd bookkeeping
for _name in ("prefill", "sample_first", "draft", "verify", "accept", "commit"):
    setattr(TorchSession, _name, torch.inference_mode()(getattr(SessionBase, _name)))
TorchSession.verify_many = classmethod(torch.inference_mode()(SessionBase.verify_many.__func__))
TorchSession.draft_many = classmethod(torch.inference_mode()(SessionBase.draft_many.__func__))


@contextlib.contextmanager
def _threads(n: int | None):
    base = torch.get_num_threads()
    if not n or n == base:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(base)


def _block_context(self, full: bool):
    # more threads only for a full block: a short tail's few rows would only wait for them
    return _threads(getattr(self.model, "prefill_threads", None) if full else None)


TorchSession._block_context = _block_context


def _prefill_blocks(self, prompt_ids):
    blocks = SessionBase.prefill_blocks(self, prompt_ids)
    while True:  # inference mode around each block only, never across a yield
        with torch.inference_mode():
            try:
                end = next(blocks)
            except StopIteration:
                return
        yield end


TorchSession.prefill_blocks = _prefill_blocks

__all__ = ["TorchSession", "payload_nbytes", "packed_copy"]
