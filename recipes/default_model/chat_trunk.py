"""Stage v2-3: continue the v1 trunk on code text + chats, with 65536 positions.

    python recipes/default_model/chat_trunk.py tokenize            # v2 tokenizer -> *_v2_ids.npy + doc offsets
    python recipes/default_model/chat_trunk.py train --minutes 28   # -> runs/default_model/trunk_v2/ (+ train_log.jsonl)

Starts from the v1 trunk (--init: a checkpoint folder with the v1 backbone; the v1 recipe's
runs/default_model/trunk, or the shipped v1 asset). The embedding (tied with the lm_head) grows
from 4096 to common.MODEL_VOCAB_V2 rows: the six marker tokens start as the mean embedding of
the v1 pieces they used to be split into. `max_position_embeddings` becomes 65536 (RoPE theta
1e7 on 16 of 64 attention dims; the GatedDeltaNet layers carry no positions).

Each step is one of:
- a mixed batch: --batch rows of --seq tokens; a row is a chat window ending at a chat
  document's last token, so the answer is always inside it (probability --chat-share), or a
  window of stdlib code text. The loss of a chat row's prompt tokens (the tools block, the
  request, and whatever came before the document) is weighted --prompt-weight, its answer 1;
  code text weighs 1;
- unlikelihood against loops (--loop-weight): in a chat answer or a code row, where the last two
  tokens occurred earlier in that answer / row and were followed there by a token other than the
  text's next one, that repeated continuation's probability is pushed down (-log(1 - p)). A tiny
  model's greedy chat answers otherwise fall into copy loops ("the list of the list of ...")
  and never reach <|im_end|>; copying from the prompt (tool names and values) is not touched;
- every --long-every steps, one long document (several files then a question; up to
  --long-seq tokens), so the attention layers see long inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import trunk  # noqa: E402
from chats import ANSWER_SEP  # noqa: E402


def _encode_docs(tok, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> token stream, each document's first index, whether each document has a tools block,
    and per token whether it belongs to a document's answer (after ANSWER_SEP; its EOS included)."""
    eos = tok.token_to_id(common.EOS)
    docs = [d for d in text.split(common.EOS) if d.strip()]
    tools = np.asarray(["\n<tools>\n" in d for d in docs], dtype=bool)
    ids, starts, answer = [], [], []
    for i in range(0, len(docs), 256):
        parts = [d.split(ANSWER_SEP) for d in docs[i:i + 256]]  # prompt and answer tokenized apart
        flat = tok.encode_batch([p for ps in parts for p in ps])
        j = 0
        for ps in parts:
            starts.append(len(ids))
            for k, enc in enumerate(flat[j:j + len(ps)]):
                ids.extend(enc.ids)
                answer.extend([k > 0] * len(enc.ids))
            j += len(ps)
            ids.append(eos)
            answer.append(len(ps) > 1)
    return (np.asarray(ids, dtype=np.uint16), np.asarray(starts, dtype=np.int64), tools,
            np.asarray(answer, dtype=bool))


def cmd_tokenize(args) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(args.work / "tokenizer_v2" / "tokenizer.json"))
    out = {}
    for name, src in (("code", "train.txt"), ("code_heldout", "heldout.txt"), ("chat", "chat_train.txt"),
                      ("long", "chat_long.txt")):
        ids, starts, tools, answer = _encode_docs(tok, (args.work / src).read_text(encoding="utf-8"))
        np.save(args.work / f"{name}_v2_ids.npy", ids)
        np.save(args.work / f"{name}_v2_answer.npy", answer)
        np.save(args.work / f"{name}_v2_starts.npy", starts)
        np.save(args.work / f"{name}_v2_tools.npy", tools)
        out[name] = {"tokens": int(ids.size), "docs": int(starts.size), "with_tools": int(tools.sum())}
    print(json.dumps(out))


def grow_embeddings(model, v1_tok_path: Path) -> None:
    """v1 rows kept; marker rows = mean of their v1 pieces; padding rows = the mean row."""
    import torch
    from tokenizers import Tokenizer

    v1 = Tokenizer.from_file(str(v1_tok_path))
    emb = model.model.embed_tokens.weight
    with torch.no_grad():
        old = emb[:common.VOCAB_SIZE].clone()
        new = old.mean(0, keepdim=True).repeat(common.MODEL_VOCAB_V2, 1)
        new[:common.VOCAB_SIZE] = old
        for i, t in enumerate(common.MARKER_TOKENS):
            pieces = v1.encode(t).ids
            new[common.VOCAB_SIZE + i] = old[pieces].mean(0)
    model.resize_token_embeddings(common.MODEL_VOCAB_V2)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(new)
    model.tie_weights()


