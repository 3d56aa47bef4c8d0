"""Step 2: train a byte-level BPE tokenizer on the training corpus (ChatML specials).

    python recipes/default_model/tokenizer.py            # -> runs/default_model/tokenizer.json, tokenizer_config.json
    python recipes/default_model/tokenizer.py --extend   # v2: + the six tool/think markers -> runs/default_model/tokenizer_v2/

Special tokens get ids 0..2: <|endoftext|>, <|im_start|>, <|im_end|>. The tokenizer_config
carries mtplx's Qwen3.5-structured chat template (tools, XML calls, <think> blocks; thinking
off by default for this model, which was not trained to reason).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from mtplx.chat.formats import builtin_template  # noqa: E402

CHAT_TEMPLATE = builtin_template("qwen3.5", thinking_default=False)


def tokenizer_config(markers: bool = False) -> dict:
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(common.SPECIAL_TOKENS)
    }
    if markers:  # added but not special: decoded as text, so parsers see them (as in Qwen's tokenizers)
        for i, t in enumerate(common.MARKER_TOKENS):
            added[str(common.VOCAB_SIZE + i)] = {**added["0"], "content": t, "special": False}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "model_max_length": common.MAX_POSITIONS if markers else 4096,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "chat_template": CHAT_TEMPLATE,
    }


def _iter_docs(path: Path, chunk: int = 1 << 16):
    text = path.read_text(encoding="utf-8")
    for doc in text.split(common.EOS):
        for i in range(0, len(doc), chunk):
            yield doc[i:i + chunk]


def train(work: Path, vocab_size: int = common.VOCAB_SIZE) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(common.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_iter_docs(work / "train.txt"), trainer=trainer)
    return tok


def save(tok: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2))


def extend(src: Path, out: Path) -> Tokenizer:
    """The v1 tokenizer + the six markers as single added tokens (ids VOCAB_SIZE..+5). Idempotent."""
    from tokenizers import AddedToken

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    missing = [t for t in common.MARKER_TOKENS if tok.token_to_id(t) is None]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])
    for i, t in enumerate(common.MARKER_TOKENS):
        assert tok.token_to_id(t) == common.VOCAB_SIZE + i, (t, tok.token_to_id(t))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(markers=True), indent=2))
    return tok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=common.WORK_DIR)
    ap.add_argument("--vocab-size", type=int, default=common.VOCAB_SIZE)
    ap.add_argument("--extend", action="store_true", help="v2: add the tool/think markers to the v1 tokenizer")
    args = ap.parse_args()
    if args.extend:
        tok = extend(args.work, args.work / "tokenizer_v2")
        print(json.dumps({"vocab_size": tok.get_vocab_size(), "markers": common.MARKER_TOKENS}))
        return
    tok = train(args.work, args.vocab_size)
    save(tok, args.work)
    for i, t in enumerate(common.SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    held = (args.work / "heldout.txt").read_text(encoding="utf-8")[:200_000]
    n = len(tok.encode(held).ids)
    print(json.dumps({"vocab_size": tok.get_vocab_size(), "heldout_chars_per_token": round(200_000 / n, 3)}))


if __name__ == "__main__":
    main()
