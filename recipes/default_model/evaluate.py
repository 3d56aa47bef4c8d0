"""Step 5: measure the shipped default model end to end with the engine (`mtplx.generate`).

    python recipes/default_model/evaluate.py [--prompts 16] [--max-tokens 96]

Prompts are cut from the held-out stdlib modules (never trained on): some context lines, then a
`def` line and its first lines. Every prompt runs at depth 0..D in rotating order (interleaved,
same process), at temperature 0 and 0.7 (seeded), with ignore_eos so every run emits the same
number of tokens. Reports generation tok/s per depth, speedup over depth 0, the engine's
acceptance by depth (share of cycles whose first k drafts were all accepted) and tokens per
verify, and checks greedy MTP output equals depth-0 output. Writes runs/default_model/eval.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def heldout_prompts(n: int, context_lines: int = 12, body_lines: int = 2) -> list[str]:
    text = (common.WORK_DIR / "heldout.txt").read_text(encoding="utf-8")
    docs = [d for d in text.split(common.EOS) if d.strip()]
    cands = []
    for d in docs:
        lines = d.split("\n")
        for i, ln in enumerate(lines):
            if ln.lstrip().startswith("def ") and i >= 4 and i + body_lines < len(lines):
                cands.append("\n".join(lines[max(0, i - context_lines):i + 1 + body_lines]) + "\n")
    step = max(1, len(cands) // n)
    return cands[::step][:n]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(common.ASSET_DIR))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--max-depth", type=int, default=3)
    ap.add_argument("--temps", default="0,0.7")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--draft-cutoff", type=float, default=0.0, help="adaptive draft length (0 = off)")
    ap.add_argument("--out", type=Path, default=common.WORK_DIR / "eval.json")
    args = ap.parse_args()

    import torch

    import mtplx
    from mtplx.decoding.params import SamplingParams

    torch.set_num_threads(args.threads)
    model = mtplx.load(args.model, backend="torch", dtype="float32")
    prompts = heldout_prompts(args.prompts)
    depths = list(range(args.max_depth + 1))
    results = {}
    for temp in [float(t) for t in args.temps.split(",")]:
        agg = {d: {"tokens": 0, "time": 0.0, "drafted": [0] * d, "accepted": [0] * d, "verify": 0, "accepted_total": 0}
               for d in depths}
        mismatches = 0
        # warm-up (first-call allocations) outside the measurement
        mtplx.generate(model, prompts[0], SamplingParams(temperature=temp, max_tokens=8, ignore_eos=True, seed=0), depth=1)
        for pi, prompt in enumerate(prompts):
            order = depths[pi % len(depths):] + depths[:pi % len(depths)]
            outs = {}
            for d in order:
                p = SamplingParams(temperature=temp, max_tokens=args.max_tokens, ignore_eos=True, seed=1000 + pi,
                                   draft_cutoff=args.draft_cutoff)
                r = mtplx.generate(model, prompt, p, depth=d)
                s = r.stats
                a = agg[d]
                a["tokens"] += s.generation_tokens
                a["time"] += s.generation_time_s
                a["verify"] += s.verify_passes
                for k in range(d):
                    a["drafted"][k] += s.drafted[k]
                    a["accepted"][k] += s.accepted[k]
                a["accepted_total"] += sum(s.accepted)
                outs[d] = r.token_ids
            if temp == 0.0:
                mismatches += sum(outs[d] != outs[0] for d in depths if d)
        tps0 = agg[0]["tokens"] / agg[0]["time"]
        rows = []
        for d in depths:
            a = agg[d]
            tps = a["tokens"] / a["time"]
            rows.append({"depth": d, "tok_s": round(tps, 2), "speedup": round(tps / tps0, 3),
                         "acceptance": [round(x / y, 3) if y else 0.0 for x, y in zip(a["accepted"], a["drafted"])],
                         "tokens_per_verify": round(1 + a["accepted_total"] / a["verify"], 3) if a["verify"] else None})
        results[str(temp)] = {"rows": rows, "greedy_mismatches": mismatches if temp == 0.0 else None}
        print(f"temperature {temp}:  ({len(prompts)} held-out prompts x {args.max_tokens} tokens, threads {args.threads})")
        for r in rows:
            print(f"  depth {r['depth']}: {r['tok_s']:7.2f} tok/s  speedup {r['speedup']:.2f}x  "
                  f"acceptance {r['acceptance']}  tokens/verify {r['tokens_per_verify']}")
        if temp == 0.0:
            print(f"  greedy MTP output == depth-0 output: {mismatches == 0} ({mismatches} mismatching runs)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"prompts": len(prompts), "max_tokens": args.max_tokens, "threads": args.threads,
                                    "draft_cutoff": args.draft_cutoff,
                                    "results": results}, indent=2))


if __name__ == "__main__":
    main()
