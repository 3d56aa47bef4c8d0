"""Decoding benchmark: depth 0..4 side by side, interleaved runs, one process.

    python benchmarks/bench_decoding.py                      # synthetic dense + MoE (+ default model)
    python benchmarks/bench_decoding.py --model DIR [--model DIR2] --depths 0 1 2 3 4 --reps 3
    python benchmarks/bench_decoding.py --oracle             # add oracle-draft rows
    python benchmarks/bench_decoding.py --json out.json
    python benchmarks/bench_decoding.py --sampling           # cost of accept / draft_token per call

For each checkpoint and depth: generation tok/s (median over reps), speedup over depth 0 (the
ratio of medians, runs interleaved depth by depth), acceptance by depth, tokens per verify,
and the share of time in draft / verify. Synthetic checkpoints have random MTP heads, so they
accept almost nothing: their rows measure the cost of drafting that fails. `--oracle` adds rows
whose drafts are the target's own greedy continuation (what a perfect head would propose,
with ~15% of drafts corrupted): the upper bound the loop and the verify path allow.
Greedy (temperature 0) unless --temp is given; greedy MTP rows are checked token-identical to
depth 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mtplx  # noqa: E402
from mtplx.decoding.loop import generate_steps  # noqa: E402
from mtplx.decoding.params import SamplingParams  # noqa: E402


class OracleDrafts:
    """Drafts = the reference continuation (15% corrupted); everything else is the real session."""

    def __init__(self, inner, ref, vocab, corrupt=0.15, seed=0):
        self.inner, self.ref, self.vocab, self.corrupt = inner, ref, vocab, corrupt
        self.g = np.random.default_rng(seed)
        self.max_context = inner.max_context
        self.n = 0

    def __getattr__(self, k):
        return getattr(self.inner, k)

    def sample_first(self, params, rng):
        self.n = 1
        return self.inner.sample_first(params, rng)

    def draft(self, depth, params, rng):
        self.inner.draft(depth, params, rng)
        ids = list(self.ref[self.n : self.n + depth]) + [0] * depth
        ids = ids[:depth]
        for k in range(depth):
            if self.g.random() < self.corrupt:
                ids[k] = int((ids[k] + 1 + self.g.integers(self.vocab - 1)) % self.vocab)
        return ids, None

    def commit(self, n, nxt):
        self.inner.commit(n, nxt)
        self.n += n + 1


def synthetic_models(root: Path, dtype: str) -> list[tuple[str, Path]]:
    from mtplx.checkpoint.synthetic import preset_config, write_synthetic_checkpoint

    out = []
    for name, preset, kw in [
        ("synthetic-dense(9b-shape,tiny)", "qwen3.5-9b", {}),
        ("synthetic-moe(35b-a3b-shape,tiny)", "qwen3.5-35b-a3b", {"router_near_ties": 1e-4}),
    ]:
        ck = write_synthetic_checkpoint(root / name.split("(")[0], preset_config(preset), tokenizer=True, seed=1, **kw)
        out.append((name, ck.path))
    return out


def run_once(model, prompt, params, depth, oracle_ref=None):
    s = model.new_session(max_context=len(prompt) + params.max_tokens + 8)
    if oracle_ref is not None:
        s = OracleDrafts(s, oracle_ref, model.config.vocab_size)
    steps = list(generate_steps(s, prompt, params, depth, eos_token_ids=[]))
    return [x.token_id for x in steps], steps[-1].stats


def bench_model(label, model, args):
    prompt = model.encode_prompt("The quick brown fox jumps over the lazy dog. " * 4) if model.tokenizer else list(range(1, 40))
    params = SamplingParams(temperature=args.temp, max_tokens=args.tokens, ignore_eos=True, seed=0)
    ref, _ = run_once(model, prompt, SamplingParams(max_tokens=args.tokens, ignore_eos=True), 0)
    modes = [("mtp", d) for d in args.depths]
    if args.oracle:
        modes += [("oracle", d) for d in args.depths if d > 0]
    res = {m: [] for m in modes}
    run_once(model, prompt, params, max(args.depths))  # warm-up
    for _ in range(args.reps):  # interleaved: every mode once per rep
        for mode in modes:
            p = params if mode[0] == "mtp" else SamplingParams(max_tokens=args.tokens, ignore_eos=True)
            toks, st = run_once(model, prompt, p, mode[1], ref if mode[0] == "oracle" else None)
            if p.greedy and toks != ref:
                raise SystemExit(f"{label}: greedy {mode} differs from depth 0 -- parity broken")
            res[mode].append(st)
    rows = []
    base = statistics.median(s.generation_tps for s in res[("mtp", 0)]) if ("mtp", 0) in res else None
    for mode in modes:
        sts = res[mode]
        tps = statistics.median(s.generation_tps for s in sts)
        st = sts[-1]
        tot = st.draft_time_s + st.verify_time_s + st.accept_time_s + st.commit_time_s
        rows.append({
            "model": label, "mode": mode[0], "depth": mode[1], "tok_s": tps,
            "speedup": tps / base if base else None,
            "acceptance": [round(a, 3) for a in st.acceptance], "tokens_per_verify": st.tokens_per_verify,
            "draft_share": st.draft_time_s / tot if tot else 0.0, "verify_share": st.verify_time_s / tot if tot else 0.0,
            "prompt_tok_s": statistics.median(s.prompt_tps for s in sts), "dtype": model.dtype,
        })
    return rows


def bench_sampling(vocabs=(151936, 248320), depth=3) -> list[dict]:
    """ms per call of the torch acceptance (D+1 bf16 rows) and of one drafting step."""
    import torch

    from mtplx.backends.torch import sampling as ts

    settings = [("greedy", SamplingParams()), ("T0.7", SamplingParams(temperature=0.7)),
                ("T0.7 k20 p0.8 (Qwen)", SamplingParams(temperature=0.7, top_k=20, top_p=0.8)),
                ("T0.7 p0.95", SamplingParams(temperature=0.7, top_p=0.95))]
    rows = []
    for V in vocabs:
        g = torch.Generator().manual_seed(0)
        lg = (torch.randn(depth + 1, V, generator=g) * 3).to(torch.bfloat16)
        for name, p in settings:
            q = None if p.greedy else ts.filter_probs(torch.randn(depth, V, generator=g) * 3, p)
            gen = ts.make_generator(0)
            d = list(range(1, depth + 1))
            for _ in range(2):
                ts.accept(lg, d, q, p, gen)
            n = 10
            t = time.perf_counter()
            for _ in range(n):
                ts.accept(lg, d, q, p, gen)
            a = (time.perf_counter() - t) / n * 1e3
            t = time.perf_counter()
            for _ in range(n):
                ts.draft_token(lg[0], p, gen)
            b = (time.perf_counter() - t) / n * 1e3
            rows.append({"vocab": V, "setting": name, "depth": depth, "accept_ms": a, "draft_token_ms": b})
            print(f"V={V:6d} {name:22} accept({depth + 1} rows) {a:7.2f} ms   draft_token {b:6.2f} ms")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="checkpoint folder (repeatable)")
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--temp", type=float, default=0.0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--oracle", action="store_true", help="add oracle-draft rows (upper bound)")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    ap.add_argument("--sampling", action="store_true", help="only time accept / draft_token (large vocabularies)")
    args = ap.parse_args(argv)
    if args.sampling:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        rows = bench_sampling()
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0
    if 0 not in args.depths:
        args.depths = [0] + args.depths
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    models = [(str(p), Path(p)) for p in args.model]
    tmp = None
    if not models:
        tmp = tempfile.TemporaryDirectory()
        models = synthetic_models(Path(tmp.name), args.dtype)
        dm = mtplx.api.default_model_path()
        if dm is not None:
            models.insert(0, ("default-model", dm))
    rows = []
    for label, path in models:
        m = mtplx.load(path, backend="torch", dtype=args.dtype)
        rows += bench_model(label, m, args)
    hdr = f"{'model':34} {'mode':6} {'D':>2} {'tok/s':>8} {'speedup':>7} {'tok/verify':>10} {'draft%':>6} {'verify%':>7}  acceptance"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.tokens} tokens, temp {args.temp}, "
          f"median of {args.reps} interleaved reps")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        acc = "/".join(f"{a:.2f}" for a in r["acceptance"]) or "-"
        print(f"{r['model'][:34]:34} {r['mode']:6} {r['depth']:>2} {r['tok_s']:8.1f} {sp:>7} "
              f"{r['tokens_per_verify']:10.2f} {100 * r['draft_share']:6.1f} {100 * r['verify_share']:7.1f}  {acc}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
