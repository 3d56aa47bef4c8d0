"""Step 5: measure the shipped default model end to end with the engine.

    python recipes/default_model/evaluate.py [--only code,chat,tools,ppl] [--max-depth 4]

- code: prompts cut from the held-out stdlib modules (context lines, a `def` line and its first
  lines), every depth 0..D in rotating order, temperature 0 and 0.7 (seeded), ignore_eos so every
  run emits the same number of tokens: tok/s, speedup over depth 0, acceptance by depth,
  tokens per verify, and greedy MTP output == depth-0 output.
- chat: held-out chat prompts (functions of the held-out modules asked for or explained,
  chats.py), rendered by the model's chat template: speedup and acceptance by depth at
  temperature 0, and the share of turns that end with <|im_end|> within --chat-tokens tokens.
- tools: held-out tool tasks (tool verbs, nouns and request phrasings no training episode
  uses), through `mtplx.chat` (the server's prompt building and parser): the share of
  well-formed calls with the right name and every required argument, and of calls whose
  argument values equal the request's.
- ppl: perplexity of held-out code at 1k / 16k / 60k tokens of context (the mean over the
  last 1024 tokens of a window that long, fp32), and a 60k-token chat prompt answered.
Writes runs/default_model/eval.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
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


def eval_records(kind: str) -> list[dict]:
    lines = (common.WORK_DIR / "chat_eval.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def chat_prompt_ids(model, rec: dict) -> list[int]:
    tok = model.tokenizer
    text = tok.apply_chat_template(rec["messages"], add_generation_prompt=True, tools=rec["tools"],
                                   enable_thinking=rec["enable_thinking"])
    return tok.encode(text, add_special_tokens=False)


def speed_table(model, prompts: list, depths: list[int], temp: float, max_tokens: int, ignore_eos: bool) -> dict:
    """Every prompt at every depth (rotating order) -> rows by depth and greedy mismatches."""
    import mtplx
    from mtplx.decoding.params import SamplingParams

    agg = {d: {"tokens": 0, "time": 0.0, "drafted": [0] * d, "accepted": [0] * d, "verify": 0, "acc": 0}
           for d in depths}
    mismatches = 0
    mtplx.generate(model, prompts[0], SamplingParams(temperature=temp, max_tokens=8, ignore_eos=True, seed=0),
                   depth=max(depths))
    for pi, prompt in enumerate(prompts):
        order = depths[pi % len(depths):] + depths[:pi % len(depths)]
        outs = {}
        for d in order:
            p = SamplingParams(temperature=temp, max_tokens=max_tokens, ignore_eos=ignore_eos, seed=1000 + pi)
            r = mtplx.generate(model, prompt, p, depth=d)
            s, a = r.stats, agg[d]
            a["tokens"] += s.generation_tokens
            a["time"] += s.generation_time_s
            a["verify"] += s.verify_passes
            for k in range(d):
                a["drafted"][k] += s.drafted[k]
                a["accepted"][k] += s.accepted[k]
            a["acc"] += sum(s.accepted)
            outs[d] = r
        if temp == 0.0:
            mismatches += sum(outs[d].token_ids != outs[0].token_ids for d in depths if d)
    tps0 = agg[0]["tokens"] / agg[0]["time"]
    rows = []
    for d in depths:
        a = agg[d]
        tps = a["tokens"] / a["time"]
        rows.append({"depth": d, "tok_s": round(tps, 2), "speedup": round(tps / tps0, 3),
                     "acceptance": [round(x / y, 3) if y else 0.0 for x, y in zip(a["accepted"], a["drafted"])],
                     "tokens_per_verify": round(1 + a["acc"] / a["verify"], 3) if a["verify"] else None})
    return {"rows": rows, "greedy_mismatches": mismatches if temp == 0.0 else None}


def print_rows(title: str, table: dict) -> None:
    print(title)
    for r in table["rows"]:
        print(f"  depth {r['depth']}: {r['tok_s']:7.2f} tok/s  speedup {r['speedup']:.2f}x  "
              f"acceptance {r['acceptance']}  tokens/verify {r['tokens_per_verify']}")
    if table["greedy_mismatches"] is not None:
        print(f"  greedy MTP output == depth-0 output: {table['greedy_mismatches'] == 0} "
              f"({table['greedy_mismatches']} mismatching runs)")


def run_code(model, args, depths) -> dict:
    prompts = heldout_prompts(args.prompts)
    out = {}
    for temp in [float(t) for t in args.temps.split(",")]:
        t = speed_table(model, prompts, depths, temp, args.max_tokens, True)
        print_rows(f"code, temperature {temp} ({len(prompts)} held-out prompts x {args.max_tokens} tokens)", t)
        out[str(temp)] = t
    return out


def run_chat(model, args, depths) -> dict:
    recs = eval_records("chat")
    ids = [chat_prompt_ids(model, r) for r in recs]
    t = speed_table(model, ids[:args.speed_prompts], depths, 0.0, args.chat_tokens, False)
    print_rows(f"chat, temperature 0 ({args.speed_prompts} held-out prompts, up to {args.chat_tokens} tokens)", t)
    ends = _ends(model, ids, args.chat_tokens, max(depths))
    print(f"  turns ending with <|im_end|> within {args.chat_tokens} tokens: {ends['rate']:.1%} of {ends['n']}")
    return {**t, "im_end": ends}


def _ends(model, prompts: list, max_tokens: int, depth: int) -> dict:
    import mtplx
    from mtplx.decoding.params import SamplingParams

    im_end = model.tokenizer.token_to_id("<|im_end|>")
    ended, lengths = 0, []
    for p in prompts:
        r = mtplx.generate(model, p, SamplingParams(temperature=0.0, max_tokens=max_tokens), depth=depth)
        stopped = r.finish_reason == "stop" and (r.token_ids[-1:] == [im_end] or r.stop is not None)
        ended += stopped
        lengths.append(len(r.token_ids))
    return {"n": len(prompts), "ended": ended, "rate": ended / len(prompts),
            "mean_tokens": round(sum(lengths) / len(lengths), 1)}


def _same(a, b) -> bool:
    return a == b or (isinstance(b, float) and isinstance(a, (int, float)) and abs(a - b) < 1e-9)


def run_tools(model, args, depths) -> dict:
    import mtplx
    from mtplx.decoding.params import SamplingParams

    recs = eval_records("tool")
    n = ok = exact = 0
    fails = []
    for rec in recs:
        reply = mtplx.chat(model, rec["messages"], tools=rec["tools"], depth=max(depths),
                           params=SamplingParams(temperature=0.0, max_tokens=256),
                           enable_thinking=rec["enable_thinking"])
        want = rec["expect"]
        got = [(c.name, c.arguments) for c in reply.tool_calls]
        right = len(got) == len(want) and all(
            g[0] == w["name"] and all(k in g[1] for k in w["required"]) for g, w in zip(got, want))
        values = right and all(set(g[1]) == set(w["arguments"]) and all(_same(g[1][k], w["arguments"][k]) for k in g[1])
                               for g, w in zip(got, want))
        n += 1
        ok += right
        exact += values
        if not right and len(fails) < 8:
            fails.append({"request": rec["messages"][-1]["content"], "want": want, "got": got,
                          "text": reply.result.text[:300]})
    print(f"held-out tool tasks: right name and every required argument {ok / n:.1%}, "
          f"exact argument values {exact / n:.1%} (of {n})", flush=True)
    out = {"n": n, "right_call": ok / n, "exact_values": exact / n, "examples_of_failures": fails}
    if args.speed_prompts:
        ids = [chat_prompt_ids(model, r) for r in recs[:args.speed_prompts]]
        t = speed_table(model, ids, depths, 0.0, 256, False)
        print_rows(f"tool prompts, temperature 0 ({len(ids)} held-out tasks)", t)
        out.update(t)
    return out


def run_ppl(model, args) -> dict:
    """NLL of the last 1024 tokens of held-out windows of 1k / 16k / 60k tokens."""
    import numpy as np
    import torch

    import mtplx
    from mtplx.decoding.params import SamplingParams

    text = (common.WORK_DIR / "heldout.txt").read_text(encoding="utf-8")
    stream = np.asarray(model.tokenizer.encode(text.replace(common.EOS, "\n\n")), dtype=np.int64)
    net = model.model
    out = {}
    for L in (1024, 16384, 61440):
        nll, count = 0.0, 0
        for start in np.linspace(0, stream.size - L - 1, args.ppl_windows).astype(np.int64):
            ids = torch.from_numpy(stream[start:start + L + 1])
            cache = net.new_cache(L + 1)
            ctx = L - 1024
            with torch.inference_mode():
                for s in range(0, ctx, 4096):
                    net.prefill(ids[s:min(s + 4096, ctx)], cache)
                _, _, logits = net.forward_hidden(ids[ctx:L][None], cache, ctx)
            lp = torch.log_softmax(logits[0].float(), -1)
            tgt = ids[ctx + 1:L + 1]
            nll -= lp.gather(1, tgt[:, None]).sum().item()
            count += tgt.numel()
            if not math.isfinite(nll):
                break
        out[str(L)] = {"ppl": round(math.exp(nll / count), 3) if math.isfinite(nll) else None,
                       "nll": round(nll / count, 4) if math.isfinite(nll) else None, "windows": args.ppl_windows}
        print(f"perplexity at {L} tokens of context: {out[str(L)]['ppl']} (last 1024 tokens, {args.ppl_windows} windows)")
    # a 60k-token prompt: a long code listing, then a question; the answer must come and stop
    files = text.split(common.EOS)
    listing, n_tok = [], 0
    for f in files * 4:
        listing.append(f)
        n_tok += len(f) / 3.2
        if n_tok > 58_000:
            break
    msgs = [{"role": "user", "content": "Here is some code:\n\n```python\n" + "\n\n".join(listing)
             + "\n```\n\nWhat does `heapq.heappush` do?"}]
    t0 = time.time()
    r = mtplx.generate(model, msgs, SamplingParams(temperature=0.0, max_tokens=128), depth=3)
    out["long_prompt"] = {"prompt_tokens": len(r.prompt_token_ids), "answer": r.text, "finish_reason": r.finish_reason,
                          "tokens": len(r.token_ids), "seconds": round(time.time() - t0, 1)}
    print(f"a {len(r.prompt_token_ids)}-token prompt: {r.finish_reason} after {len(r.token_ids)} tokens: {r.text!r}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(common.ASSET_DIR))
    ap.add_argument("--only", default="code,chat,tools,ppl")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--max-depth", type=int, default=3)
    ap.add_argument("--temps", default="0,0.7")
    ap.add_argument("--speed-prompts", type=int, default=24, help="chat / tool prompts in the speed tables")
    ap.add_argument("--chat-tokens", type=int, default=256)
    ap.add_argument("--ppl-windows", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=common.WORK_DIR / "eval.json")
    args = ap.parse_args()

    import torch

    import mtplx

    torch.set_num_threads(args.threads)
    model = mtplx.load(args.model, backend="torch", dtype="float32")
    depths = list(range(args.max_depth + 1))
    parts = args.only.split(",")
    res = {"threads": args.threads, "max_depth": args.max_depth}
    if "code" in parts:
        res["code"] = run_code(model, args, depths)
    if "chat" in parts:
        res["chat"] = run_chat(model, args, depths)
    if "tools" in parts:
        res["tools"] = run_tools(model, args, depths)
    if "ppl" in parts:
        res["ppl"] = run_ppl(model, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
