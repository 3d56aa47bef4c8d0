"""Tensor parallelism: one model over N processes, rank 0 driving (launch: tp_launch.py).

Every rank holds its shard (mtplx.checkpoint.shard) as an ordinary Qwen35Model whose decoder
layers sum their partial outputs over the ranks (tp_comm.TensorParallel). Rank 0 runs
everything else exactly as one process does: sessions, the decoding loop, sampling, acceptance,
the server. What it hands a session as "the model" is a `ParallelModel`: each forward it runs
(prefill, verify / decode step, MTP head rows, prompt logits) is first announced on the
channel with its token ids, so that the other ranks (`serve_worker`) run the same forward on
their shards in lockstep; the caches they fill are named by ids that rank 0 hands out. Only
decided ids travel: rank 0 samples, accepts and rolls back, and a rollback (`keep`) rides along
with the next forward. Logits exist on rank 0 only (gathered from the vocab slices).
"""

from __future__ import annotations

import itertools

import torch

from mtplx.backends import RankLost
from mtplx.backends.tp_protocol import (EXPORT, HEAD, IMPORT, NEW_CACHE, NEW_HEAD_CACHE, PREFILL, PROMPT_LOGITS,
                                       STEP, STOP, SYNC, CacheHandle, apply_side)

from .tp_comm import Channel, TensorParallel


def attach(model, tp: TensorParallel) -> None:
    """Make a rank's shard model sum its blocks over the ranks and gather its logits."""
    if model.kernel == "fused":  # the fused step has no collectives: the same kernels, op by op
        model.set_kernel("rowmm")
    model.tp = tp
    layers = list(model.layers) + (list(model.mtp.layers) if model.mtp is not None else [])
    for layer in layers:
        layer.tp = tp


LOST = ("Connection closed", "Connection reset", "Broken pipe", "NCCL error")  # a peer went away


class ParallelHead:
    """Rank 0's MTP head: announces its row forwards, then runs them on its own shard."""

    def __init__(self, local, owner: "ParallelModel"):
        self.__dict__.update(local=local, _owner=owner)

    def __getattr__(self, name):
        return getattr(self.local, name)

    def rows(self, hidden, next_ids, pos0: int, cache, drafting: bool = False):
        ids = next_ids.tolist()
        return self._owner.run(HEAD, [1, int(drafting), pos0, len(ids), cache.id, *ids], hidden,
                               lambda: self.local.rows(hidden, next_ids, pos0, cache.local, drafting=drafting))

    def rows_many(self, hidden, next_ids, spans, caches):
        ints = [len(spans), 1, *(p for p, _ in spans), *(T for _, T in spans), *(c.id for c in caches),
                *next_ids.tolist()]
        return self._owner.run(HEAD, ints, hidden,
                               lambda: self.local.rows_many(hidden, next_ids, spans, [c.local for c in caches]))


