"""Tensor parallelism on MLX over `mx.distributed` (ring on CPU / Thunderbolt, any backend mlx.launch sets up).

    mlx.launch --backend ring -n 2 -- mtplx generate --backend mlx --tp 2 --prompt ...   # one machine
    mlx.launch --hostfile hosts.json -- mtplx serve --backend mlx --tp 2                  # N Macs

Every rank loads the model and shards it with mlx-lm's own Qwen3.5 sharding (`Model.shard`:
column / row parallel linears, heads split, KV heads repeated past their count, experts split
along their intermediate dim, vocab-parallel lm_head), applied to the target's layers and the MTP
head's layer alike. mlx-lm's modules sum their partial outputs with `all_sum` inside; the exact
path adds the one its GatedDeltaNet step bypasses. Row invariance survives the sum: the exact path
runs every row-wise module on fixed chunks of `row_bucket` rows, so every `all_sum` of a decode
or a verify has the same shape, the same ring chunks and so the same order of addition.

As on torch (mtplx/backends/torch/tp.py), rank 0 runs sessions, the loop, sampling and acceptance;
its `ParallelModel` announces each forward (ids, and the hidden rows for the head) to the other
ranks by `send`, and they run it on their shards in lockstep (`serve_worker`).
"""

from __future__ import annotations

import itertools
import os
import sys
from types import SimpleNamespace

import mlx.core as mx
from mlx_lm.models import qwen3_5 as q35
from mlx_lm.models.base import gather_last_axis
from mlx_lm.models.cache import KVCache

from mtplx.backends.tp_protocol import (EXPORT, HEAD, HEADER, IMPORT, NEW_CACHE, NEW_HEAD_CACHE, PREFILL, PROMPT_LOGITS, STEP, STOP,
                                       CacheHandle, Outbox, apply_side, decode, encode)
from mtplx.checkpoint.shard import TPError, check_tp

_DTYPES = [None, mx.float32, mx.bfloat16, mx.float16]


def under_launcher() -> bool:
    """Whether mlx.launch (or an MPI launcher) started this process as one of several ranks."""
    return "MLX_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ


def shard_model(model, group) -> None:
    """Shard an MlxModel (target + MTP head) in place over `group` with mlx-lm's sharding."""
    N = group.size()
    cfg = model.cfg
    check_tp(cfg, N)
    if not cfg.tie_word_embeddings and cfg.vocab_size % N:
        raise TPError(f"--tp {N}: mlx-lm's vocab-parallel lm_head needs the vocab ({cfg.vocab_size}) divisible by {N}")
    layers = list(model.layers) + (list(model.head.layers[:1]) if model.head is not None else [])
    lm = SimpleNamespace(args=model.args, lm_head=getattr(model, "lm_head", None), sharding_group=None)
    q35.Model.shard(SimpleNamespace(language_model=lm, layers=layers), group)
    if not cfg.tie_word_embeddings:
        model.lm_head = lm.lm_head
    model.tp_group = group
    model.lm_group = lm.sharding_group  # set when the lm_head is vocab-parallel: logits are gathered


def gather_logits(model, logits: mx.array) -> mx.array:
    group = getattr(model, "lm_group", None)
    return logits if group is None else gather_last_axis(logits, group)


class Channel:
    """Messages from rank 0 to every other rank (mtplx.backends.tp_protocol) by send / recv."""

    def __init__(self, group):
        self.group = group
        self.outbox = Outbox()

    def send(self, op: int, ints: list[int], tensor: mx.array | None = None) -> None:
        code = 0 if tensor is None else next(i for i, d in enumerate(_DTYPES) if i and d == tensor.dtype)
        msg = encode(op, self.outbox.take(), ints, code, () if tensor is None else tuple(tensor.shape))
        n = min(len(msg), HEADER)
        out = [mx.array(msg[:n] + [0] * (HEADER - n), dtype=mx.int32)]
        out += [mx.array(msg[n:], dtype=mx.int32)] if len(msg) > n else []
        out += [tensor] if tensor is not None else []
        for r in range(1, self.group.size()):
            for a in out:  # one at a time: sends in one eval have no order
                mx.eval(mx.distributed.send(a, r, group=self.group))

    def recv(self):
        head = mx.distributed.recv((HEADER,), mx.int32, 0, group=self.group).tolist()
        msg = head[1:1 + head[0]]
        if head[0] > len(msg):
            msg += mx.distributed.recv((head[0] - len(msg),), mx.int32, 0, group=self.group).tolist()
        op, side, ints, code, shape = decode(msg)
        tensor = None
        if code:
            tensor = mx.distributed.recv(shape, _DTYPES[code], 0, group=self.group)
            mx.eval(tensor)
        return op, side, ints, tensor


class _Head:
    def __init__(self, local, owner):
        self.__dict__.update(local=local, _owner=owner)

    def __getattr__(self, name):
        return getattr(self.local, name)

    def rows(self, target, hidden, next_ids, cache):
        ids = next_ids.tolist()
        self._owner.channel.send(HEAD, [cache.id, *ids], hidden)
        return self.local.rows(self._owner.local, hidden, next_ids, cache.local)


