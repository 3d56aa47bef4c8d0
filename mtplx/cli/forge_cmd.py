"""`mtplx forge`: train or refresh a checkpoint's MTP head by self-distillation.

    mtplx forge MODEL --corpus stdlib -o OUT --steps 300 --depth 3
    mtplx forge MODEL --corpus ./my_texts --minutes 10 --json

The backbone stays frozen; the head learns the target's own distribution two (and, recursively,
more) tokens ahead. Prints teacher-forced acceptance by depth before and after on held-out text,
then writes the head in the checkpoint's layout (into OUT, a copy of MODEL; in place without -o).
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "train an MTP head for a checkpoint by self-distillation (trunk frozen)"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("forge", help=HELP, description=HELP)
    p.add_argument("model", help="checkpoint folder")
    p.add_argument("--corpus", required=True,
                   help="text to train on: a folder of text/code files, a file, or 'stdlib' (this Python's standard library)")
    p.add_argument("-o", "--out", default=None, help="output folder (a copy of MODEL with the new head); default: in place")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="step budget (deterministic; default 300)")
    budget.add_argument("--minutes", type=float, default=None, help="time budget in minutes")
    p.add_argument("--depth", type=int, default=3, help="drafting depth to train and evaluate (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--batch", type=int, default=8, help="windows per step (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--pool", type=int, default=256, help="training windows with precomputed target hiddens (default 256)")
    p.add_argument("--init", choices=["auto", "existing", "trunk", "random"], default="auto",
                   help="start from the checkpoint's head (auto when present), from a copy of the target's "
                        "last full-attention layer (auto otherwise), or from random weights")
    p.add_argument("--layout", choices=["auto", "embedded", "sidecar_file"], default="auto",
                   help="where a NEW head goes (an existing head keeps its place)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print one JSON report instead of progress and tables")
    return p


def _table(before: dict, after: dict) -> str:
    rows = ["depth  acceptance before -> after   tokens/verify before -> after"]
    for d, (b, a) in enumerate(zip(before["by_depth"], after["by_depth"]), start=1):
        tb, ta = before["tokens_per_verify"][d - 1], after["tokens_per_verify"][d - 1]
        rows.append(f"{d:>5}  {b:>17.3f} -> {a:<6.3f}  {tb:>20.2f} -> {ta:.2f}")
    return "\n".join(rows)


def run(args) -> int:
    from mtplx.forge import ForgeOptions, forge

    opts = ForgeOptions(steps=args.steps, minutes=args.minutes, depth=args.depth, seed=args.seed,
                        batch=args.batch, seq_len=args.seq_len, lr=args.lr, pool_windows=args.pool,
                        init=args.init, layout=args.layout, threads=args.threads, progress=not args.json)
    err = sys.stderr
    bar = task = None
    if not args.json:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        bar = Progress(TextColumn("forge"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                       TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                       console=Console(file=err), transient=True)

    def on_event(e: dict) -> None:
        nonlocal task
        if args.json:
            return
        kind = e["event"]
        if kind == "trunk":
            print(f"target hiddens for {e['windows']} windows of {e['seq_len']} tokens ...", file=err)
        elif kind == "before":
            print(f"teacher-forced acceptance before: {e['by_depth']}", file=err)
            bar.start()
            task = bar.add_task("train", total=1.0, info="")
        elif kind == "step":
            bar.update(task, completed=e["frac"], info=f"step {e['step']} loss {e['loss']:.3f}")
        elif kind == "after":
            bar.stop()
            print(f"teacher-forced acceptance after:  {e['by_depth']}", file=err)

    try:
        rep = forge(args.model, args.corpus, args.out, opts, on_event=on_event)
    finally:
        if bar is not None:
            bar.stop()
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
        return 0
    print(_table(rep.before, rep.after))
    w = rep.written
    print(f"{rep.steps} steps in {rep.seconds:.1f}s (target hiddens {rep.trunk_seconds:.1f}s), final loss "
          f"{rep.final_loss:.4f}, init {rep.init}")
    print(f"wrote {w['tensors']} head tensors ({w['kind']}, {w['experts']}, {w['dtype']}, norms {w['norm_convention']}) "
          f"to {w['path']}")
    print(f"check it: mtplx inspect {rep.out}")
    return 0
