"""Concurrency benchmark: N clients at once against a real `mtplx serve`, and offline batches.

    python benchmarks/bench_concurrency.py                        # the default model, server, N = 1 2 4 8
    python benchmarks/bench_concurrency.py --depths 0 3 --clients 1 2 4 8 --max-tokens 64
    python benchmarks/bench_concurrency.py --offline-08b          # Qwen3.5-0.8B shapes (vocab 4096), bf16, depth 0
    python benchmarks/bench_concurrency.py --json out.json

Server mode: one `mtplx serve --depth D --max-batch 8` process per depth, warmed up with one round
of every N (a running server has measured its depth choices already); then for each N, N
streaming greedy chat requests one after another, then the same N sent together.
Printed per (depth, N): aggregate generation tok/s (all tokens / wall time), the mean per-request
tok/s (each request's own `timings.predicted_per_second`), the mean and worst time to first token,
and the aggregate against serving those N requests one after another. Every concurrent answer is
checked identical to its serial answer.

Offline mode: `mtplx.generate(model, [prompts])` (batched) against the prompts one by one, on a
random checkpoint of Qwen3.5-0.8B's shapes (24 layers, H 1024) with a 4096-token vocabulary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOPICS = ["parse a config file", "merge two sorted lists", "read a CSV file", "retry a flaky call",
          "walk a directory tree", "format a table", "cache a function", "validate an email address"]


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write a Python function to {TOPICS[i % len(TOPICS)]}."}] for i in range(n)]


async def one_request(client, url: str, messages, max_tokens: int) -> dict:
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, timings = None, [], {}
    async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            for ch in ev.get("choices") or []:
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text.append(piece)
            if ev.get("timings"):
                timings = ev["timings"]
    return {"ttft_s": ttft or 0.0, "wall_s": time.perf_counter() - t0, "text": "".join(text),
            "tokens": timings.get("predicted_n", 0), "tps": timings.get("predicted_per_second", 0.0),
            "batch_size_mean": timings.get("batch_size_mean", 1.0), "depth_mean": timings.get("depth_mean", 0.0)}


async def run_clients(url: str, n: int, max_tokens: int, together: bool) -> tuple[list[dict], float]:
    import httpx

    async with httpx.AsyncClient() as client:
        t = time.perf_counter()
        if together:
            res = await asyncio.gather(*[one_request(client, url, m, max_tokens) for m in prompts(n)])
        else:
            res = [await one_request(client, url, m, max_tokens) for m in prompts(n)]
        return list(res), time.perf_counter() - t


def bench_server(model: str | None, depths: list[int], clients: list[int], max_tokens: int, threads: int | None) -> list:
    from mtplx.server.testing import ServerProcess

    rows = []
    for depth in depths:
        args = ["mtplx", "serve", "--depth", str(depth), "--max-batch", str(max(clients)), "--log-level", "warning",
                "--max-queue", "64"]
        if model:
            args += ["--model", model]
        if threads:
            args += ["--threads", str(threads)]
        with ServerProcess(args, startup_timeout=300) as srv:
            # warm-up: a long-running server has measured its depth choices (DepthPolicy) already
            for n in clients:
                asyncio.run(run_clients(srv.base_url, n, max_tokens, True))
            for n in clients:
                serial, serial_wall = asyncio.run(run_clients(srv.base_url, n, max_tokens, False))
                conc, wall = asyncio.run(run_clients(srv.base_url, n, max_tokens, True))
                same = [a["text"] for a in conc] == [b["text"] for b in serial]
                tokens = sum(r["tokens"] for r in conc)
                row = {"depth": depth, "clients": n, "aggregate_tps": tokens / wall,
                       "serial_aggregate_tps": sum(r["tokens"] for r in serial) / serial_wall,
                       "per_request_tps": statistics.mean(r["tps"] for r in conc),
                       "solo_tps": statistics.mean(r["tps"] for r in serial),
                       "ttft_mean_s": statistics.mean(r["ttft_s"] for r in conc),
                       "ttft_max_s": max(r["ttft_s"] for r in conc),
                       "batch_size_mean": statistics.mean(r["batch_size_mean"] for r in conc),
                       "depth_mean": statistics.mean(r["depth_mean"] for r in conc), "identical": same}
                row["vs_serial"] = row["aggregate_tps"] / row["serial_aggregate_tps"]
                rows.append(row)
                print(f"depth {depth} N={n}: aggregate {row['aggregate_tps']:7.1f} tok/s ({row['vs_serial']:.2f}x "
                      f"serial {row['serial_aggregate_tps']:.1f}), per request {row['per_request_tps']:6.1f} tok/s "
                      f"({row['per_request_tps'] / row['solo_tps']:.2f}x solo), TTFT mean {row['ttft_mean_s']:.3f} s "
                      f"max {row['ttft_max_s']:.3f} s, batch {row['batch_size_mean']:.1f}, drafts/cycle "
                      f"{row['depth_mean']:.2f}, identical to serial: {'yes' if same else 'NO'}", flush=True)
    return rows


def bench_offline_08b(clients: list[int], max_tokens: int, dtype: str) -> list:
    import mtplx
    from mtplx.checkpoint.synthetic import preset_config, write_synthetic_checkpoint
    from mtplx.decoding.params import SamplingParams

    cfg = preset_config("qwen3.5-0.8b", hidden_size=1024, num_hidden_layers=24, vocab_size=4096,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=256, intermediate_size=3584,
                        linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128,
                        linear_value_head_dim=128)
    out = Path(tempfile.mkdtemp(prefix="mtplx_08b_"))
    print("writing a random Qwen3.5-0.8B-shaped checkpoint (vocab 4096) ...", flush=True)
    ck = write_synthetic_checkpoint(out / "m08b", cfg, seed=0, dtype=dtype)
    model = mtplx.load(ck.path, backend="torch", dtype=dtype)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    ids = [[(7 * i + j) % 4096 for j in range(24)] for i in range(max(clients))]
    mtplx.generate(model, ids[0], SamplingParams(max_tokens=4), depth=0)  # warm-up
    rows = []
    for n in clients:
        t = time.perf_counter()
        serial = [mtplx.generate(model, p, params, depth=0) for p in ids[:n]]
        serial_wall = time.perf_counter() - t
        t = time.perf_counter()
        batched = mtplx.generate(model, ids[:n], params, depth=0)
        wall = time.perf_counter() - t
        same = [r.token_ids for r in batched] == [r.token_ids for r in serial]
        row = {"clients": n, "aggregate_tps": n * max_tokens / wall, "serial_tps": n * max_tokens / serial_wall,
               "identical": same}
        row["vs_serial"] = row["aggregate_tps"] / row["serial_tps"]
        rows.append(row)
        print(f"0.8B-shaped {dtype} depth 0, N={n}: aggregate {row['aggregate_tps']:6.1f} tok/s, serial "
              f"{row['serial_tps']:6.1f} tok/s -> {row['vs_serial']:.2f}x; identical: {'yes' if same else 'NO'}",
              flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 3])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--offline-08b", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", help="--offline-08b dtype")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.offline_08b:
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        out = {"offline_08b": bench_offline_08b(a.clients, a.max_tokens, a.dtype), "threads": torch.get_num_threads()}
    else:
        out = {"server": bench_server(a.model, a.depths, a.clients, a.max_tokens, a.threads)}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