class ParallelModel:
    """Rank 0's MlxModel over the ranks (what an MlxSession calls, announced to the others)."""

    def __init__(self, local, group):
        self.__dict__.update(local=local, group=group, channel=Channel(group), _ids=itertools.count(1), closed=False)
        self.__dict__["head"] = None if local.head is None else _Head(local.head, self)

    def __getattr__(self, name):
        return getattr(self.local, name)

    def new_cache(self, max_len: int):
        cid = next(self._ids)
        self.channel.outbox.defer(NEW_CACHE, cid, max_len)
        return CacheHandle(self.local.new_cache(max_len), cid, self.channel.outbox)

    def new_head_cache(self):
        cid = next(self._ids)
        self.channel.outbox.defer(NEW_HEAD_CACHE, cid)
        return CacheHandle(KVCache(), cid, self.channel.outbox)

    def prefill(self, ids, cache):
        self.channel.send(PREFILL, [cache.id, *ids.tolist()])
        return self.local.prefill(ids, cache.local)

    def step(self, ids, cache):
        self.channel.send(STEP, [cache.id, *ids.tolist()])
        return self.local.step(ids, cache.local)

    def prompt_logits(self, ids):
        self.channel.send(PROMPT_LOGITS, ids.tolist())
        return self.local.prompt_logits(ids)

    # -- prefix cache: every rank's slice of a block, stored on rank 0 under "r<rank>/<name>"
    def export_parts(self, cache, head_cache, start: int, end: int) -> dict:
        self.channel.send(EXPORT, [cache.id, 0 if head_cache is None else head_cache.id, start, end])
        return {f"r{r}/{name}": a for r in range(1, self.group.size())
                for name, a in recv_arrays(self.group, r).items()}

    def import_parts(self, cache, head_cache, payloads: list[dict], end: int) -> None:
        self.channel.send(IMPORT, [cache.id, 0 if head_cache is None else head_cache.id, end, len(payloads)])
        for r in range(1, self.group.size()):
            for p in payloads:
                send_arrays(self.group, r, {k.split("/", 1)[1]: v for k, v in p.items() if k.startswith(f"r{r}/")})

    def new_session(self, max_context: int | None = None, hidden_source: str | None = None, **options):
        from .session import MlxSession

        return MlxSession(self, max_context=max_context, hidden_source=hidden_source, **options)

    def close(self) -> None:
        if not self.closed:
            self.__dict__["closed"] = True
            self.channel.send(STOP, [])


def serve_worker(local, group) -> None:
    """Every rank but 0: run what rank 0 announces on this rank's shard, until STOP."""
    channel = Channel(group)
    caches: dict[int, object] = {}
    while True:
        op, side, ints, tensor = channel.recv()
        apply_side(side, caches, local.new_cache, lambda _: KVCache())
        if op == STOP:
            return
        if op == PREFILL:
            mx.eval(*local.prefill(mx.array(ints[1:], dtype=mx.int32), caches[ints[0]]))
        elif op == STEP:
            mx.eval(*local.step(mx.array(ints[1:], dtype=mx.int32), caches[ints[0]]))
        elif op == HEAD:
            mx.eval(*local.head.rows(local, tensor, mx.array(ints[1:], dtype=mx.int32), caches[ints[0]]))
        elif op == PROMPT_LOGITS:
            mx.eval(local.prompt_logits(mx.array(ints, dtype=mx.int32)))
        elif op in (EXPORT, IMPORT):
            _prefix(group, op, ints, caches)


def _prefix(group, op: int, ints: list[int], caches: dict) -> None:
    """A prefix-cache block of this rank: sent to rank 0 (EXPORT) or restored from it (IMPORT)."""
    from .session import cache_parts, restore_parts

    cache, head = caches[ints[0]], caches.get(ints[1]) if ints[1] else None
    if op == EXPORT:
        send_arrays(group, 0, cache_parts(cache, head, ints[2], ints[3]))
    else:
        restore_parts(cache, head, [recv_arrays(group, 0) for _ in range(ints[3])], ints[2])


def send_arrays(group, dst: int, arrays: dict) -> None:
    """A dict of arrays to rank dst, as one pickled byte buffer (names, dtypes and shapes in it)."""
    import pickle

    import numpy as np

    mx.eval(*arrays.values())
    raw = {k: (str(a.dtype), np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)) for k, a in arrays.items()}
    buf = np.frombuffer(pickle.dumps(raw, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
    mx.eval(mx.distributed.send(mx.array([buf.size], dtype=mx.int64), dst, group=group))
    mx.eval(mx.distributed.send(mx.array(buf), dst, group=group))


def recv_arrays(group, src: int) -> dict:
    import pickle

    import numpy as np

    n = mx.distributed.recv((1,), mx.int64, src, group=group).item()
    raw = pickle.loads(np.array(mx.distributed.recv((n,), mx.uint8, src, group=group)).tobytes())
    out = {}
    for k, (dtype, a) in raw.items():
        x = mx.array(a)
        out[k] = x.view(mx.bfloat16) if dtype == str(mx.bfloat16) else x
    return out


def load_parallel(path, tp: int, **load_kwargs):
    """Under mlx.launch: join the group, load and shard; rank 0 returns its ParallelModel, the
    other ranks serve it and exit here."""
    import atexit

    from .loader import load_mlx_model

    if not under_launcher():
        raise ValueError(f"--tp {tp} on the MLX backend runs under mlx.launch: "
                         f"mlx.launch --backend ring -n {tp} -- mtplx ... --backend mlx --tp {tp} "
                         f"(docs/tensor-parallel.md)")
    group = mx.distributed.init(strict=True)
    if group.size() != tp:
        raise ValueError(f"--tp {tp} but mlx.launch started {group.size()} ranks: pass --tp {group.size()}")
    model = load_mlx_model(path, **load_kwargs)
    shard_model(model, group)
    mx.eval(model.parameters())
    if group.rank():
        serve_worker(model, group)
        sys.exit(0)
    par = ParallelModel(model, group)
    atexit.register(par.close)
    return par


__all__ = ["shard_model", "gather_logits", "ParallelModel", "serve_worker", "load_parallel", "under_launcher"]
