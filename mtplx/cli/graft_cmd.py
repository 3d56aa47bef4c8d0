"""`mtplx graft BASE HEAD -o OUT`: attach an MTP head to a base checkpoint, fixing conventions.

HEAD: an `mtp.safetensors` sidecar, an MLX MTP folder (`qwen3_5_mtp`), or a checkpoint whose
head is embedded. OUT gets links to the base's weight files (never copies), the head in the
base's layout, and `mtplx_graft.json` (provenance). Exit codes: 0 grafted (and OUT passes
`mtplx inspect`), 1 refused (the message says why and what to do), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "attach an MTP head (sidecar file, MLX MTP folder, or another checkpoint's) to a base model"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("graft", help=HELP, description=HELP + ". " + __doc__.split("\n\n")[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", metavar="BASE", help="the base checkpoint folder (any layout, quantized or not)")
    p.add_argument("head", metavar="HEAD", help="the head: mtp.safetensors, an MLX MTP folder, or a checkpoint")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="new folder to write (must not exist)")
    p.add_argument("--head-dtype", default="bf16", choices=("bf16", "keep", "q8", "q4"),
                   help="head weights: bf16 (default), keep the source's, or MLX-affine q8/q4 "
                        "(quantizing an MoE head costs most of its acceptance)")
    p.add_argument("--head-norms", default="auto", choices=("auto", "zero_centered", "one_plus_w"),
                   help="how HEAD stores its norms (default: decided from its format and its weights)")
    p.add_argument("--force", action="store_true", help="replace OUT if it is an earlier graft output")
    p.add_argument("--probe", action="store_true",
                   help="afterwards, measure the head's teacher-forced acceptance on OUT (loads it with torch)")
    p.add_argument("--json", action="store_true", help="print the provenance record as JSON")
    return p


def run(args) -> int:
    from mtplx.checkpoint.graft import GraftError, graft

    console = None
    progress = None
    if not args.json:
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            console = Console(stderr=True, highlight=False)
            progress = Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                                console=console, transient=True)
        except ImportError:  # pragma: no cover
            progress = None
    tasks: dict[str, int] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if progress is None:
            return
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done, total=total)

    try:
        if progress is not None:
            progress.start()
        try:
            rep = graft(args.base, args.head, args.out, head_dtype=args.head_dtype, force=args.force,
                        head_norms=args.head_norms, progress=on_progress)
        finally:
            if progress is not None:
                progress.stop()
    except GraftError as e:
        if args.json:
            print(json.dumps({"ok": False, "code": e.code, "error": str(e)}, indent=2))
        else:
            print(f"error: graft refused ({e.code}): {e}", file=sys.stderr)
        return 1
    d = rep.to_dict()
    probe = None
    if args.probe:
        from mtplx.backends.torch.probe import probe_checkpoint

        probe = probe_checkpoint(rep.out)
        d["probe"] = probe.to_dict()
    if args.json:
        print(json.dumps({"ok": True, **d}, indent=2))
        return 0
    n = d["norms"]
    lines = [
        f"grafted {d['head_source']['path']} ({d['head_source']['kind']}, {d['head_source']['layout']}) onto {d['base']}",
        f"  out          {d['out']} ({len(d['base_files'])} base file(s) linked, head {d['head_bytes'] / 2**20:.2f} MiB "
        f"in {d['head_file']})",
        f"  head         {d['head_source']['layers']} layer(s), {d['head_layout']}, {d['head_dtype']}",
        f"  norms        stored {n['convention']} ({n['source']}: {n['evidence']}); written {n['written_as']}",
    ]
    lines += [f"  converted    {c}" for c in d["conversions"]]
    lines += [f"  warning      {w}" for w in d["warnings"]]
    lines.append(f"  inspect      {d['inspect']['verdict']}: {d['inspect']['reason']}")
    print("\n".join(lines))
    if probe is not None:
        print(probe.render())
    return 0
