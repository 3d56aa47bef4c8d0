"""MlxSession: one sequence being generated (the Session protocol of mtplx/backends/base.py),
with the same bookkeeping as `mtplx.backends.torch.session.TorchSession`:

- `pos`: committed target positions; `last` = x[pos], the newest emitted token, not yet fed.
- head pairs (h[t], x[t+1]) exist for every t < pos. The head KV cache holds the first
  `head_len`; the rest wait in `_pend_h` / `_pend_x` (verified hiddens) and run in one batched
  head forward at the next `draft`, whose last row (h[pos-1], last) is also the first draft
  step of that cycle. Draft-time head entries are trimmed at commit: only verified hiddens end
  up in the head cache.
- verify feeds [last, d1..dD] on the exact path (bit-identical to decoding them one by one);
  commit(n, next_id) keeps n+1 of them: KV trimmed, GatedDeltaNet conv/recurrent state restored
  to the one recorded after the kept position (no re-forward).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from mtplx.decoding.params import SamplingParams

from . import sampling


class MlxSession:
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
        self.head_cache = KVCache() if model.head is not None else None
        self.pos = 0
        self.last: int | None = None
        self.head_len = 0
        self._pend_h: list[mx.array] = []  # [n_i, H] verified hiddens waiting for the head
        self._pend_x: list[int] = []
        self._last_logits: mx.array | None = None
        self._verified = None  # (hidden [T, H], drafted) of the last verify

    @property
    def has_head(self) -> bool:
        return self.model.head is not None

    def _hid(self, post: mx.array, pre: mx.array) -> mx.array:
        return post if self.hidden_source == "post" else pre

    def make_rng(self, seed: int | None) -> sampling.MlxRng:
        return sampling.make_rng(seed)

    # -- protocol
    def prefill(self, prompt_ids: list[int]) -> None:
        if self.pos or self.last is not None:
            raise RuntimeError("prefill: this session already holds a sequence; create a new session")
        P = len(prompt_ids)
        if P == 0:
            raise ValueError("prefill: empty prompt")
        if P + 1 > self.max_context:
            raise ValueError(f"prompt of {P} tokens does not fit the context of {self.max_context} positions "
                             f"(it needs at least {P + 1}); shorten the prompt or raise max_context")
        ids = mx.array(prompt_ids, dtype=mx.int32)
        post, pre, last = self.model.prefill(ids, self.cache)
        mx.eval(last)
        self.pos = P
        self._last_logits = last
        if self.has_head:
            self._pend_h = [self._hid(post, pre)]
            self._pend_x = list(prompt_ids[1:])
            if P > 1:  # fill the head cache with the prompt pairs now (one batched forward)
                self._run_head()

    def sample_first(self, params: SamplingParams, rng: Any) -> int:
        if self._last_logits is None:
            raise RuntimeError("sample_first: call prefill first")
        tok = sampling.sample(self._last_logits, params, rng)
        self.last = tok
        if self.has_head:
            self._pend_x.append(tok)
        return tok

    def _run_head(self):
        """Run the pending complete pairs through the head; return (g, u, logits) of the last."""
        n = len(self._pend_x)
        if n == 0:
            return None
        H = mx.concatenate(self._pend_h) if len(self._pend_h) > 1 else self._pend_h[0]
        g, u, logits = self.model.head.rows(self.model, H[:n], mx.array(self._pend_x, dtype=mx.int32),
                                            self.head_cache)
        mx.eval(g, u, logits)
        self.head_len += n
        self._pend_h = [H[n:]] if H.shape[0] > n else []
        self._pend_x = []
        return g[-1:], u[-1:], logits[-1]

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
        g, u, logits = self._run_head()
        drafted, rows = [], []
        for j in range(depth):
            tok, q = sampling.draft_token(logits, params, rng)
            drafted.append(tok)
            rows.append(q)
            if j + 1 < depth:  # draft-time head entry (trimmed at commit)
                hid = g if self.hidden_source == "post" else u
                g, u, lg = self.model.head.rows(self.model, hid, mx.array([tok], dtype=mx.int32), self.head_cache)
                logits = lg[-1]
        return drafted, sampling.stack_draft_probs(rows)

    def verify(self, drafted: list[int]) -> mx.array:
        if self.last is None:
            raise RuntimeError("verify: call prefill and sample_first first")
        T = len(drafted) + 1
        if self.pos + T > self.max_context:
            raise ValueError(f"context limit: {self.pos + T} positions needed, this session holds "
                             f"{self.max_context}; stop generation or raise max_context")
        ids = mx.array([self.last, *drafted], dtype=mx.int32)
        post, pre, logits = self.model.step(ids, self.cache)
        hid = self._hid(post, pre)
        mx.eval(logits, hid)
        self._verified = (hid, list(drafted))
        return logits  # [D+1, V]

    def accept(self, rows, drafted, q, params: SamplingParams, rng: Any) -> tuple[int, int]:
        return sampling.accept(rows, list(drafted), q, params, rng)

    def commit(self, n_accepted: int, next_id: int) -> None:
        if self._verified is None:
            raise RuntimeError("commit: no verify to commit")
        hid, drafted = self._verified
        if not 0 <= n_accepted <= len(drafted):
            raise ValueError(f"commit: n_accepted={n_accepted} outside 0..{len(drafted)}")
        m = n_accepted + 1
        self.cache.keep(m)
        if self.has_head:
            extra = self.head_cache.offset - self.head_len
            if extra > 0:  # drop draft-time entries
                self.head_cache.trim(extra)
            self._pend_h.append(hid[:m])
            self._pend_x.extend(drafted[:n_accepted])
            self._pend_x.append(int(next_id))
        self.pos += m
        self.last = int(next_id)
        self._verified = None

    # -- conveniences
    def peak_memory_bytes(self) -> int:
        """mlx's peak memory on Apple GPUs (0 on CPU: the loop falls back to the process RSS)."""
        if not mx.metal.is_available():
            return 0
        fn = getattr(mx, "get_peak_memory", None) or getattr(mx.metal, "get_peak_memory", None)
        return int(fn()) if fn else 0

    def decode_step(self) -> mx.array:
        """Feed `last` alone (depth 0) and return its logits [V] without committing."""
        return self.verify([])[0]


__all__ = ["MlxSession"]