def load_trunk(init: Path, v1_tokenizer: Path, seed: int):
    """The v1 backbone with its embedding grown, or (a folder of this stage's output) a v2 trunk as is."""
    from safetensors.torch import load_file

    sd = {k: v.float() for k, v in load_file(str(init / "model.safetensors")).items() if k.startswith("model.")}
    if sd["model.embed_tokens.weight"].shape[0] == common.MODEL_VOCAB_V2:
        model = trunk.make_model(seed, {"vocab_size": common.MODEL_VOCAB_V2,
                                        "max_position_embeddings": common.MAX_POSITIONS})
        model.load_state_dict(sd, strict=False)
        model.tie_weights()
        return model.float()
    model = trunk.make_model(seed, {"vocab_size": common.VOCAB_SIZE,
                                    "max_position_embeddings": common.MAX_POSITIONS})
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"--init {init}: not the v1 backbone (missing {missing[:4]}, unexpected {unexpected[:4]})")
    grow_embeddings(model, v1_tokenizer)
    model.config.vocab_size = common.MODEL_VOCAB_V2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.float()


def loop_tokens(row: np.ndarray, region: np.ndarray) -> np.ndarray:
    """row [T+1] tokens, region [T] whether target t is in a span whose own history counts ->
    [T] per target the token that repeated the last bigram's earlier continuation (-1: none, or
    it is the text's next token). The history restarts wherever the region does."""
    out = np.full(region.size, -1, dtype=np.int64)
    seen: dict[tuple[int, int], int] = {}
    for t in range(1, region.size):
        if not (region[t] and region[t - 1]):
            seen.clear()
            continue
        key = (int(row[t - 1]), int(row[t]))
        nxt = seen.get(key)
        if nxt is not None and nxt != row[t + 1]:
            out[t] = nxt
        seen[key] = int(row[t + 1])
    return out


