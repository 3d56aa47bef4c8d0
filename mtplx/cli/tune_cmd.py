"""`mtplx tune`: find the depth that is fastest on this machine and remember it.

A depth is kept only when it beats plain decoding by more than --margin in the same run;
otherwise depth 0 is remembered. `mtplx generate` and `mtplx serve` use the remembered depth
when --depth is not given.
"""

from __future__ import annotations

import argparse
import json
import sys

from mtplx.cli.bench_cmd import add_common, measure, parse_depths, prepare

HELP = "pick the fastest MTP depth for this model on this machine (kept only when it wins)"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tune", help=HELP, description=HELP)
    add_common(p)
    p.add_argument("--max-depth", type=int, default=5, help="largest depth to try (default 5)")
    p.add_argument("--margin", type=float, default=0.05, help="required speedup over depth 0 (default 0.05 = 5%%)")
    return p


def run(args) -> int:
    from rich.console import Console

    from mtplx.bench import format_table
    from mtplx.tuning import save_tuned

    if args.max_depth < 1:
        raise ValueError(f"--max-depth must be >= 1, got {args.max_depth}")
    if args.draft_cutoff:
        raise ValueError("tune remembers a depth only, not a --draft-cutoff; compare cutoffs with `mtplx bench`")
    model, params, prompts = prepare(args)
    depths = parse_depths(",".join(str(d) for d in range(args.max_depth + 1)))
    report = measure(model, prompts, depths, params, args.repeats, quiet=args.json or not sys.stderr.isatty())
    best = report.best_depth
    if best and report.speedup(best) < 1.0 + args.margin:
        best = 0
    where = save_tuned(model, best, {"speedup": report.speedup(best) if best else 1.0,
                                     "temperature": params.temperature})
    data = {"model": str(model.path), "depth": best, "saved_to": str(where), **report.to_dict()}
    if args.json:
        print(json.dumps(data))
    else:
        console = Console()
        console.print(format_table(report, f"mtplx tune: {model.path.name}"))
        if best:
            console.print(f"best depth {best}: {report.speedup(best):.2f}x over plain decoding; saved to {where}")
        else:
            console.print(f"no depth beat plain decoding by {args.margin:.0%}: depth 0 saved to {where}")
    return 0
