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
5 unsupported-architecture, 6 unreadable, 7 backbone-invalid"""


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
    return p


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
    probe = _probe(args, rep)
    if args.json:
        if probe is None:
            print(rep.to_json())
        else:
            import json

            print(json.dumps({**rep.to_dict(), "probe": probe.to_dict()}, indent=2))
        return rep.exit_code
    if rep.verdict in (VERDICT_UNREADABLE, VERDICT_UNSUPPORTED):
        print(f"error: {rep.reason.splitlines()[0] if rep.reason else rep.verdict}", file=sys.stderr)
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
    if probe is not None:
        print(probe.render())
    return rep.exit_code
