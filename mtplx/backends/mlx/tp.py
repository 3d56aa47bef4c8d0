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

from mtplx.checkpoint.shard import TPError, check_tp

STOP, PREFILL, STEP, HEAD, PROMPT_LOGITS = 1, 2, 3, 4, 5
NEW_CACHE, NEW_HEAD_CACHE, FREE, KEEP, SET_LENGTH, HEAD_TRIM = 11, 12, 13, 14, 15, 16
_DTYPES = [None, mx.float32, mx.bfloat16, mx.float16]
HEADER = 256


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
    """Messages from rank 0 to every other rank: (op, side ops, ints, optional 2-D array)."""

    def __init__(self, group):
        self.group = group
        self._side: list[int] = []

    def defer(self, code: int, a: int, b: int = 0) -> None:
        self._side.extend((code, int(a), int(b)))

    def send(self, op: int, ints: list[int], tensor: mx.array | None = None) -> None:
        side, self._side = self._side, []
        code = 0 if tensor is None else next(i for i, d in enumerate(_DTYPES) if i and d == tensor.dtype)
        msg = [op, len(side) // 3, len(ints), code, *side, *ints] + (list(tensor.shape) if tensor is not None else [])
        n = min(len(msg), HEADER - 1)
        head = mx.array([len(msg), *msg[:n]] + [0] * (HEADER - 1 - n), dtype=mx.int32)
        out = [head] + ([mx.array(msg[n:], dtype=mx.int32)] if len(msg) > n else []) + \
              ([tensor] if tensor is not None else [])
        for r in range(1, self.group.size()):
            for a in out:  # one at a time: sends in one eval have no order
                mx.eval(mx.distributed.send(a, r, group=self.group))

    def recv(self):
        head = mx.distributed.recv((HEADER,), mx.int32, 0, group=self.group).tolist()
        total, msg = head[0], head[1:1 + min(head[0], HEADER - 1)]
        if total > len(msg):
            msg += mx.distributed.recv((total - len(msg),), mx.int32, 0, group=self.group).tolist()
        op, n_side, n_ints, code = msg[:4]
        side = [tuple(msg[4 + 3 * i:7 + 3 * i]) for i in range(n_side)]
        o = 4 + 3 * n_side
        ints = msg[o:o + n_ints]
        tensor = None
        if code:
            tensor = mx.distributed.recv(tuple(msg[o + n_ints:]), _DTYPES[code], 0, group=self.group)
            mx.eval(tensor)
        return op, side, ints, tensor


class _Handle:
    """Rank 0's handle of a cache the other ranks know by `id`."""

    def __init__(self, local, cid: int, channel: Channel):
        self.__dict__.update(local=local, id=cid, _channel=channel)

    def __getattr__(self, name):
        return getattr(self.local, name)

    def __setattr__(self, name, value):
        if name == "length":
            self._channel.defer(SET_LENGTH, self.id, value)
        setattr(self.local, name, value)

    def keep(self, m: int) -> None:
        self._channel.defer(KEEP, self.id, m)
        self.local.keep(m)

    def trim(self, n: int):  # the head's KVCache
        self._channel.defer(HEAD_TRIM, self.id, n)
        return self.local.trim(n)

    def __del__(self):
        try:
            self._channel.defer(FREE, self.id)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


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
        self.channel.defer(NEW_CACHE, cid, max_len)
        return _Handle(self.local.new_cache(max_len), cid, self.channel)

    def new_head_cache(self):
        cid = next(self._ids)
        self.channel.defer(NEW_HEAD_CACHE, cid)
        return _Handle(KVCache(), cid, self.channel)

    def prefill(self, ids, cache):
        self.channel.send(PREFILL, [cache.id, *ids.tolist()])
        return self.local.prefill(ids, cache.local)

    def step(self, ids, cache):
        self.channel.send(STEP, [cache.id, *ids.tolist()])
        return self.local.step(ids, cache.local)

    def prompt_logits(self, ids):
        self.channel.send(PROMPT_LOGITS, ids.tolist())
        return self.local.prompt_logits(ids)

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
        for code, a, b in side:
            if code == NEW_CACHE:
                caches[a] = local.new_cache(b)
            elif code == NEW_HEAD_CACHE:
                caches[a] = KVCache()
            elif code == FREE:
                caches.pop(a, None)
            elif code == KEEP:
                caches[a].keep(b)
            elif code == SET_LENGTH:
                caches[a].length = b
            elif code == HEAD_TRIM:
                caches[a].trim(b)
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
