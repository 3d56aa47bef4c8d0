"""Flags shared by the commands that load a model and decode (generate, bench, serve)."""

from __future__ import annotations

import argparse


def add_drafting_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft-cutoff", type=float, default=0.0, metavar="P",
                   help="adaptive draft length: stop a cycle's drafting once the head's confidence in its path "
                        "falls below P (0 = always draft --depth tokens; output stays exact)")
    p.add_argument("--draft-lm-head", choices=["auto", "int8", "full"], default=None,
                   help="torch: lm_head precision of MTP drafting (auto: int8 on CPU; drafts only, output stays exact)")


def add_torch_args(p: argparse.ArgumentParser) -> None:
    add_tp_arg(p)
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="torch: weight-only int8 on load (faster CPU decode; still exact MTP vs depth 0)")
    p.add_argument("--kernel", choices=["auto", "fused", "rowmm", "torch"], default=None,
                   help="torch: the exact decode/verify path; auto (default, or $MTPLX_KERNEL): fused (the whole step "
                        "in one compiled call) where the model allows, else rowmm (the compiled fixed-order CPU "
                        "kernels op by op; AVX-512 / AVX2), else torch's own matmuls with row padding")


def add_tp_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=None, metavar="N",
                   help="tensor parallel over N processes: torch (gloo on CPU, NCCL on N GPUs; spawned here, or "
                        "torchrun's ranks) or MLX (under mlx.launch) (docs/tensor-parallel.md)")


def load_options(args: argparse.Namespace) -> dict:
    """The backend loader options the flags ask for (none by default, so MLX takes them all)."""
    options = {}
    if args.quantize:
        options["quantize"] = args.quantize
    if getattr(args, "kernel", None):
        options["kernel"] = args.kernel
    if args.draft_lm_head:
        options["draft_lm_head"] = args.draft_lm_head
    tp = getattr(args, "tp", None)
    if tp is not None:
        if tp < 1:
            raise ValueError(f"--tp must be >= 1, got {tp}")
        if tp > 1:
            options["tp"] = tp
            options["tp_threads"] = getattr(args, "threads", None)  # every rank's own thread count
    return options


def settle_heap() -> None:
    """In a process that keeps one model for its life (generate, bench, serve): take every object
    alive after loading (the model's modules and tensors, the tokenizer) out of the garbage
    collector's scans. A decode cycle allocates many small objects, and each full collection
    otherwise walks the whole model's object graph: ~7% of decode time on the default model."""
    import gc

    gc.collect()
    gc.freeze()

