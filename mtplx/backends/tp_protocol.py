"""The tensor-parallel channel's messages, shared by the torch and MLX backends (no array library).

Rank 0 announces each forward as one message of ints: the op, the bookkeeping waiting to ride
along (side ops: caches made, rolled back, freed), the op's ints (ids, lengths, cache ids), and
the shape and dtype code of at most one array sent right after. Each backend moves the ints
and the array with its own collectives (backends/torch/tp_comm.py, backends/mlx/tp.py).
"""

from __future__ import annotations

import threading

# ops
STOP, PREFILL, STEP, HEAD, PROMPT_LOGITS, SYNC, EXPORT, IMPORT = 1, 2, 3, 4, 5, 6, 7, 8
# side ops (code, cache id, value)
NEW_CACHE, NEW_HEAD_CACHE, FREE, KEEP, SET_LENGTH, HEAD_TRIM = 11, 12, 13, 14, 15, 16
HEADER = 256  # ints in a message's first transfer; a longer one sends the rest after it


def encode(op: int, side: list[int], ints: list[int], code: int = 0, shape: tuple = ()) -> list[int]:
    """-> [length, op, #side, #ints, dtype code, side..., ints..., shape...]."""
    msg = [op, len(side) // 3, len(ints), code, *side, *ints, *shape]
    return [len(msg), *msg]


def decode(msg: list[int]):
    """encode's list without its length -> (op, [(code, id, value)], ints, dtype code, shape)."""
    op, n_side, n_ints, code = msg[:4]
    side = [tuple(msg[4 + 3 * i:7 + 3 * i]) for i in range(n_side)]
    o = 4 + 3 * n_side
    return op, side, msg[o:o + n_ints], code, tuple(msg[o + n_ints:])


class Outbox:
    """Side ops waiting for the next message (appended from any thread, even a finalizer)."""

    def __init__(self):
        self._ops: list[int] = []
        self._lock = threading.Lock()

    def defer(self, code: int, cid: int, value: int = 0) -> None:
        with self._lock:
            self._ops.extend((code, int(cid), int(value)))

    def take(self) -> list[int]:
        with self._lock:
            ops, self._ops = self._ops, []
        return ops


class CacheHandle:
    """Rank 0's handle of one cache: its own shard's cache plus the id the other ranks know it by;
    what changes the cache outside a forward (rollback, a restored length, a trimmed head cache,
    the end of the session) is mirrored to them."""

    def __init__(self, local, cid: int, outbox: Outbox):
        self.__dict__.update(local=local, id=cid, _outbox=outbox)

    def __getattr__(self, name):
        return getattr(self.local, name)

    def __setattr__(self, name, value):
        if name == "length":  # a prefix-cache restore moves the committed length
            self._outbox.defer(SET_LENGTH, self.id, value)
        setattr(self.local, name, value)

    def keep(self, m: int) -> None:
        self._outbox.defer(KEEP, self.id, m)
        self.local.keep(m)

    def trim(self, n: int):  # an MLX head cache drops its draft-time entries
        self._outbox.defer(HEAD_TRIM, self.id, n)
        return self.local.trim(n)

    def __del__(self):
        try:
            self._outbox.defer(FREE, self.id)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def apply_side(side, caches: dict, new_cache, new_head_cache) -> None:
    """A worker's side of the side ops: new_cache(max_len) / new_head_cache(max_len) make caches."""
    for code, cid, value in side:
        if code == NEW_CACHE:
            caches[cid] = new_cache(value)
        elif code == NEW_HEAD_CACHE:
            caches[cid] = new_head_cache(value)
        elif code == FREE:
            caches.pop(cid, None)
        elif code == KEEP:
            caches[cid].keep(value)
        elif code == SET_LENGTH:
            caches[cid].length = value
        elif code == HEAD_TRIM:
            caches[cid].trim(value)


__all__ = ["encode", "decode", "Outbox", "CacheHandle", "apply_side", "HEADER"]
