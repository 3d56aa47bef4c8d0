"""TorchSession: one sequence being generated (the Session protocol of mtplx/backends/base.py).

Bookkeeping (h[t] = target hidden at position t, it predicts x[t+1]):
- `pos`: committed target positions; `last` = x[pos], the newest emitted token, not yet fed.
- head pairs (h[t], x[t+1]) exist for every t < pos. The head KV cache holds the first
  `head_len` of them; the rest wait in `_pend_h` / `_pend_x` (verified hiddens) and are run
  in one batched head forward at the next `draft`, whose last row (h[pos-1], last) is also the
  first draft step of that cycle. Draft-time entries (drafted tokens, head hiddens) are dropped
  at commit: only verified hiddens end up in the head cache.
- verify feeds [last, d1..dD] at positions pos..pos+D on the exact path (bit-identical to
  decoding them one by one); commit(n, next_id) keeps n+1 of them.
"""

from __future__ import annotations

from typing import Any

import torch

from mtplx.decoding.params import SamplingParams

from . import sampling
from .cache import AttnCache


class TorchSession:
    def __init__(self, model, max_context: int | None = None, hidden_source: str | None = None):
        cfg = model.cfg
        limit = int(cfg.max_position_embeddings)
        if max_context is not None:
            if max_context < 2:
                raise ValueError(f"max_context must be >= 2, got {max_context}")
            limit = min(limit, int(max_context))
        self.model = model
        self.max_context = limit
        self.hidden_source = hidden_source or getattr(model, "mtp_hidden", "post")
        if self.hidden_source not in ("post", "pre"):
            raise ValueError(f"hidden_source must be 'post' or 'pre', got {self.hidden_source!r}")
        self.cache = model.new_cache(limit)
        self.head_cache = (AttnCache(cfg.num_key_value_heads, cfg.head_dim, model.dtype, model.device, limit)
                           if model.mtp is not None else None)
        self.pos = 0
        self.last: int | None = None
        self.head_len = 0
        self._pend_h: list[torch.Tensor] = []  # [n_i, H] verified hiddens waiting for the head
        self._pend_x: list[int] = []
        self._last_logits: torch.Tensor | None = None
        self._verified = None  # (hidden [T, H], drafted) of the last verify

    # -- helpers
    @property
    def has_head(self) -> bool:
        return self.model.mtp is not None

    def _hid(self, post: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        return post if self.hidden_source == "post" else pre

    def make_rng(self, seed: int | None) -> torch.Generator:
        return sampling.make_generator(seed, self.model.device)

    # -- protocol
    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int]) -> None:
        if self.pos or self.last is not None:
            raise RuntimeError("prefill: this session already holds a sequence; create a new session")
        P = len(prompt_ids)
        if P == 0:
            raise ValueError("prefill: empty prompt")
        if P + 1 > self.max_context:
            raise ValueError(f"prompt of {P} tokens does not fit the context of {self.max_context} positions "
                             f"(it needs at least {P + 1}); shorten the prompt or raise max_context")
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=self.model.device)
        post, pre, last = self.model.prefill(ids, self.cache)
        self.pos = P
        self._last_logits = last
        if self.has_head:
            h = self._hid(post, pre)
            self._pend_h = [h]  # h[0..P-1]; pairs with x[1..P-1] now and x[P] = first token later
            self._pend_x = list(prompt_ids[1:])
            if P > 1:  # fill the head cache with the prompt pairs now (one batched forward)
                self._run_head()

    @torch.inference_mode()
    def sample_first(self, params: SamplingParams, rng: Any) -> int:
        if self._last_logits is None:
            raise RuntimeError("sample_first: call prefill first")
        tok = sampling.sample(self._last_logits, params, rng)
        self.last = tok
        if self.has_head:
            self._pend_x.append(tok)
        return tok

    def _run_head(self):
        """Run the pending complete pairs through the head (one batched forward) and return
        (g [1, H], u [1, H], logits [V]) of the last one; a hidden without its token stays pending."""
        n = len(self._pend_x)
        if n == 0:
            return None
        H = torch.cat(self._pend_h) if len(self._pend_h) > 1 else self._pend_h[0]
        g, u, logits = self.model.mtp.rows(H[:n], torch.tensor(self._pend_x, device=H.device),
                                           self.head_len, self.head_cache)
        self.head_len += n
        self._pend_h = [H[n:]] if H.shape[0] > n else []
        self._pend_x = []
        return g[-1:], u[-1:], logits[-1]

    @torch.inference_mode()
    def draft(self, depth: int, params: SamplingParams, rng: Any):
        if depth <= 0:
            return [], None
        if not self.has_head:
            raise RuntimeError("draft: this model has no MTP head (load a checkpoint with mtp.* weights or graft one)")
        if self.last is None:
            raise RuntimeError("draft: call prefill and sample_first first")
        if self.pos + depth + 1 > self.max_context:
            raise ValueError(f"context limit: drafting {depth} tokens at position {self.pos} exceeds "
                             f"the context of {self.max_context} positions")
        base = self.head_len + len(self._pend_x)  # == pos: head position of the pair (h[pos-1], last)
        out = self._run_head()
        g, u, logits = out
        drafted, rows = [], []
        for j in range(depth):
            tok, q = sampling.draft_token(logits, params, rng)
            drafted.append(tok)
            rows.append(q)
            if j + 1 < depth:  # draft-time entry at head position base + j (dropped at commit)
                hid = g if self.hidden_source == "post" else u
                g, u, lg = self.model.mtp.rows(hid, torch.tensor([tok], device=hid.device),
                                               base + j, self.head_cache)
                logits = lg[-1]
        return drafted, sampling.stack_draft_probs(rows)

    @torch.inference_mode()
    def verify(self, drafted: list[int]) -> torch.Tensor:
        if self.last is None:
            raise RuntimeError("verify: call prefill and sample_first first")
        T = len(drafted) + 1
        if self.pos + T > self.max_context:
            raise ValueError(f"context limit: {self.pos + T} positions needed, this session holds "
                             f"{self.max_context}; stop generation or raise max_context")
        ids = torch.tensor([self.last, *drafted], dtype=torch.long, device=self.model.device)
        post, pre, logits = self.model.step(ids, self.cache)
        self._verified = (self._hid(post, pre), list(drafted))
        return logits  # [D+1, V]

    @torch.inference_mode()
    def accept(self, rows, drafted, q, params: SamplingParams, rng: Any) -> tuple[int, int]:
        return sampling.accept(rows, list(drafted), q, params, rng)

    @torch.inference_mode()
    def commit(self, n_accepted: int, next_id: int) -> None:
        if self._verified is None:
            raise RuntimeError("commit: no verify to commit")
        hid, drafted = self._verified
        if not 0 <= n_accepted <= len(drafted):
            raise ValueError(f"commit: n_accepted={n_accepted} outside 0..{len(drafted)}")
        m = n_accepted + 1
        self.cache.keep(m)
        if self.has_head:
            # drop draft-time head entries; the verified pairs wait for the next batched rebuild
            self._pend_h.append(hid[:m])
            self._pend_x.extend(drafted[:n_accepted])
            self._pend_x.append(int(next_id))
        self.pos += m
        self.last = int(next_id)
        self._verified = None

    # -- conveniences
    def decode_step(self) -> torch.Tensor:
        """Feed `last` alone (depth 0) and return its logits [V] without committing."""
        return self.verify([])[0]


__all__ = ["TorchSession"]
