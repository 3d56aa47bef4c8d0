"""The prefix cache: what a prompt's prefill computed, kept in fixed blocks for later prompts.

Why blocks, and why this is exact. A session prefills every prompt in blocks of `block_size`
tokens at absolute positions 0, B, 2B, ... (one parallel forward per full block), then the tail
(positions floor(P/B)*B .. P-1) in one more forward. So the state after a full block is a pure
function of the tokens up to its end - whichever prompt it was computed for, whatever came
after. A block here holds what that forward produced:
    target attention KV of its B positions, GatedDeltaNet conv + recurrent state at its end,
    the MTP head's KV of the pairs whose token lies in the block, the head's pending hidden;
and a new prompt restores its longest chain of cached blocks (ending before its last token)
and prefills only the rest - the very computations a cache-off run does after that point.
Positions decoded by the exact path (generated tokens) or in a prompt's tail are never stored:
a later, longer prompt computes them in a full block, with other bits.

Blocks are keyed by a hash chain (the parent's key + the block's tokens), shared by every
prompt that starts the same way, immutable once stored (safe for concurrent sessions), and
evicted least-recently-used by their payload bytes - leaves first, so no reachable block ever
loses its parent. The payload is backend arrays (dict name -> array); `nbytes` measures it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("mtplx.prefix")

DEFAULT_BLOCK = 256  # measured in docs/prefix-cache.md: prefill speed vs reuse granularity


@dataclass(eq=False)
class Block:
    key: bytes
    parent: bytes | None
    tokens: tuple[int, ...]
    payload: dict[str, Any]
    nbytes: int
    used_at: float = 0.0
    children: int = 0


@dataclass
class CacheCounters:
    """Cumulative, for /metrics; tokens are prompt tokens, bytes payload bytes."""

    lookups: int = 0
    hit_tokens: int = 0  # prompt tokens restored instead of prefilled
    miss_tokens: int = 0  # prompt tokens prefilled (looked up, not found)
    disk_hit_tokens: int = 0  # of hit_tokens, read back from the disk tier
    stored_tokens: int = 0
    stored_bytes: int = 0
    evicted_tokens: int = 0
    evicted_bytes: int = 0
    expired_tokens: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def chain_keys(ids: list[int], block: int) -> list[bytes]:
    """Keys of the full blocks of `ids`: key_k = H(key_{k-1} | tokens of block k)."""
    keys, prev = [], b"mtplx-prefix-v1"
    for k in range(len(ids) // block):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(array("i", ids[k * block:(k + 1) * block]).tobytes())
        prev = h.digest()
        keys.append(prev)
    return keys


@dataclass
class PrefixCache:
    """LRU store of prefill blocks, bounded by `max_bytes` (0 disables storing)."""

    max_bytes: int
    block_size: int = DEFAULT_BLOCK
    ttl_s: float | None = None  # drop blocks unused for this long (None: never)
    nbytes: Callable[[dict], int] = field(default=lambda payload: 0, repr=False)
    disk: Any = None  # mtplx.prefix.disk.DiskTier or None
    counters: CacheCounters = field(default_factory=CacheCounters)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"prefix cache block size must be >= 1, got {self.block_size}")
        if self.max_bytes < 0:
            raise ValueError(f"prefix cache budget must be >= 0 bytes, got {self.max_bytes}")
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()  # oldest use first
        self._lock = threading.RLock()
        self._bound: dict = {}
        self.bytes = 0

    # -- queries
    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 or self.disk is not None

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def tokens(self) -> int:
        return len(self._blocks) * self.block_size

    def chain(self, ids: list[int]) -> list[bytes]:
        return chain_keys(ids, self.block_size)

    def match(self, ids: list[int], keys: list[bytes]) -> list[Block]:
        """The longest run of cached blocks from position 0 that ends before the last token of
        `ids` (at least one token is always fed: its logits start the generation)."""
        B = self.block_size
        out: list[Block] = []
        with self._lock:
            self._expire()
            for k, key in enumerate(keys):
                if (k + 1) * B >= len(ids):
                    break
                blk = self._blocks.get(key)
                if blk is None and self.disk is not None:
                    blk = self.disk.load(key, self.nbytes)
                    if blk is not None and tuple(ids[k * B:(k + 1) * B]) == blk.tokens:
                        self._insert(blk, from_disk=True)  # (kept for this restore even if RAM is full)
                        self.counters.disk_hit_tokens += B
                if blk is None or blk.tokens != tuple(ids[k * B:(k + 1) * B]):
                    break
                out.append(blk)
            self._touch(out)
            self.counters.lookups += 1
            self.counters.hit_tokens += len(out) * B
            self.counters.miss_tokens += len(ids) - len(out) * B
        return out

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._blocks

    # -- updates
    def store(self, key: bytes, parent: bytes | None, tokens: list[int], payload: dict) -> bool:
        """Keep a freshly computed block (its payload must not be written to afterwards).
        False when it was there already or does not fit the budget."""
        if len(tokens) != self.block_size:
            raise ValueError(f"a prefix block holds {self.block_size} tokens, got {len(tokens)}")
        with self._lock:
            if key in self._blocks:
                self._touch([self._blocks[key]])
                return False
            if parent is not None and parent not in self._blocks:
                return False  # its parent was evicted meanwhile: it could never be reached
            blk = Block(key, parent, tuple(int(t) for t in tokens), payload, int(self.nbytes(payload)))
            if blk.nbytes > self.max_bytes:
                if self.disk is not None:
                    self.disk.save(blk)
                return False
            if not self._insert(blk):
                return False
            self.counters.stored_tokens += self.block_size
            self.counters.stored_bytes += blk.nbytes
            if self.disk is not None:
                self.disk.save(blk)
            return True

    def bind(self, name: str, value) -> None:
        """Record a setting every session of this cache must share (the first session sets it)."""
        with self._lock:
            have = self._bound.setdefault(name, value)
        if have != value:
            raise ValueError(f"this prefix cache holds blocks computed with {name}={have!r}; a session with "
                             f"{name}={value!r} cannot use them (give it its own cache)")

    def close(self, timeout: float = 30.0) -> None:
        """Finish the disk tier's pending writes (end of a process)."""
        if self.disk is not None:
            self.disk.flush(timeout)

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self.bytes = 0

    def _insert(self, blk: Block, from_disk: bool = False) -> bool:
        """Add a block (evicting others for room); False when nothing else could make room and
        it was dropped again (a chain longer than the budget keeps its first blocks)."""
        blk.used_at = self.clock()
        if blk.parent is not None and blk.parent in self._blocks:
            self._blocks[blk.parent].children += 1
        self._blocks[blk.key] = blk
        self.bytes += blk.nbytes
        self._touch(self._ancestors(blk))
        self._evict(keep=blk)
        if self.bytes > self.max_bytes:
            self._remove(blk)
            return False
        return True

    def _ancestors(self, blk: Block) -> list[Block]:
        chain = [blk]
        while chain[-1].parent is not None and chain[-1].parent in self._blocks:
            chain.append(self._blocks[chain[-1].parent])
        return chain[::-1]

    def _touch(self, chain: list[Block]) -> None:
        """Mark a root-first chain used, leaf first, so every parent stays newer than its children."""
        now = self.clock()
        for blk in reversed(chain):
            blk.used_at = now
            self._blocks.move_to_end(blk.key)

    def _remove(self, blk: Block) -> None:
        del self._blocks[blk.key]
        self.bytes -= blk.nbytes
        if blk.parent is not None and blk.parent in self._blocks:
            self._blocks[blk.parent].children -= 1

    def _evict(self, keep: Block | None = None) -> None:
        while self.bytes > self.max_bytes:
            victim = next((b for b in self._blocks.values() if b.children == 0 and b is not keep), None)
            if victim is None:
                break
            self._remove(victim)
            self.counters.evicted_tokens += self.block_size
            self.counters.evicted_bytes += victim.nbytes

    def _expire(self) -> None:
        if self.ttl_s is None:
            return
        limit = self.clock() - self.ttl_s
        while self._blocks:
            victim = next((b for b in self._blocks.values() if b.children == 0 and b.used_at < limit), None)
            if victim is None:
                return
            self._remove(victim)
            self.counters.expired_tokens += self.block_size


__all__ = ["Block", "CacheCounters", "PrefixCache", "chain_keys", "DEFAULT_BLOCK"]
