"""Prefix cache benchmark: long prompts, a second turn, a 10-turn agent trace, memory.

    python benchmarks/bench_prefix_cache.py                   # the default model, everything
    python benchmarks/bench_prefix_cache.py --only prefill --lengths 1024 8192 32768
    python benchmarks/bench_prefix_cache.py --model DIR --json out.json

The default model's config says 4096 positions; its GatedDeltaNet layers carry no positions and
its attention layers use RoPE, so the benchmark runs a copy whose max_position_embeddings is
65536 (the computation, and so its cost, is the same at any position; the text quality beyond
4096 is not what is measured here).

- prefill: prompt tok/s at each length with the cache off, for several prefill block sizes;
- turn 2: a chat whose first prompt is ~8k tokens, answered, then a follow-up: time to first
  token and cached share of turn 2, against turn 1 and against turn 2 with the cache off;
- agent: 10 turns of tool calls and tool results (CPython source files as results), growing
  to ~30k tokens: total prefill time with the cache against without, per-turn cached tokens;
- claude: Claude Code's real first request (~28k tokens) through the server's Anthropic route,
  then 9 turns of Read tool_use + tool_result: prefill time per turn and in total, cache on/off;
- memory: the cache's reported bytes against the process's RSS growth while it fills.
Every cached run is checked token-identical to its cache-off run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mtplx  # noqa: E402
from mtplx.decoding.params import SamplingParams  # noqa: E402

GREEDY = SamplingParams(max_tokens=16)


def long_context_copy(src: Path, positions: int) -> Path:
    out = Path(tempfile.mkdtemp(prefix="mtplx_bench_pc_")) / src.name
    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    text["max_position_embeddings"] = max(int(text.get("max_position_embeddings", 0)), positions)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def source_texts() -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    names = ["textwrap.py", "shlex.py", "fnmatch.py", "bisect.py", "heapq.py", "glob.py", "copy.py",
             "colorsys.py", "keyword.py", "queue.py", "sched.py", "numbers.py", "operator.py", "ntpath.py"]
    return [(lib / n).read_text() for n in names if (lib / n).is_file()]


def run(model, prompt, cache: bool, block: int, depth: int):
    s = model.new_session(prefix_cache="model" if cache else None, prefill_block=block)
    steps = list(mtplx.stream_generate(model, prompt, GREEDY, depth, session=s))
    return [x.token for x in steps], steps[-1].stats


# ---- prefill speed -------------------------------------------------------------------------------


def bench_prefill(model, lengths, blocks, depth) -> list[dict]:
    texts = "\n".join(source_texts())
    ids = model.tokenizer.encode(texts * 8)
    rows = []
    for n in lengths:
        for b in blocks:
            run(model, ids[:n], False, b, depth)[1] if n <= 2048 else None  # warm-up for short ones
            _, st = run(model, ids[:n], False, b, depth)
            rows.append({"tokens": n, "block": b, "prefill_s": st.prompt_time_s, "prefill_tps": st.prompt_tps})
            print(f"prefill {n:>6} tokens, block {b:>5}: {st.prompt_tps:8.0f} tok/s ({st.prompt_time_s:.2f} s)",
                  flush=True)
    return rows


# ---- turn 2 ------------------------------------------------------------------------------------------


def chat_turns(model, target_tokens: int) -> tuple[list, list]:
    texts = source_texts()
    doc, i = "", 0
    while len(model.tokenizer.encode(doc)) < target_tokens:
        doc += f"\n# file {i}\n" + texts[i % len(texts)]
        i += 1
    turn1 = [{"role": "system", "content": "You review Python code."},
             {"role": "user", "content": "Here is the code:\n" + doc + "\nWhat does the first function do?"}]
    return turn1, doc


def bench_turn2(model, block, depth, target_tokens) -> dict:
    turn1, _ = chat_turns(model, target_tokens)
    model.prefix_cache.clear()
    t1_tokens, t1 = run(model, turn1, True, block, depth)
    answer = model.tokenizer.decode(t1_tokens)
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the second one?"}]
    off_tokens, off = run(model, turn2, False, block, depth)
    on_tokens, on = run(model, turn2, True, block, depth)
    assert on_tokens == off_tokens, "turn 2: cache on and off differ"
    out = {"turn1_prompt_tokens": t1.prompt_tokens, "turn1_ttft_s": t1.prompt_time_s,
           "turn2_prompt_tokens": on.prompt_tokens, "turn2_cached_tokens": on.cached_tokens,
           "turn2_ttft_s": on.prompt_time_s, "turn2_ttft_cache_off_s": off.prompt_time_s,
           "ttft_ratio_vs_turn1": on.prompt_time_s / t1.prompt_time_s,
           "cached_share_of_turn1_prompt": on.cached_tokens / t1.prompt_tokens}
    print(f"turn 1: {t1.prompt_tokens} tokens, TTFT {t1.prompt_time_s:.3f} s; turn 2: {on.prompt_tokens} tokens, "
          f"{on.cached_tokens} cached ({out['cached_share_of_turn1_prompt']:.1%} of turn 1), TTFT "
          f"{on.prompt_time_s:.3f} s = {out['ttft_ratio_vs_turn1']:.1%} of turn 1 (cache off: "
          f"{off.prompt_time_s:.3f} s); tokens identical", flush=True)
    return out


# ---- agent trace ------------------------------------------------------------------------------------


TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a file of the repository",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]


def agent_trace(turns: int, target_tokens: int, tokenizer) -> list[list]:
    texts = source_texts()
    per = max(200, target_tokens // turns)
    msgs = [{"role": "system", "content": "You are a coding agent. Use the tools to read files."},
            {"role": "user", "content": "Find where the queue module handles timeouts."}]
    prompts = []
    for t in range(turns):
        prompts.append(list(msgs))
        body, i = "", t
        while len(tokenizer.encode(body)) < per:
            body += texts[i % len(texts)]
            i += 1
        body = tokenizer.decode(tokenizer.encode(body)[:per])
        msgs = msgs + [
            {"role": "assistant", "content": f"Reading file {t}.", "tool_calls": [{
                "id": f"call_{t}", "type": "function",
                "function": {"name": "read_file", "arguments": json.dumps({"path": f"lib/file_{t}.py"})}}]},
            {"role": "tool", "tool_call_id": f"call_{t}", "content": body}]
    return prompts


def bench_agent(model, block, depth, turns, target_tokens) -> dict:
    prompts = [model.tokenizer.encode_chat(p, tools=TOOLS) for p in agent_trace(turns, target_tokens, model.tokenizer)]
    model.prefix_cache.clear()
    rows, off_total, on_total = [], 0.0, 0.0
    for i, ids in enumerate(prompts):
        off_tokens, off = run(model, ids, False, block, depth)
        on_tokens, on = run(model, ids, True, block, depth)
        assert on_tokens == off_tokens, f"agent turn {i}: cache on and off differ"
        off_total += off.prompt_time_s
        on_total += on.prompt_time_s
        rows.append({"turn": i + 1, "prompt_tokens": on.prompt_tokens, "cached_tokens": on.cached_tokens,
                     "ttft_s": on.prompt_time_s, "ttft_cache_off_s": off.prompt_time_s})
        print(f"agent turn {i + 1:>2}: {on.prompt_tokens:>6} tokens, {on.cached_tokens:>6} cached, TTFT "
              f"{on.prompt_time_s:6.3f} s (cache off {off.prompt_time_s:6.3f} s)", flush=True)
    print(f"agent trace: total prefill {on_total:.2f} s with the cache, {off_total:.2f} s without "
          f"= {on_total / off_total:.1%}; tokens identical on every turn", flush=True)
    return {"turns": rows, "prefill_s_cache_on": on_total, "prefill_s_cache_off": off_total,
            "ratio": on_total / off_total}


# ---- a Claude Code conversation through the server ----------------------------------------------


FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "agent_requests" / "claude_code_messages_1.json"


def claude_turns(turns: int, result_tokens: int, tokenizer) -> list[dict]:
    """Claude Code's real first request (tests/fixtures), then `turns - 1` more: each answers
    with a Read tool_use and gets a file's text back as the tool_result."""
    body = json.loads(FIXTURE.read_text())
    body.update(stream=False, max_tokens=16, temperature=0)
    body.pop("thinking", None)
    texts = source_texts()
    bodies = [json.loads(json.dumps(body))]
    for t in range(1, turns):
        text = tokenizer.decode(tokenizer.encode(texts[t % len(texts)] * 4)[:result_tokens])
        body["messages"] = body["messages"] + [
            {"role": "assistant", "content": [
                {"type": "text", "text": f"Let me read file {t}."},
                {"type": "tool_use", "id": f"toolu_{t:04d}", "name": "Read", "input": {"file_path": f"/src/f{t}.py"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{t:04d}", "content": text}]}]
        bodies.append(json.loads(json.dumps(body)))
    return bodies


def bench_claude(path: Path, block: int, depth: int, turns: int, result_tokens: int) -> dict:
    from fastapi.testclient import TestClient

    from mtplx.server.app import create_app
    from mtplx.server.model_adapter import load_adapter

    apps = {}
    for name, gb in (("on", 8.0), ("off", 0.0)):
        adapter, _ = load_adapter(str(path), depth=depth, prefix_cache={"gb": gb, "block": block})
        apps[name] = TestClient(create_app(adapter, depth=depth))
    bodies = claude_turns(turns, result_tokens, apps["on"].app.state.mtplx.engine.model.tokenizer)
    rows, tot = [], {"on": 0.0, "off": 0.0}
    with apps["on"], apps["off"]:
        for i, body in enumerate(bodies):
            res = {}
            for name in ("off", "on"):
                t = time.perf_counter()
                r = apps[name].post("/v1/messages", json=body)
                wall = time.perf_counter() - t
                assert r.status_code == 200, r.text[:300]
                res[name] = (r.json(), wall)
                tot[name] += r.json()["timings"]["prompt_ms"] / 1000
            assert res["on"][0]["content"] == res["off"][0]["content"], f"turn {i + 1}: cache on and off differ"
            u, tm = res["on"][0]["usage"], res["on"][0]["timings"]
            prompt = u["input_tokens"] + u["cache_read_input_tokens"] + u["cache_creation_input_tokens"]
            rows.append({"turn": i + 1, "prompt_tokens": prompt, "cache_read": u["cache_read_input_tokens"],
                         "prefill_s": tm["prompt_ms"] / 1000,
                         "prefill_cache_off_s": res["off"][0]["timings"]["prompt_ms"] / 1000,
                         "request_s": res["on"][1], "request_cache_off_s": res["off"][1]})
            print(f"claude turn {i + 1:>2}: {prompt:>6} tokens, {u['cache_read_input_tokens']:>6} cache_read, prefill "
                  f"{rows[-1]['prefill_s']:6.3f} s (off {rows[-1]['prefill_cache_off_s']:6.3f} s), request "
                  f"{res['on'][1]:6.3f} s (off {res['off'][1]:6.3f} s)", flush=True)
    print(f"claude trace: total prefill {tot['on']:.2f} s with the cache, {tot['off']:.2f} s without "
          f"= {tot['on'] / tot['off']:.1%}; answers identical on every turn", flush=True)
    return {"turns": rows, "prefill_s_cache_on": tot["on"], "prefill_s_cache_off": tot["off"],
            "ratio": tot["on"] / tot["off"]}


# ---- memory -----------------------------------------------------------------------------------------


def bench_memory(model, block, depth, tokens, fills: int = 16) -> dict:
    """Per prompt stored: the process's RSS growth against the blocks' reported bytes. The first
    fill is not counted (it grows the allocator's arenas for the session too); the next ones are
    partly served from memory earlier sessions freed, so the steady state is the second half."""
    import statistics

    text = model.tokenizer.encode("\n".join(source_texts()) * 8)
    model.prefix_cache.clear()
    ratios, rows = [], []
    for i in range(fills + 1):
        ids = [(t + 7 * i) % model.config.vocab_size for t in text[:tokens]]
        gc.collect()
        before, held = rss_bytes(), model.prefix_cache.bytes
        run(model, ids, True, block, depth)
        gc.collect()
        grown, reported = rss_bytes() - before, model.prefix_cache.bytes - held
        if i:
            rows.append({"reported_bytes": reported, "rss_growth_bytes": grown})
            ratios.append(grown / reported)
    med = statistics.median(ratios)
    half = rows[len(rows) // 2:]
    total = sum(r["rss_growth_bytes"] for r in half) / sum(r["reported_bytes"] for r in half)
    reported = rows[0]["reported_bytes"]
    out = {"tokens_per_fill": tokens, "fills": rows, "median_ratio": med, "steady_ratio": total,
           "bytes_per_token": reported / tokens}
    print(f"memory: {fills} prompts of {tokens} tokens, {reported / 2**20:.1f} MiB reported each; RSS growth / "
          f"reported: {total:.3f} in the second half, median {med:.3f} (per fill {' '.join(f'{r:.2f}' for r in ratios)}); "
          f"{out['bytes_per_token']:.0f} bytes/token", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded default model)")
    ap.add_argument("--only", choices=["prefill", "turn2", "agent", "claude", "memory"], action="append", default=None)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--blocks", type=int, nargs="+", default=[256], help="prefill blocks to compare")
    ap.add_argument("--block", type=int, default=256, help="block of the cache runs")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--turn1-tokens", type=int, default=8192)
    ap.add_argument("--agent-turns", type=int, default=10)
    ap.add_argument("--agent-tokens", type=int, default=30000)
    ap.add_argument("--claude-turns", type=int, default=10)
    ap.add_argument("--claude-result-tokens", type=int, default=1000, help="tokens of each tool result")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: what serve uses)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    src = Path(args.model) if args.model else mtplx.api.default_model_path()
    path = long_context_copy(src, 65536)
    model = mtplx.load(path, backend="torch")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        from mtplx.backends.torch.loader import apply_default_threads

        apply_default_threads(model.model)
    model.enable_prefix_cache(gb=8, block=args.block)
    print(f"model {src} (max_position_embeddings 65536 copy), torch threads {torch.get_num_threads()}, "
          f"depth {args.depth}, cache block {args.block}", flush=True)
    only = set(args.only or ["prefill", "turn2", "agent", "claude", "memory"])
    out: dict = {"model": str(src), "threads": torch.get_num_threads(), "depth": args.depth, "block": args.block}
    if "prefill" in only:
        out["prefill"] = bench_prefill(model, args.lengths, args.blocks, args.depth)
    if "turn2" in only:
        out["turn2"] = bench_turn2(model, args.block, args.depth, args.turn1_tokens)
    if "agent" in only:
        out["agent"] = bench_agent(model, args.block, args.depth, args.agent_turns, args.agent_tokens)
    if "claude" in only:
        out["claude"] = bench_claude(path, args.block, args.depth, args.claude_turns, args.claude_result_tokens)
    if "memory" in only:
        out["memory"] = bench_memory(model, args.block, args.depth, 4096)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
