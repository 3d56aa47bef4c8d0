"""`mtplx inspect MODEL [--json]`: what a checkpoint is and whether its MTP head can run.

Never loads weights. Exit codes (one per verdict, see mtplx/checkpoint/inspect.py):
0 runnable-with-mtp (or head-valid for a head-only folder), 3 runnable-without-mtp,
4 head-invalid, 5 unsupported-architecture, 6 unreadable, 7 backbone-invalid.
"""

from __future__ import annotations

import argparse
import sys

HELP = "describe a checkpoint and check its MTP head (the tensor gate) without loading weights"

EPILOG = """exit codes: 0 runnable-with-mtp / head-valid, 3 runnable-without-mtp, 4 head-invalid,
5 unsupported-architecture, 6 unreadable, 7 backbone-invalid; with --plan, 8 when the ranks
cannot split the model or it does not fit --memory-gb"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("inspect", help=HELP, description=HELP, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="checkpoint folder (or an MLX MTP sidecar folder)")
    p.add_argument("--json", action="store_true", help="print the complete report as JSON")
    p.add_argument("--probe", action="store_true",
                   help="also load the model (torch) and measure the head's teacher-forced acceptance by depth "
                        "on a few hundred tokens: catches a mismatched or mis-normalised head")
    p.add_argument("--probe-tokens", type=int, default=256, metavar="N", help="tokens of text for --probe (256)")
    p.add_argument("--probe-depth", type=int, default=3, metavar="D", help="draft depth for --probe (3)")
    p.add_argument("--probe-text", metavar="FILE", help="text for --probe (default: held-out stdlib source)")
    p.add_argument("--probe-greedy", type=int, default=0, metavar="N",
                   help="append the model's own greedy continuation of N tokens (measures every depth exactly)")
    g = p.add_argument_group("tensor-parallel plan", "memory per rank from the config alone (no weights read)")
    g.add_argument("--plan", action="store_true", help="print the plan of --tp N ranks")
    g.add_argument("--tp", type=int, default=1, metavar="N", help="ranks of the plan (default 1)")
    g.add_argument("--context", type=int, default=None, metavar="TOKENS",
                   help="tokens per sequence for the caches (default: the model's positions, at most 32768)")
    g.add_argument("--sequences", type=int, default=1, metavar="N", help="sequences served at once (default 1)")
    g.add_argument("--plan-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="weight and cache dtype of the plan (default bfloat16)")
    g.add_argument("--memory-gb", type=float, default=None, metavar="GB", help="memory of one rank: does it fit?")
    return p


def _plan(args, rep):
    """The TP plan (mtplx.checkpoint.plan) when --plan asks and the backbone is readable, else None."""
    if not getattr(args, "plan", False):
        return None
    from mtplx.checkpoint.config import load_config
    from mtplx.checkpoint.plan import plan_tp

    if args.tp < 1 or args.sequences < 1 or (args.context is not None and args.context < 1):
        raise ValueError("--tp, --sequences and --context must be >= 1")
    cfg = rep.config or load_config(args.model)  # a config.json alone is enough to plan a download
    context = args.context or min(int(cfg.max_position_embeddings), 32768)
    memory = None if args.memory_gb is None else int(args.memory_gb * 2**30)
    return plan_tp(cfg, args.tp, context=context, sequences=args.sequences, dtype=args.plan_dtype, memory=memory,
                   n_mtp_layers=1 if rep.verdict == "runnable-with-mtp" else 0)


def _probe(args, rep):
    """The probe's result (mtplx.backends.torch.probe), or None when the report has no runnable head."""
    if not getattr(args, "probe", False) or rep.verdict != "runnable-with-mtp":
        return None
    from pathlib import Path

    from mtplx.backends.torch.probe import probe_checkpoint

    text = Path(args.probe_text).read_text() if args.probe_text else None
    return probe_checkpoint(args.model, depth=args.probe_depth, n_tokens=args.probe_tokens, text=text,
                            text_source=args.probe_text, greedy=args.probe_greedy)


def run(args) -> int:
    from mtplx.checkpoint.inspect import VERDICT_UNREADABLE, VERDICT_UNSUPPORTED, inspect_checkpoint, render_text

    rep = inspect_checkpoint(args.model)
    plan = _plan(args, rep)
    probe = _probe(args, rep)
    if args.json:
        if probe is None and plan is None:
            print(rep.to_json())
        else:
            import json

            extra = {"probe": probe.to_dict()} if probe is not None else {}
            if plan is not None:
                extra["plan"] = plan.to_dict()
            print(json.dumps({**rep.to_dict(), **extra}, indent=2))
        return _exit_code(rep, plan)
    if rep.verdict in (VERDICT_UNREADABLE, VERDICT_UNSUPPORTED):
        print(f"error: {rep.reason.splitlines()[0] if rep.reason else rep.verdict}", file=sys.stderr)
        if plan is not None:
            from mtplx.checkpoint.plan import render_plan

            print(render_plan(plan))
        return rep.exit_code
    text = render_text(rep)
    try:
        from rich.console import Console
        from rich.text import Text

        console = Console(highlight=False, soft_wrap=True)
        style = {0: "bold green", 3: "bold yellow"}.get(rep.exit_code, "bold red")
        lines = text.splitlines()
        console.print(Text(lines[0], style="bold"))
        for line in lines[1:-1]:
            console.print(Text(line))
        console.print(Text(lines[-1], style=style))
    except ImportError:
        print(text)
    if plan is not None:
        from mtplx.checkpoint.plan import render_plan

        print(render_plan(plan))
    if probe is not None:
        print(probe.render())
    return _exit_code(rep, plan)


def _exit_code(rep, plan) -> int:
    if rep.exit_code == 0 and plan is not None and (plan.problems or plan.fits is False):
        return 8
    return rep.exit_code
