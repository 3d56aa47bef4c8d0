"""`mtplx bench`: plain decoding against each MTP depth, interleaved, as a table (or --json).

    mtplx bench --depths 0,1,2,3 --max-tokens 128
    mtplx bench --model DIR --prompt-file prompts.txt --temp 0.7 --repeats 3 --json
"""

from __future__ import annotations

import argparse
import json
import sys

from mtplx.cli.options import add_drafting_args, add_torch_args, load_options, settle_heap

HELP = "measure MTP speedup over plain decoding (interleaved runs, one table)"


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="checkpoint folder (default: the embedded default model)")
    p.add_argument("--prompt", "-p", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", default=None, help="prompts separated by lines holding only '---'")
    p.add_argument("--max-tokens", "-n", type=int, default=128, help="tokens per run (default 128)")
    p.add_argument("--temp", "--temperature", dest="temp", type=float, default=0.0, help="temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled runs (default 0)")
    p.add_argument("--repeats", type=int, default=1, help="passes over the prompts (default 1)")
    p.add_argument("--backend", choices=["torch", "mlx"], default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 for small CPU models, else torch's choice; $MTPLX_THREADS)")
    add_torch_args(p)
    add_drafting_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help=HELP, description=HELP)
    add_common(p)
    p.add_argument("--depths", default="0,1,2,3", help="comma-separated depths (default 0,1,2,3)")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    return p


def parse_depths(text: str) -> list[int]:
    try:
        depths = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--depths must be comma-separated integers like 0,1,2,3, got {text!r}") from None
    if not depths or min(depths) < 0:
        raise ValueError(f"--depths must list depths >= 0, got {text!r}")
    return depths


def load_prompts(args) -> list[str]:
    from mtplx.bench import DEFAULT_PROMPTS

    prompts = list(args.prompt)
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [p.strip("\n") for p in f.read().split("\n---\n") if p.strip()]
    return prompts or list(DEFAULT_PROMPTS)


def prepare(args):
    """Load the model and build sampling params from the shared flags."""
    import mtplx
    from mtplx.decoding.params import SamplingParams

    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    params = SamplingParams(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            draft_cutoff=args.draft_cutoff,
                            max_tokens=args.max_tokens, ignore_eos=True)
    params.validate()
    model = mtplx.load(args.model, backend=args.backend, dtype=args.dtype, device=args.device, **load_options(args))
    if args.threads is None and model.backend == "torch":  # small CPU models: 1 thread (see loader)
        from mtplx.backends.torch.loader import apply_default_threads

        apply_default_threads(model.model)
    settle_heap()
    return model, params, load_prompts(args)


def measure(model, prompts, depths, params, repeats, quiet: bool):
    from rich.progress import Progress

    from mtplx.bench import run_bench

    with Progress(transient=True, disable=quiet) as bar:
        task = bar.add_task("benchmarking", total=None)
        return run_bench(model, prompts, depths, params, repeats,
                         progress=lambda i, n: bar.update(task, completed=i, total=n))


def run(args) -> int:
    from rich.console import Console

    from mtplx.bench import format_table

    depths = parse_depths(args.depths)
    model, params, prompts = prepare(args)
    report = measure(model, prompts, depths, params, args.repeats, quiet=args.json or not sys.stderr.isatty())
    data = {"model": str(model.path), "backend": model.backend, "dtype": model.dtype, "device": model.device,
            "tp": model.load_options.get("tp", 1),
            **report.to_dict()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(data, f, indent=2)
    if args.json:
        print(json.dumps(data))
    else:
        tp = model.load_options.get("tp", 1)
        Console().print(format_table(report, f"mtplx bench: {model.path.name} ({model.backend}, {model.dtype}"
                                             f"{f', tp {tp}' if tp > 1 else ''}, temp {params.temperature}, "
                                             f"{len(prompts)} prompts x {args.repeats})"))
    bad = [d for d, r in report.results.items() if d and params.greedy and r.mismatches]
    if bad:
        print(f"error: greedy MTP output differed from depth 0 at depths {bad}: please report this bug",
              file=sys.stderr)
        return 1
    return 0
