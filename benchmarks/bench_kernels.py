"""The exact-path CPU kernels alone: matmul read bandwidth per shape and attention at long contexts.

    python benchmarks/bench_kernels.py                  # 1 thread
    python benchmarks/bench_kernels.py --threads 2 --json out.json

- matmul: y = x [M, K] @ w [N, K].T for the Qwen3.5 dense / MoE shapes, bf16 weights read from
  DRAM (copies of the matrix cycled past the caches): the AVX512-BF16 dot path (`rowmm_bf16`, where
  the CPU has it), the fp32-accumulate path (`rowmm`) and torch's `F.linear`, in GB/s of weight;
- attention: `attend_rows` (T query rows over a KV cache) at contexts of 4k and 20k keys, ms per call.
Not part of the test run; nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mtplx.backends.torch import kernels

MATMUL_SHAPES = [(8192, 1024), (2048, 1024), (1024, 2048), (512, 1024), (1024, 256), (4104, 1024)]
ATTN_SHAPES = [(64, 4, 1), (256, 8, 2)]  # head dim, query heads, KV heads: the default model, Qwen3.5


def best_of(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_rows(reps: int) -> list[dict]:
    rowmm, dot = kernels.get_rowmm(), kernels.rowmm_bf16_fn()
    out = []
    for N, K in MATMUL_SHAPES:
        nbytes = N * K * 2
        ws = [torch.randn(N, K).bfloat16() for _ in range(max(2, (256 << 20) // nbytes))]
        for M in (1, 4):
            xf = torch.randn(M, K).bfloat16().float()
            paths = {"rowmm": lambda w: rowmm(xf, w),
                     "F.linear": lambda w: torch.nn.functional.linear(xf.bfloat16(), w)}
            if dot is not None:
                paths = {"rowmm_bf16": lambda w: dot(xf.bfloat16(), w), **paths}
            row = {"N": N, "K": K, "M": M}
            for name, f in paths.items():
                t = best_of(lambda: [f(w) for w in ws], reps) / len(ws)
                row[name + "_gbs"] = round(nbytes / t / 1e9, 1)
            out.append(row)
            print("matmul " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        del ws
    return out


def attention_rows(reps: int) -> list[dict]:
    attend = kernels.get_fused().attend_rows
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        for hd, nh, nkv in ATTN_SHAPES:
            for ctx in (4096, 20000):
                K = torch.randn(nkv, ctx + 8, hd).to(dtype)
                V = torch.randn(nkv, ctx + 8, hd).to(dtype)
                for T in (1, 4):
                    q = torch.randn(T, nh, hd)
                    t = best_of(lambda: attend(q, K, V, ctx, hd ** -0.5), reps)
                    row = {"dtype": str(dtype).removeprefix("torch."), "head_dim": hd, "heads": nh, "kv_heads": nkv,
                           "context": ctx, "rows": T, "ms": round(t * 1000, 3)}
                    out.append(row)
                    print("attention " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if kernels.get_rowmm() is None:
        raise SystemExit(f"no compiled kernel on this machine: {kernels.kernel_error()}")
    torch.set_num_threads(args.threads)
    print(f"kernel build: {kernels.kernel_isa()}, {args.threads} thread(s)")
    res = {"isa": kernels.kernel_isa(), "threads": args.threads, "matmul": matmul_rows(args.reps),
           "attention": attention_rows(args.reps)}
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
