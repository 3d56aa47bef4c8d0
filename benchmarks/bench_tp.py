"""Tensor parallel on this machine: what the collectives cost per token (torch, gloo, --tp 2).

    python benchmarks/bench_tp.py [--models default,dense08b] [--tokens 64] [--out tp.json]

For each checkpoint (the embedded default model; a random 0.8B-shaped dense one, written once
into ~/.cache/mtplx/bench as for bench_llamacpp.py), in one run: one process on 1 and on 2
threads, then 2 ranks of 1 thread each. Per generated token at depth 0: ms, the collectives run
(all-gathers of block outputs, the vocab gather, the channel's broadcasts) and the ms rank 0
spent in them; then MTP depths 1-3 under TP against TP depth 0 (and their tokens checked equal).
Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_llamacpp import checkpoints  # noqa: E402

import mtplx  # noqa: E402
from mtplx.decoding.params import SamplingParams  # noqa: E402

PROMPT = "import os\nimport sys\n\n\nclass Config:\n    def __init__(self, path):\n"


def per_token(model, ids, params, depth: int):
    """(ms per generated token, token ids) of one greedy run."""
    r = mtplx.generate(model, ids, params, depth=depth)
    return 1e3 * r.stats.generation_time_s / max(1, r.stats.generation_tokens), r.token_ids


def bench_model(name: str, path: Path, tokens: int) -> dict:
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    row: dict = {"model": name}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        single = mtplx.load(path, backend="torch", dtype="float32")
        ids = single.encode_prompt(PROMPT)
        per_token(single, ids, SamplingParams(max_tokens=8, ignore_eos=True), 0)  # warm-up
        row[f"single_{threads}t_ms"], ref = per_token(single, ids, params, 0)
        del single
    torch.set_num_threads(1)
    par = mtplx.load(path, backend="torch", dtype="float32", tp=2, tp_threads=1)
    tp = par.model.tp
    per_token(par, ids, SamplingParams(max_tokens=8, ignore_eos=True), 0)
    calls, comm = tp.calls, tp.comm_s
    row["tp2_ms"], plain = per_token(par, ids, params, 0)
    n = len(plain)
    row["collectives_per_token"] = (tp.calls - calls) / n
    row["collective_ms_per_token"] = 1e3 * (tp.comm_s - comm) / n
    row["collective_share"] = row["collective_ms_per_token"] / row["tp2_ms"]
    row["tp_matches_single"] = plain == ref
    row["mtp"] = {}
    for d in (1, 2, 3):
        ms, toks = per_token(par, ids, params, d)
        row["mtp"][d] = {"speedup": row["tp2_ms"] / ms, "identical": toks == plain}
    par.model.close()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="default,dense08b")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    work = Path.home() / ".cache" / "mtplx" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    paths = checkpoints(args.models.split(","), "f32", work)
    rows = [bench_model(name, path, args.tokens) for name, path in paths.items()]

    from rich.console import Console
    from rich.table import Table

    t = Table(title="tensor parallel, torch + gloo, fp32 (ms per token at depth 0)")
    for col in ("model", "1 proc 1t", "1 proc 2t", "tp 2 x 1t", "collectives/token", "in collectives",
                "TP == 1 proc", "MTP d1/d2/d3 under TP"):
        t.add_column(col)
    for r in rows:
        mtp = " / ".join(f"{v['speedup']:.2f}x{'' if v['identical'] else ' (DIFFER)'}" for v in r["mtp"].values())
        t.add_row(r["model"], f"{r['single_1t_ms']:.2f}", f"{r['single_2t_ms']:.2f}", f"{r['tp2_ms']:.2f}",
                  f"{r['collectives_per_token']:.0f}",
                  f"{r['collective_ms_per_token']:.2f} ms ({100 * r['collective_share']:.0f}%)",
                  "yes" if r["tp_matches_single"] else "no", mtp)
    Console().print(t)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
