"""`mtplx generate`: plain (depth 0) or MTP decoding, streaming text, then the stats lines.

    mtplx generate --model DIR --prompt "Hello" --depth 3 --max-tokens 128 --temp 0.7
    echo "Hello" | mtplx generate --model DIR --prompt - --chat --json

Text goes to stdout as it is decided; the stats lines (mlx-lm style, plus the MTP line) go to
stderr, so stdout stays the generated text. --json prints one object instead:
{text, prompt_token_ids, token_ids, finish_reason, stop, stats}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from mtplx.cli.options import add_drafting_args, add_torch_args, load_options, settle_heap

HELP = "generate text with MTP speculative decoding (or plain decoding with --depth 0)"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help=HELP, description=HELP)
    p.add_argument("--model", "-m", default=None, help="checkpoint folder (default: the embedded default model)")
    p.add_argument("--prompt", "-p", required=True, help="prompt text, or - to read it from stdin")
    p.add_argument("--chat", action="store_true", help="apply the checkpoint's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--no-thinking", action="store_true", help="pass enable_thinking=false to the chat template")
    p.add_argument("--depth", "-d", type=int, default=None,
                   help="MTP draft depth; 0 = plain decoding (default: the depth `mtplx tune` kept, else 3 with a head, else 0)")
    p.add_argument("--max-tokens", "-n", type=int, default=256, help="maximum tokens to generate (default 256)")
    p.add_argument("--temp", "--temperature", dest="temp", type=float, default=0.0, help="temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * max prob (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed (runs with the same seed repeat exactly)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); never printed")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    p.add_argument("--greedy-draft", action="store_true", help="at temp > 0, draft with argmax (still exact)")
    p.add_argument("--backend", choices=["torch", "mlx"], default=None, help="array backend (default: per platform)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1")
    add_torch_args(p)
    add_drafting_args(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 for small CPU models, else torch's choice; $MTPLX_THREADS)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="prefix cache on disk: a prompt that starts like one of an earlier run restores "
                        "those blocks instead of prefilling them (same output; one model per DIR)")
    p.add_argument("--cache-block", type=int, default=None, metavar="N",
                   help="prefill block in tokens, the prefix cache's granularity (default 256)")
    p.add_argument("--compare", action="store_true",
                   help="also run plain decoding (depth 0) on the same prompt and report the speedup")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    return p


def _prompt_text(arg: str) -> str:
    if arg == "-":
        return sys.stdin.read()
    return arg


def run(args) -> int:
    import mtplx
    from mtplx.decoding.params import SamplingParams

    params = SamplingParams(
        temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
        max_tokens=args.max_tokens, stop=list(args.stop), ignore_eos=args.ignore_eos,
        greedy_draft=args.greedy_draft, draft_cutoff=args.draft_cutoff,
    )
    params.validate()
    if args.depth is not None and args.depth < 0:
        raise ValueError(f"--depth must be >= 0, got {args.depth}")
    text = _prompt_text(args.prompt)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    model = mtplx.load(args.model, backend=args.backend, dtype=args.dtype, device=args.device, **load_options(args))
    if args.threads is None and model.backend == "torch":  # small CPU models: 1 thread (see loader)
        from mtplx.backends.torch.loader import apply_default_threads

        apply_default_threads(model.model)
    settle_heap()
    if args.cache_dir:
        from mtplx.prefix import default_cache_gb

        model.enable_prefix_cache(gb=default_cache_gb(str(model.device)), block=args.cache_block,
                                  cache_dir=args.cache_dir)
    try:
        return _generate(args, model, text, params)
    finally:
        if model.prefix_cache is not None:
            model.prefix_cache.close()


def _generate(args, model, text, params) -> int:
    import mtplx

    if args.chat:
        messages = []
        if args.system:
            messages.append({"role": "system", "content": args.system})
        messages.append({"role": "user", "content": text})
        prompt = messages
    else:
        if args.system:
            raise ValueError("--system needs --chat")
        prompt = text
    chat_kwargs = {"enable_thinking": False} if args.no_thinking else None

    if args.compare:  # both timed runs warm: first-use costs (kernel objects, caches) would fall on the MTP run
        warm = dataclasses.replace(params, max_tokens=min(params.max_tokens, 8))
        for depth in {0, args.depth}:
            mtplx.generate(model, prompt, warm, depth, chat_kwargs=chat_kwargs)

    if args.json:
        res = mtplx.generate(model, prompt, params, args.depth, chat_kwargs=chat_kwargs)
        out = res.to_dict()
        if args.compare:
            out["compare"] = _compare(model, prompt, params, chat_kwargs, res.stats, res.token_ids)
        print(json.dumps(out, ensure_ascii=False))
        return 0

    last = None
    out = sys.stdout
    tokens = []
    for r in mtplx.stream_generate(model, prompt, params, args.depth, chat_kwargs=chat_kwargs):
        tokens.append(r.token)
        if r.text:
            out.write(r.text)
            out.flush()
        last = r
    out.write("\n")
    out.flush()
    err = sys.stderr
    print("==========", file=err)
    for line in last.stats.format_lines():
        print(line, file=err)
    print(f"Finish: {last.finish_reason}", file=err)
    if args.compare:
        c = _compare(model, prompt, params, chat_kwargs, last.stats, tokens)
        if c["depth"] == 0:
            print("Compare: this run was plain decoding already (depth 0)", file=err)
        else:
            same = {True: "yes", False: "NO (a bug: please report it)", None: "- (sampled)"}[c["identical_tokens"]]
            print(f"Compare: plain decoding {c['plain_generation_tps']:.3f} tokens-per-sec, "
                  f"MTP depth {c['depth']} {c['mtp_generation_tps']:.3f} -> speedup {c['speedup']:.2f}x; "
                  f"identical tokens: {same}", file=err)
    return 0


def _compare(model, prompt, params, chat_kwargs, mtp_stats, mtp_tokens) -> dict:
    """Run the same request at depth 0 and compare speed (and tokens, when greedy)."""
    import mtplx

    if mtp_stats.depth == 0:
        return {"depth": 0}
    plain = mtplx.generate(model, prompt, params, 0, chat_kwargs=chat_kwargs)
    base, fast = plain.stats.generation_tps, mtp_stats.generation_tps
    return {
        "depth": mtp_stats.depth,
        "plain_generation_tps": base,
        "mtp_generation_tps": fast,
        "speedup": fast / base if base > 0 else None,
        "identical_tokens": (plain.token_ids == list(mtp_tokens)) if params.greedy else None,
    }
