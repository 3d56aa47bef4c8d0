"""The probe: does this MTP head match its trunk? Teacher-forced acceptance by depth.

    res = probe(model, ids, depth=3)          # a loaded Qwen35Model with model.mtp, token ids
    res.rates        # conditional acceptance at depth 1..D (P(d_j ok | d_1..d_j-1 ok))
    res.cumulative   # P(d_1..d_j all ok); tokens per verify at depth D = 1 + sum(cumulative)

One parallel target forward over the text gives the target hiddens h[t] and its own greedy
choices a[s] = argmax p(. | x[..s]). The head's KV cache is filled with every verified pair
(h[t], x[t+1]) exactly as a session fills it, and from each position t the head drafts a chain
d_1..d_D the way `TorchSession.draft` does (depth j >= 2 feeds the head's own output and the
token just drafted, with the chain's own cache entries). Draft d_j is accepted when it equals
the target's choice a[t+j]. Depth 1 is exactly what greedy decoding would accept after the
text x[..t+1]. Depth j >= 2 is measured only where that label is exact: the drafted path
x[..t+1], d_1..d_j-1 must be the text itself (x[t+i+1] == d_i == a[t+i]), so a[t+j] is the
target's choice on it; `reached[j]` counts those chains and `rates[j]` is the conditional
acceptance among them. `cumulative` multiplies the conditional rates (P(d_1..d_j all accepted)).

A head mismatched with its trunk, or with its norms shifted twice / never, accepts ~0 at
depth 1 while everything loads: that is what this catches before anyone benchmarks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cache import AttnCache

DEFAULT_TOKENS = 256
DEFAULT_DEPTH = 3
LOW_ACCEPTANCE = 0.05  # depth-1 acceptance below this: the head does not match its trunk


@dataclass
class ProbeResult:
    depth: int
    tokens: int  # tokens of text fed
    chains: int  # draft chains evaluated (positions)
    accepted: list[int]  # measured chains whose draft j was accepted, j = 1..depth
    reached: list[int]  # chains measured at depth j (1..j-1 accepted on the text's own path)
    hidden_source: str
    text_source: str
    elapsed_s: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def rates(self) -> list[float | None]:
        """Conditional acceptance per depth; None where no chain could be measured."""
        return [a / r if r else None for a, r in zip(self.accepted, self.reached)]

    @property
    def cumulative(self) -> list[float | None]:
        out, p = [], 1.0
        for r in self.rates:
            p = None if (p is None or r is None) else p * r
            out.append(p)
        return out

    @property
    def tokens_per_verify(self) -> float:
        """Expected tokens per verify at depth `depth` (measured depths only)."""
        return 1.0 + sum(c for c in self.cumulative if c is not None)

    @property
    def ok(self) -> bool:
        return bool(self.reached[0]) and self.rates[0] >= LOW_ACCEPTANCE

    def to_dict(self) -> dict:
        return {"depth": self.depth, "tokens": self.tokens, "chains": self.chains,
                "accepted_by_depth": list(self.accepted), "drafted_by_depth": list(self.reached),
                "acceptance_by_depth": [None if x is None else round(x, 4) for x in self.rates],
                "cumulative_by_depth": [None if x is None else round(x, 4) for x in self.cumulative],
                "tokens_per_verify": round(self.tokens_per_verify, 4), "ok": self.ok,
                "hidden_source": self.hidden_source, "text_source": self.text_source,
                "elapsed_s": round(self.elapsed_s, 3), "warnings": list(self.warnings)}

    def render(self) -> str:
        lines = [f"probe: {self.chains} positions of {self.tokens} tokens ({self.text_source}), "
                 f"head fed the {self.hidden_source}-norm hidden"]
        for j, (a, r, c) in enumerate(zip(self.accepted, self.reached, self.cumulative), 1):
            if not r:
                lines.append(f"  depth {j}: not measured (the text never follows the drafted path this deep; "
                             "try --probe-greedy N)")
                continue
            lines.append(f"  depth {j}: accepted {a}/{r} = {a / r:.3f}   (1..{j} all accepted: {c:.3f})")
        lines.append(f"  expected tokens per verify at depth {self.depth}: {self.tokens_per_verify:.2f}")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


@torch.inference_mode()
def probe(model, ids: list[int], depth: int = DEFAULT_DEPTH, text_source: str = "token ids") -> ProbeResult:
    """Teacher-forced acceptance by depth of `model.mtp` on the token ids `ids`."""
    if model.mtp is None:
        raise ValueError("probe: this model has no MTP head (graft one with `mtplx graft`)")
    if depth < 1:
        raise ValueError(f"probe depth must be >= 1, got {depth}")
    T = len(ids)
    if T < depth + 3:
        raise ValueError(f"probe needs at least {depth + 3} tokens of text, got {T}")
    t0 = time.perf_counter()
    cfg, mtp = model.cfg, model.mtp
    dev = model.device
    x = torch.tensor(ids, dtype=torch.long, device=dev)
    post, pre, logits = model.forward_hidden(x[None])
    a = logits[0].argmax(-1)  # [T]: target's choice for x[s+1]
    hs = getattr(model, "mtp_hidden", "post")
    h = (post if hs == "post" else pre)[0]  # [T, H]
    cache = AttnCache(cfg.num_key_value_heads, cfg.head_dim, model.dtype, dev, T + depth + 2)
    n = T - 1  # verified pairs (h[t], x[t+1]), t = 0..T-2
    g1, u1, lg1 = mtp.rows(h[:n], x[1:T], 0, cache)
    d1 = lg1.argmax(-1)  # [n]: depth-1 draft for x[t+2]
    k_saved, v_saved = cache.k[:, :n].clone(), cache.v[:, :n].clone()
    chains = T - 1 - depth  # t = 0..chains-1 have targets a[t+1..t+depth]
    accepted = [0] * depth
    reached = [0] * depth
    a_list = a.tolist()
    d1_list = d1.tolist()
    for t in range(chains):
        reached[0] += 1
        if d1_list[t] != a_list[t + 1]:
            continue
        accepted[0] += 1
        g, u, tok = g1[t:t + 1], u1[t:t + 1], d1_list[t]
        dirty = 0
        for j in range(2, depth + 1):
            if ids[t + j] != tok:  # the drafted path leaves the text: a[t+j] is not its label
                break
            reached[j - 1] += 1
            hid = g if hs == "post" else u
            g, u, lg = mtp.rows(hid, torch.tensor([tok], device=dev), t + j - 1, cache)
            dirty = j - 1
            tok = int(lg[-1].argmax())
            if tok != a_list[t + j]:
                break
            accepted[j - 1] += 1
        if dirty:  # restore the verified entries the chain overwrote (positions t+1..t+dirty)
            cache.k[:, t + 1:t + 1 + dirty] = k_saved[:, t + 1:t + 1 + dirty]
            cache.v[:, t + 1:t + 1 + dirty] = v_saved[:, t + 1:t + 1 + dirty]
    res = ProbeResult(depth, T, chains, accepted, reached, hs, text_source)
    if not res.ok:
        res.warnings.append(
            f"depth-1 acceptance {res.rates[0] or 0.0:.3f} is near zero: the head does not match this trunk (a head for "
            "another model or fine-tune, or norms shifted twice / never: re-graft with `mtplx graft`, or train "
            "one with `mtplx forge`)")
    res.elapsed_s = time.perf_counter() - t0
    return res


def default_text() -> tuple[str, str]:
    """(text, where from): held-out standard-library source every machine has."""
    import textwrap

    try:
        return Path(textwrap.__file__).read_text(), f"stdlib {Path(textwrap.__file__).name}"
    except OSError:
        return ("def add(a, b):\n    return a + b\n" * 64), "built-in snippet"


def probe_ids(tokenizer, vocab_size: int, n_tokens: int = DEFAULT_TOKENS, text: str | None = None,
              text_source: str | None = None, seed: int = 0) -> tuple[list[int], str]:
    """Token ids for the probe: the text through the tokenizer, else seeded random ids."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (n_tokens,), generator=g).tolist()
        return ids, "random token ids (no tokenizer)"
    if text is None:
        text, text_source = default_text()
    ids = tokenizer.encode(text)[:n_tokens]
    return [int(i) for i in ids], text_source or "given text"


