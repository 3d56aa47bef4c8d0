"""The collectives of tensor parallelism, on torch.distributed (gloo on CPU, NCCL on CUDA).

- `all_reduce`: a block's partial sums -> their sum on every rank, as an all-gather and a sum in
  rank order in fp32. Not dist.all_reduce: its ring / tree splits a tensor into chunks by size,
  so an element's order of addition could change with the number of rows, and verify rows
  would stop matching decode. Gathered, every element is p_0 + p_1 + ... + p_{N-1} whatever
  the row count, on every rank alike (the replicated residual stream stays identical).
- `gather_vocab`: each rank's lm_head slice of the logits -> the whole vocab on rank 0.
- `Channel`: rank 0 tells the other ranks what to run (mtplx/backends/tp_protocol.py: an op
  code and its ints in one int64 broadcast, plus at most one tensor); cheap bookkeeping (new /
  freed caches, rollbacks) rides along with the next forward instead of a broadcast of its own.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from mtplx.backends.tp_protocol import HEADER, Outbox, decode, encode


class TensorParallel:
    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.calls = 0  # collectives run and the seconds spent in them (benchmarks/bench_tp.py)
        self.comm_s = 0.0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] partial -> [..., H] summed
        t = time.perf_counter()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        self.calls += 1
        self.comm_s += time.perf_counter() - t
        out = parts[0].float()
        for p in parts[1:]:
            out = out + p.float()
        return out.to(x.dtype)

    def gather_vocab(self, logits: torch.Tensor, vocab: int):
        """logits [T, n_r] of this rank's vocab rows -> [T, vocab] on rank 0, None elsewhere."""
        width = -(-vocab // self.world)
        x = logits.contiguous()
        if x.shape[-1] < width:
            x = torch.cat([x, x.new_zeros(*x.shape[:-1], width - x.shape[-1])], -1)
        t = time.perf_counter()
        parts = [torch.empty_like(x) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0)
        self.calls += 1
        self.comm_s += time.perf_counter() - t
        if self.rank:
            return None
        return torch.cat(parts, -1)[..., :vocab]


_DTYPES = [None, torch.float32, torch.bfloat16, torch.float16]


class Channel:
    """Messages from rank 0 (mtplx.backends.tp_protocol): an int64 broadcast of HEADER slots,
    the rest of a longer message, then at most one tensor."""

    def __init__(self, tp: TensorParallel):
        self.tp = tp
        self.outbox = Outbox()

    def send(self, op: int, ints: list[int], tensor: torch.Tensor | None = None) -> None:
        code = 0 if tensor is None else _DTYPES.index(tensor.dtype)
        msg = encode(op, self.outbox.take(), ints, code, () if tensor is None else tuple(tensor.shape))
        head = torch.zeros(HEADER, dtype=torch.long)
        n = min(len(msg), HEADER)
        head[:n] = torch.tensor(msg[:n], dtype=torch.long)
        self._bcast(head)
        if len(msg) > n:
            self._bcast(torch.tensor(msg[n:], dtype=torch.long))
        if tensor is not None:
            self._bcast(tensor.contiguous())

    def recv(self):
        """-> (op, side [(code, id, value)], ints, tensor | None) (the other ranks)."""
        head = self._bcast(torch.empty(HEADER, dtype=torch.long)).tolist()
        msg = head[1:1 + head[0]]
        if head[0] > len(msg):
            msg += self._bcast(torch.empty(head[0] - len(msg), dtype=torch.long)).tolist()
        op, side, ints, code, shape = decode(msg)
        tensor = self._bcast(torch.empty(shape, dtype=_DTYPES[code])) if code else None
        return op, side, ints, tensor

    def _bcast(self, t: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        dev = self.tp.device
        x = t.to(dev) if t.device != dev else t
        dist.broadcast(x, src=0)
        self.tp.calls += 1
        self.tp.comm_s += time.perf_counter() - start
        return x


__all__ = ["TensorParallel", "Channel"]
