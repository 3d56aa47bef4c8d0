"""Step 1: build the training and held-out corpora from the CPython standard library.

    python recipes/default_model/corpus.py            # -> runs/default_model/{train,heldout}.txt

Sources: every `.py` file under `sysconfig.get_paths()['stdlib']` (site-packages excluded) and
the Python documentation when the machine has it. Documents are separated by <|endoftext|>.
A fixed fraction of training files is also wrapped as a ChatML exchange ("Write the Python
module `x`." -> the source) so the chat template leads to code. Held-out modules
(common.HELD_OUT_MODULES) go to heldout.txt only. Deterministic: sorted walk, hashed choices.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CHAT_FRACTION = 0.15


def iter_stdlib_files(root: Path):
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if any(rel.startswith(s + "/") or f"/{s}/" in f"/{rel}" for s in common.SKIP_DIRS):
            continue
        try:
            if p.stat().st_size > common.MAX_FILE_BYTES or p.stat().st_size == 0:
                continue
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        yield rel, text


def iter_doc_files():
    for d in common.docs_dirs():
        for p in sorted(d.rglob("*.txt")):
            try:
                text = p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if text.strip() and p.stat().st_size <= common.MAX_FILE_BYTES:
                yield "docs/" + p.relative_to(d).as_posix(), text


def chat_wrap(rel: str, text: str) -> str:
    name = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    return (f"<|im_start|>user\nWrite the Python module `{name}`.<|im_end|>\n"
            f"<|im_start|>assistant\n{text}<|im_end|>\n")


def build(out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    eos = common.EOS
    train, held = [], []
    n_train = n_held = n_chat = n_docs = 0
    for rel, text in iter_stdlib_files(common.stdlib_dir()):
        text = text.replace(eos, "").replace("<|im_start|>", "").replace("<|im_end|>", "")
        if common.is_held_out(rel):
            held.append(text)
            n_held += 1
            continue
        n_train += 1
        if (common.stable_hash(rel) % 1000) < CHAT_FRACTION * 1000:
            train.append(chat_wrap(rel, text))
            n_chat += 1
        else:
            train.append(text)
    for rel, text in iter_doc_files():
        train.append(text)
        n_docs += 1
    (out_dir / "train.txt").write_text(eos.join(train) + eos, encoding="utf-8")
    (out_dir / "heldout.txt").write_text(eos.join(held) + eos, encoding="utf-8")
    stats = {
        "stdlib": str(common.stdlib_dir()), "train_files": n_train, "chat_wrapped": n_chat,
        "doc_files": n_docs, "heldout_files": n_held,
        "train_chars": sum(map(len, train)), "heldout_chars": sum(map(len, held)),
    }
    (out_dir / "corpus.json").write_text(json.dumps(stats, indent=2))
    return stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=common.WORK_DIR)
    args = ap.parse_args()
    print(json.dumps(build(args.out), indent=2))


if __name__ == "__main__":
    main()