def greedy_extend(model, ids: list[int], n: int) -> list[int]:
    """ids + the target's own greedy continuation of n tokens (depth 0, the exact path): on it,
    every depth is measured exactly."""
    from mtplx.decoding.loop import generate_steps
    from mtplx.decoding.params import SamplingParams

    if n <= 0:
        return list(ids)
    steps = generate_steps(model.new_session(), list(ids), SamplingParams(max_tokens=n, ignore_eos=True), 0)
    return list(ids) + [s.token_id for s in steps]


def probe_checkpoint(path, depth: int = DEFAULT_DEPTH, n_tokens: int = DEFAULT_TOKENS, text: str | None = None,
                     dtype: str = "float32", text_source: str | None = None, greedy: int = 0) -> ProbeResult:
    """Load `path` with the torch backend and probe its head (on `text`, else held-out stdlib
    source; `greedy` > 0 appends the target's own greedy continuation of that many tokens)."""
    from mtplx.checkpoint.config import load_config

    from .loader import load_torch_model

    path = Path(path)
    cfg = load_config(path)
    tok = None
    if (path / "tokenizer.json").is_file():
        from mtplx.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(path)
    model = load_torch_model(path, dtype=dtype, config=cfg)
    ids, src = probe_ids(tok, cfg.vocab_size, n_tokens, text, text_source)
    if greedy > 0:
        ids, src = greedy_extend(model, ids, greedy), f"{src} + {greedy} greedy tokens"
    return probe(model, ids, depth, src)


__all__ = ["probe", "probe_checkpoint", "greedy_extend", "probe_ids", "default_text", "ProbeResult", "LOW_ACCEPTANCE"]