class Mixer:
    """Batches of the v2 mix (see the module docstring); seeded."""

    def __init__(self, work: Path, args):
        self.rng = np.random.default_rng(args.seed + 2)
        self.code = np.load(work / "code_v2_ids.npy")
        self.chat = np.load(work / "chat_v2_ids.npy")
        self.chat_answer = np.load(work / "chat_v2_answer.npy")
        starts = np.load(work / "chat_v2_starts.npy")
        ends = np.append(starts[1:], self.chat.size)  # one past each document's EOS
        ends = np.maximum(ends, args.seq + 1)
        tools = np.load(work / "chat_v2_tools.npy")
        self.chat_ends = (ends[tools], ends[~tools])  # documents with / without a tools block
        self.long = np.load(work / "long_v2_ids.npy")
        self.long_starts = np.load(work / "long_v2_starts.npy")
        self.args = args

    def mixed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> token rows [batch, seq + 1], loss weights of their targets [batch, seq], the loop
        tokens of their targets [batch, seq] (loop_tokens)."""
        a, rows, weights, loops = self.args, [], [], []
        for _ in range(a.batch):
            if self.rng.random() < a.chat_share:
                pool = self.chat_ends[0 if self.rng.random() < a.tool_share else 1]
                e = int(pool[self.rng.integers(0, pool.size)])
                rows.append(self.chat[e - a.seq - 1:e])
                answer = self.chat_answer[e - a.seq:e]
                weights.append(np.where(answer, 1.0, a.prompt_weight))
                loops.append(loop_tokens(rows[-1], answer))
            else:
                s = int(self.rng.integers(0, self.code.size - a.seq - 1))
                rows.append(self.code[s:s + a.seq + 1])
                weights.append(np.ones(a.seq))
                loops.append(loop_tokens(rows[-1], np.ones(a.seq, dtype=bool)))
        return np.stack(rows).astype(np.int64), np.stack(weights).astype(np.float32), np.stack(loops)

    def long_doc(self) -> np.ndarray:
        i = int(self.rng.integers(0, self.long_starts.size))
        s = int(self.long_starts[i])
        e = int(self.long_starts[i + 1]) if i + 1 < self.long_starts.size else self.long.size
        e = min(e, s + self.args.long_seq + 1)
        return self.long[s:e][None].astype(np.int64)


def cmd_train(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work = args.work
    model = load_trunk(args.init, work / "tokenizer.json", args.seed)
    opt = trunk.make_opt(model, args.lr)
    mix = Mixer(work, args)
    held_code = np.load(work / "code_heldout_v2_ids.npy")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "train_log.jsonl").open("w")
    before = trunk.evaluate(model, held_code, 256)
    log.write(json.dumps({"step": 0, "heldout_code_ce": round(before, 4)}) + "\n")
    meta = {"init": str(args.init), "seed": args.seed, "batch": args.batch, "seq": args.seq,
            "chat_share": args.chat_share, "tool_share": args.tool_share, "prompt_weight": args.prompt_weight, "long_every": args.long_every, "long_seq": args.long_seq,
            "loop_weight": args.loop_weight, "lr": args.lr, "minutes": args.minutes, "steps_cap": args.steps, "params": trunk.param_count(model),
            "heldout_code_ce_v1": before}
    t_start = time.time()
    budget = args.minutes * 60 if args.minutes else None
    ema, tokens, step = None, 0, 0
    for step in range(args.steps):
        frac = (time.time() - t_start) / budget if budget else step / args.steps
        if frac >= 1.0:
            break
        lr = trunk.lr_at(int(frac * 10_000), 10_000, args.lr, 300)
        is_long = args.long_every and step % args.long_every == args.long_every - 1
        x, w, loops = (mix.long_doc(), None, None) if is_long else mix.mixed()
        x, w = torch.from_numpy(x), None if w is None else torch.from_numpy(w)
        loops = None if loops is None or not args.loop_weight else torch.from_numpy(loops)
        ce, aux = trunk.train_step(model, opt, x, lr, w, loops, args.loop_weight)
        tokens += x.numel()
        if not is_long:
            ema = ce if ema is None else 0.98 * ema + 0.02 * ce
        if step % 10 == 0 or is_long:
            log.write(json.dumps({"step": step, "ce": round(ce, 4), "ema": round(ema or ce, 4), "long": bool(is_long),
                                  "len": int(x.shape[1]), "lr": round(lr, 6), "tokens": tokens,
                                  "elapsed_s": round(time.time() - t_start, 1)}) + "\n")
            log.flush()
        if (step + 1) % args.save_every == 0:
            trunk.save_trunk(model, out, step + 1, {**meta, "train_tokens": tokens, "elapsed_s": time.time() - t_start})
    hl = trunk.evaluate(model, held_code, 256)
    elapsed = time.time() - t_start
    final = {**meta, "train_tokens": tokens, "heldout_code_ce": hl, "train_ema": ema, "elapsed_s": elapsed}
    trunk.save_trunk(model, out, step + 1, final)
    cfg = json.loads((out / "config.json").read_text())
    cfg["max_position_embeddings"] = common.MAX_POSITIONS
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    log.write(json.dumps({"step": step + 1, "final": True, **final}) + "\n")
    log.close()
    print(json.dumps({"steps": step + 1, "heldout_code_ce": hl, "v1": before, "elapsed_s": elapsed}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=["tokenize", "train"])
    ap.add_argument("--work", type=Path, default=common.WORK_DIR)
    ap.add_argument("--init", type=Path, default=common.WORK_DIR / "trunk_v1",
                    help="folder with the v1 backbone's model.safetensors (the v1 recipe's trunk/, or the v1 asset)")
    ap.add_argument("--seed", type=int, default=common.SEED)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=768)
    ap.add_argument("--out", type=Path, default=common.WORK_DIR / "trunk_v2")
    ap.add_argument("--chat-share", type=float, default=0.6, help="rows from the chats (the rest: code text)")
    ap.add_argument("--tool-share", type=float, default=0.72,
                    help="of the chat rows, the share from documents with a tools block")
    ap.add_argument("--prompt-weight", type=float, default=0.3,
                    help="loss weight of a chat row's tokens before its answer (the answer's weigh 1)")
    ap.add_argument("--loop-weight", type=float, default=0.0,
                    help="weight of the unlikelihood loss on loop continuations (0: off, as in v2.1)")
    ap.add_argument("--long-every", type=int, default=20)
    ap.add_argument("--long-seq", type=int, default=16384)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--minutes", type=float, default=None, help="time budget (the LR schedule follows the clock)")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    cmd_tokenize(args) if args.cmd == "tokenize" else cmd_train(args)


if __name__ == "__main__":
    main()
