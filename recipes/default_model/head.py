"""Step 4: train the default model's MTP head with `mtplx forge` and ship the checkpoint.

    python recipes/default_model/head.py --minutes 10     # -> mtplx/assets/default_model/

Assembles the trunk (runs/default_model/trunk_v2) and the v2 tokenizer into an HF checkpoint
folder, trains a fresh MoE MTP head on it by self-distillation (trunk frozen, depth-aware) on the
training split of the stdlib corpus and the chats (chats.py), evaluates teacher-forced acceptance
on the held-out modules and the held-out chat and tool records, and writes the result (head embedded in model.safetensors, HF key names, per-expert
MoE head, zero-centred norms, bf16) into the package's asset folder, with recipe.json
recording how it was made.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def assemble(trunk: Path, tokenizer_dir: Path, dst: Path) -> Path:
    """trunk weights + config + tokenizer files -> one checkpoint folder (no head yet)."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(trunk / name, dst / name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_dir / name, dst / name)
    cfg = json.loads((dst / "config.json").read_text())
    for noise in ("id2label", "label2id", "chunk_size_feed_forward", "problem_type", "output_hidden_states",
                  "return_dict", "is_encoder_decoder", "_name_or_path", "output_attentions", "use_cache"):
        cfg.pop(noise, None)
    cfg["model_type"] = "qwen3_5_moe_text"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    (dst / "generation_config.json").write_text(json.dumps({
        "eos_token_id": cfg.get("eos_token_id"), "pad_token_id": cfg.get("pad_token_id"),
        "do_sample": False}, indent=2))
    return dst


def add_head(dst: Path, head_from: Path) -> int:
    """Copy the `mtp.*` tensors of a checkpoint (an earlier build's asset) into dst, so forge
    refreshes that head on the new trunk instead of starting one from the trunk's layers."""
    from safetensors.torch import load_file, save_file

    head = {k: v for k, v in load_file(str(head_from / "model.safetensors")).items() if k.startswith("mtp.")}
    if not head:
        raise SystemExit(f"--head-init {head_from}: no mtp.* tensors in its model.safetensors")
    tensors = load_file(str(dst / "model.safetensors"))
    tensors.update(head)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return len(head)


def trunk_chain(trunk: Path) -> list[dict]:
    """The training runs behind a trunk, oldest first: each run's trunk_meta.json names the folder
    it started from (`init`); a shipped asset it started from brings its own recipe.json's phases
    (or, for the v1 asset, its trunk's numbers)."""
    chain, folder = [], trunk
    while folder is not None:
        meta_file, recipe_file = folder / "trunk_meta.json", folder / "recipe.json"
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text())
            chain.append({"folder": str(folder), **meta})
            folder = Path(meta["init"]) if meta.get("init") else None
        else:
            if recipe_file.is_file():
                recipe = json.loads(recipe_file.read_text())
                chain.extend(recipe["trunk_phases"][::-1] if "trunk_phases" in recipe
                             else [{"folder": str(folder), "v1": recipe.get("trunk")}])
            folder = None
    return chain[::-1]


def head_corpus(work: Path, checkpoint: Path) -> tuple[list[str], list[str]]:
    """Training docs: stdlib code + the chat documents; held-out docs: held-out code and the
    evaluation records with their reference answers, so acceptance is measured on both."""
    from chats import ANSWER_SEP, Renderer, eval_doc

    from mtplx.tokenizer import Tokenizer

    eos = common.EOS
    split = lambda name: [d.replace(ANSWER_SEP, "") for d in  # noqa: E731
                          (work / name).read_text(encoding="utf-8").split(eos) if d.strip()]
    train = split("train.txt") + (split("chat_train.txt") if (work / "chat_train.txt").exists() else [])
    held = split("heldout.txt")
    if (work / "chat_eval.jsonl").exists():
        R = Renderer(Tokenizer.from_dir(checkpoint))
        recs = [json.loads(line) for line in (work / "chat_eval.jsonl").read_text().splitlines()]
        held += [eval_doc(R, r).replace(ANSWER_SEP, "") for r in recs]
    return train, held


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=common.WORK_DIR)
    ap.add_argument("--out", type=Path, default=common.ASSET_DIR)
    ap.add_argument("--trunk", type=Path, default=common.WORK_DIR / "trunk_v2")
    ap.add_argument("--tokenizer-dir", type=Path, default=common.WORK_DIR / "tokenizer_v2")
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--pool", type=int, default=768)
    ap.add_argument("--seed", type=int, default=common.SEED)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--head-init", type=Path, default=None,
                    help="a checkpoint whose MTP head to refresh (an earlier build's asset) instead of a "
                         "head started from the trunk's layers")
    args = ap.parse_args()

    from mtplx.forge import Corpus, ForgeOptions, forge

    t0 = time.time()
    base = assemble(args.trunk, args.tokenizer_dir, args.work / "checkpoint_nohead")
    if args.head_init:
        add_head(base, args.head_init)
    train, held = head_corpus(args.work, base)
    corpus = Corpus(train=train, heldout=held, source="stdlib + chats (recipe split: held-out modules "
                                                      + ", ".join(common.HELD_OUT_MODULES)
                                                      + "; held-out tool verbs, nouns and phrasings)")
    opts = ForgeOptions(steps=args.steps, minutes=args.minutes, depth=args.depth, seed=args.seed, batch=8,
                        seq_len=256, lr=2e-3, pool_windows=args.pool, eval_windows=48,
                        init="existing" if args.head_init else "trunk",
                        layout="embedded", threads=args.threads)
    log = (args.work / "head_log.jsonl").open("w")

    def on_event(e):
        if e["event"] != "step" or e["step"] % 10 == 0:
            log.write(json.dumps(e) + "\n")
            log.flush()
        if e["event"] in ("before", "after", "written"):
            print(json.dumps(e), flush=True)

    if args.out.exists():
        shutil.rmtree(args.out)
    rep = forge(base, corpus, args.out, opts, on_event=on_event)
    for extra in ("trunk_meta.json",):
        if (args.out / extra).exists():
            (args.out / extra).unlink()
    trunk_meta = json.loads((args.trunk / "trunk_meta.json").read_text())
    phases = trunk_chain(args.trunk)
    corpus_meta = json.loads((args.work / "corpus.json").read_text())
    chats_meta = json.loads((args.work / "chats.json").read_text()) if (args.work / "chats.json").exists() else None
    recipe = {
        "recipe": "recipes/default_model (v1: corpus.py, tokenizer.py, trunk.py train; "
                  "v2: chats.py, tokenizer.py --extend, chat_trunk.py, head.py)",
        "seed": common.SEED,
        "corpus": corpus_meta,
        "chats": chats_meta,
        "held_out_modules": list(common.HELD_OUT_MODULES),
        "trunk": trunk_meta,
        "trunk_phases": phases,
        "head": {k: v for k, v in rep.to_dict().items() if k not in ("history",)},
        "head_init": str(args.head_init) if args.head_init else "trunk",
        "head_seconds": round(time.time() - t0, 1),
    }
    (args.out / "recipe.json").write_text(json.dumps(recipe, indent=2))
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(json.dumps({"out": str(args.out), "bytes": size, "before": rep.before["by_depth"],
                      "after": rep.after["by_depth"], "steps": rep.steps, "final_loss": rep.final_loss}))


if __name__ == "__main__":
    main()
