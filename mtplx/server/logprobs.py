"""Log-probabilities in the OpenAI wire formats (chat `logprobs.content`, completions `logprobs`).

Entries come from the engine as (token id, logprob, [(id, logprob), ...] top): raw values, the
target's own log-softmax of the verify row that decided the token (mtplx/decoding/loop.py), so
they are the same at every depth.
"""

from __future__ import annotations


def _text(model, tok: int) -> str:
    tk = getattr(model, "tokenizer", None)
    return tk.decode([int(tok)], skip_special_tokens=False) if tk is not None else str(tok)


def chat_entries(model, entries: list) -> list[dict]:
    out = []
    for tok, lp, top in entries:
        s = _text(model, tok)
        out.append({"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")),
                    "top_logprobs": [{"token": (t := _text(model, i)), "logprob": v, "bytes": list(t.encode("utf-8"))}
                                     for i, v in top]})
    return out


def completion_logprobs(model, entries: list, offset: int = 0, prompt: list | None = None) -> dict:
    """The legacy completions object. `prompt` (echo): the prompt's entries, its first token None."""
    tokens, values, tops, offsets = [], [], [], []
    for tok, lp, top in (prompt or []) + entries:
        s = _text(model, tok)
        tokens.append(s)
        values.append(lp)
        tops.append(None if lp is None else {_text(model, i): v for i, v in top})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


__all__ = ["chat_entries", "completion_logprobs"]
