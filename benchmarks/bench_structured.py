"""Structured output and logprobs under MTP: what the mask and the logprobs cost.

    python benchmarks/bench_structured.py [--model DIR] [--depth 3] [--reps 3] [--max-tokens 96] [--json out.json]

Greedy, the default model unless --model. Rows, interleaved rep by rep:
- json_schema at depth 0 and at --depth with the same grammar: tok/s, speedup, acceptance, and
  the grammar's share of the time (mask computation per verify row, from GrammarMask.mask_s);
- logprobs (top 5) off and on at --depth: tok/s and the ratio.
Every MTP row is checked token-identical to its depth-0 row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mtplx  # noqa: E402
from mtplx.decoding.grammar import compile_json  # noqa: E402
from mtplx.decoding.loop import Generation  # noqa: E402
from mtplx.decoding.params import SamplingParams  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
                "required": ["street", "city"]}},
    "required": ["name", "age", "tags", "address"], "additionalProperties": False}


def run(model, ids, params, depth):
    s = model.new_session()
    g = Generation(s, ids, params, depth, eos_token_ids=model.eos_token_ids, detokenizer=model.tokenizer.detokenizer())
    while not g.prefill_block():
        pass
    steps = [g.start()]
    while not g.finished:
        steps += g.finish_cycle(s.verify(g.draft()))
    st = steps[-1].stats
    masks = g.grammar.mask_s if g.grammar is not None else 0.0
    rows = st.verify_passes + sum(st.drafted)  # verify rows (one per pass plus one per draft)
    return [x.token_id for x in steps], st, masks, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    model = mtplx.load(a.model, backend="torch")
    from mtplx.backends.torch.loader import apply_default_threads

    apply_default_threads(model.model)
    g = compile_json(model.tokenizer, model.config.vocab_size, model.eos_token_ids, SCHEMA)
    ids = model.tokenizer.encode_chat([{"role": "user", "content": "Describe a person as JSON."}])
    code = model.tokenizer.encode("import json\n\ndef load_settings(path):\n")
    res: dict = {}
    for _ in range(a.reps):
        for name, prompt, params, depth in (
            ("json depth 0", ids, SamplingParams(max_tokens=a.max_tokens, grammar=g), 0),
            (f"json depth {a.depth}", ids, SamplingParams(max_tokens=a.max_tokens, grammar=g), a.depth),
            ("plain depth 0", ids, SamplingParams(max_tokens=a.max_tokens), 0),
            (f"plain depth {a.depth}", ids, SamplingParams(max_tokens=a.max_tokens), a.depth),
            ("logprobs off", code, SamplingParams(max_tokens=a.max_tokens, ignore_eos=True), a.depth),
            ("logprobs on", code, SamplingParams(max_tokens=a.max_tokens, ignore_eos=True, logprobs=5), a.depth),
        ):
            toks, st, mask_s, rows = run(model, prompt, params, depth)
            r = res.setdefault(name, {"tps": [], "tokens": toks, "acceptance": st.acceptance, "mask_ms_per_row": [],
                                      "mask_share": []})
            assert r["tokens"] == toks, f"{name}: tokens changed between reps"
            r["tps"].append(st.generation_tps)
            if mask_s:
                total = st.prompt_time_s + st.generation_time_s
                r["mask_ms_per_row"].append(1000 * mask_s / max(rows, 1))
                r["mask_share"].append(mask_s / total)
    for base, fast in (("json depth 0", f"json depth {a.depth}"), ("plain depth 0", f"plain depth {a.depth}")):
        assert res[base]["tokens"] == res[fast]["tokens"], f"{fast} is not token-identical to {base}"
    print(f"{'row':<16} {'tok/s':>8} {'vs base':>8}  acceptance          mask ms/row  mask share")
    base_of = {f"json depth {a.depth}": "json depth 0", f"plain depth {a.depth}": "plain depth 0",
               "logprobs on": "logprobs off"}
    out = {}
    for name, r in res.items():
        tps = statistics.median(r["tps"])
        b = base_of.get(name)
        ratio = tps / statistics.median(res[b]["tps"]) if b else 1.0
        mask = f"{statistics.median(r['mask_ms_per_row']):.3f}" if r["mask_ms_per_row"] else "-"
        share = f"{statistics.median(r['mask_share']):.1%}" if r["mask_share"] else "-"
        acc = "/".join(f"{x:.2f}" for x in r["acceptance"]) or "-"
        print(f"{name:<16} {tps:8.1f} {ratio:7.2f}x  {acc:<19} {mask:>11}  {share:>10}")
        out[name] = {"tps": tps, "ratio": ratio, "acceptance": r["acceptance"], "mask_ms_per_row": mask, "mask_share": share}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