class ParallelModel:
    """Rank 0's view of a tensor-parallel model: what a TorchSession calls, announced to the
    other ranks; every other attribute is the local shard's (cfg: the shard's config, whose
    vocabulary and positions are the model's)."""

    def __init__(self, local, tp: TensorParallel, workers=None):
        self.__dict__.update(local=local, tp=tp, channel=Channel(tp), workers=workers, _ids=itertools.count(1),
                             closed=False, broken=None)
        self.__dict__["mtp"] = None if local.mtp is None else ParallelHead(local.mtp, self)

    def __getattr__(self, name):
        return getattr(self.local, name)

    def __setattr__(self, name, value):
        setattr(self.local, name, value)

    # -- caches
    def new_cache(self, max_len: int) -> CacheHandle:
        cid = next(self._ids)
        self.channel.outbox.defer(NEW_CACHE, cid, max_len)
        return CacheHandle(self.local.new_cache(max_len), cid, self.channel.outbox)

    def new_head_cache(self, max_len: int) -> CacheHandle:
        cid = next(self._ids)
        self.channel.outbox.defer(NEW_HEAD_CACHE, cid, max_len)
        return CacheHandle(self.local.new_head_cache(max_len), cid, self.channel.outbox)

    # -- forwards
    def run(self, op: int, ints: list[int], tensor, forward):
        """Announce a forward to the other ranks, then run it here. An error half-way (a rank
        lost, an interrupt) leaves the ranks out of step: the model refuses further work."""
        if self.broken is not None:
            raise RuntimeError(f"this tensor-parallel model stopped after an error ({self.broken}); load it again")
        try:
            self.channel.send(op, ints, tensor)
            return forward()
        except BaseException as e:
            lost = isinstance(e, RuntimeError) and any(w in str(e) for w in LOST)
            self.__dict__["broken"] = "a rank exited" if lost else type(e).__name__
            if lost:
                who = self.workers.exited(wait_s=1.0) if self.workers is not None else None
                raise RankLost(f"tensor-parallel {who or 'rank connection lost'}: the model is stopped, load it again") from e
            raise

    def prefill(self, ids: torch.Tensor, cache: CacheHandle):
        return self.run(PREFILL, [cache.id, *ids.tolist()], None, lambda: self.local.prefill(ids, cache.local))

    def step(self, ids: torch.Tensor, cache: CacheHandle):
        return self.step_many(ids, [ids.shape[0]], [cache])

    def step_many(self, ids: torch.Tensor, lengths: list[int], caches: list):
        ints = [len(lengths), *lengths, *(c.id for c in caches), *ids.tolist()]
        return self.run(STEP, ints, None, lambda: self.local.step_many(ids, lengths, [c.local for c in caches]))

    @torch.inference_mode()
    def prompt_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.run(PROMPT_LOGITS, ids.tolist(), None, lambda: self.local.prompt_logits(ids))

    # -- prefix cache: every rank's slice of a block, stored on rank 0 under "r<rank>/<name>"
    def export_parts(self, cache, head_cache, start: int, end: int) -> dict:
        ints = [cache.id, 0 if head_cache is None else head_cache.id, start, end]
        got = [None] * self.tp.world
        self.run(EXPORT, ints, None, lambda: torch.distributed.gather_object({}, got, dst=0))
        return {f"r{r}/{name}": t for r in range(1, self.tp.world) for name, t in got[r].items()}

    def import_parts(self, cache, head_cache, payloads: list[dict], end: int) -> None:
        ints = [cache.id, 0 if head_cache is None else head_cache.id, end]
        per_rank = [None] + [[{k.split("/", 1)[1]: v for k, v in p.items() if k.startswith(f"r{r}/")} for p in payloads]
                             for r in range(1, self.tp.world)]
        self.run(IMPORT, ints, None, lambda: torch.distributed.scatter_object_list([None], per_rank, src=0))

    def set_batch_threads(self, threads):  # a verify's bits must not depend on rank 0's thread count
        return None

    def new_session(self, max_context: int | None = None, hidden_source: str | None = None, **options):
        from .session import TorchSession

        return TorchSession(self, max_context=max_context, hidden_source=hidden_source, **options)

    def sync(self) -> None:
        """Send the waiting bookkeeping now (a forward would carry it anyway)."""
        self.run(SYNC, [], None, lambda: None)

    def close(self) -> None:
        """Stop the other ranks: they leave their loop and exit (killed when out of step)."""
        if self.closed:
            return
        self.__dict__["closed"] = True
        if self.workers is not None:
            self.workers.closing = True
        try:
            if self.broken is None:
                self.channel.send(STOP, [])
        finally:
            if self.workers is not None:
                if self.broken is None:
                    self.workers.join()
                else:
                    self.workers.kill()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


@torch.inference_mode()
def serve_worker(local, tp: TensorParallel) -> None:
    """The loop of every rank but 0: run what rank 0 announces, on this rank's shard, until STOP."""
    channel = Channel(tp)
    caches: dict[int, object] = {}
    while True:
        op, side, ints, tensor = channel.recv()
        apply_side(side, caches, local.new_cache, local.new_head_cache)
        if op == STOP:
            return
        if op == PREFILL:
            local.prefill(torch.tensor(ints[1:], device=local.device), caches[ints[0]])
        elif op == STEP:
            n = ints[0]
            lengths, cids = ints[1:1 + n], ints[1 + n:1 + 2 * n]
            local.step_many(torch.tensor(ints[1 + 2 * n:], device=local.device), lengths, [caches[c] for c in cids])
        elif op == HEAD:
            _head(local, ints, tensor, caches)
        elif op == PROMPT_LOGITS:
            local.prompt_logits(torch.tensor(ints, device=local.device))
        elif op in (EXPORT, IMPORT):
            _prefix(op, ints, caches)


def _prefix(op: int, ints: list[int], caches: dict) -> None:
    """A prefix-cache block of this rank: sent to rank 0 (EXPORT) or restored from it (IMPORT)."""
    from .session import cache_parts, restore_parts

    cache, head = caches[ints[0]], caches.get(ints[1]) if ints[1] else None
    if op == EXPORT:  # copies: a view would pickle the whole cache buffer
        parts = {k: v.clone() for k, v in cache_parts(cache, head, ints[2], ints[3]).items()}
        torch.distributed.gather_object(parts, None, dst=0)
    else:
        mine = [None]
        torch.distributed.scatter_object_list(mine, None, src=0)
        restore_parts(cache, head, mine[0], ints[2])


def _head(local, ints: list[int], hidden: torch.Tensor, caches: dict) -> None:
    n, drafting = ints[0], bool(ints[1])
    pos0s, lengths, cids = ints[2:2 + n], ints[2 + n:2 + 2 * n], ints[2 + 2 * n:2 + 3 * n]
    ids = torch.tensor(ints[2 + 3 * n:], device=local.device)
    if n == 1:
        local.mtp.rows(hidden, ids, pos0s[0], caches[cids[0]], drafting=drafting)
    else:
        local.mtp.rows_many(hidden, ids, list(zip(pos0s, lengths)), [caches[c] for c in cids])


__all__ = ["attach", "ParallelModel", "ParallelHead", "serve_worker"]
