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
    return p


def run(args) -> int:
    from mtplx.checkpoint.inspect import VERDICT_UNREADABLE, VERDICT_UNSUPPORTED, inspect_checkpoint, render_text

    rep = inspect_checkpoint(args.model)
    if args.json:
        print(rep.to_json())
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
    return rep.exit_code
