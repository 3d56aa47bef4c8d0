"""The bookkeeping of one speculative sequence, shared by the torch and MLX sessions.

h[t] = target hidden at position t (it predicts x[t+1]); the head predicts x[t+2] from
(h[t], x[t+1]) at head position t.
- `pos`: committed target positions; `last` = x[pos], the newest emitted token, not yet fed.
- head pairs (h[t], x[t+1]) exist for every t < pos. The head KV cache holds the first
  `head_len` of them; the rest wait in `_pend_h` / `_pend_x` (verified hiddens) and run in one
  batched head forward at the next `draft`, whose last row (h[pos-1], last) is also the first
  draft step of that cycle. Draft-time head entries are dropped at commit: only verified
  hiddens end up in the head cache.
- verify feeds [last, d1..dD] at positions pos..pos+D on the exact path (bit-identical to
  decoding them one by one); commit(n, next_id) keeps n+1 of them: attention KV trimmed,
  GatedDeltaNet state restored to the one recorded after the kept position (no re-forward).

A backend subclass supplies the array hooks: `_ids`, `_cat`, `_head_rows`, `_materialize`,
`_drop_draft_head_entries`, `make_rng`, and the `sampling` module with sample / draft_token /
draft_prob / stack_draft_probs / accept. `draft` may return fewer than `depth` tokens
(params.draft_cutoff: adaptive draft length).
"""

from __future__ import annotations

from typing import Any

from mtplx.decoding.params import SamplingParams


class SessionBase:
    sampling: Any  # the backend's sampling module

    def __init__(self, model, head, max_context: int | None, hidden_source: str | None):
        limit = int(model.cfg.max_position_embeddings)
        if max_context is not None:
            if max_context < 2:
                raise ValueError(f"max_context must be >= 2, got {max_context}")
            limit = min(limit, int(max_context))
        self.model = model
        self.head = head  # the MTP head module, or None
        self.max_context = limit
        self.hidden_source = hidden_source or getattr(model, "mtp_hidden", "post")
        if self.hidden_source not in ("post", "pre"):
            raise ValueError(f"hidden_source must be 'post' or 'pre', got {self.hidden_source!r}")
        self.cache = model.new_cache(limit)
        self.pos = 0
        self.last: int | None = None
        self.head_len = 0
        self._pend_h: list = []  # [n_i, H] verified hiddens waiting for the head
        self._pend_x: list[int] = []
        self._last_logits = None
        self._verified = None  # (hidden [T, H], drafted) of the last verify

    # -- backend hooks
    def _ids(self, ids: list[int]):  # -> int array [T]
        raise NotImplementedError

    def _cat(self, arrays: list):
        raise NotImplementedError

    def _head_rows(self, hid, ids, head_pos: int):
        """Head forward over rows (hid [n, H], ids [n]) at head positions head_pos.. -> (g, u, logits);
        only the last row of logits is used (a backend may return just that one)."""
        raise NotImplementedError

    def _materialize(self, *arrays) -> None:  # lazy backends evaluate here
        pass

    def _drop_draft_head_entries(self) -> None:  # caches that grew during drafting shrink here
        pass

    # -- helpers
    @property
    def has_head(self) -> bool:
        return self.head is not None

    def _hid(self, post, pre):
        return post if self.hidden_source == "post" else pre

    def make_rng(self, seed: int | None):  # a per-request generator native to the backend
        raise NotImplementedError

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
        post, pre, last = self.model.prefill(self._ids(prompt_ids), self.cache)
        self._materialize(last)
        self.pos = P
        self._last_logits = last
        if self.has_head:
            self._pend_h = [self._hid(post, pre)]  # h[0..P-1]: pairs with x[1..P-1] now, x[P] later
            self._pend_x = list(prompt_ids[1:])
            if P > 1:  # fill the head cache with the prompt pairs now (one batched forward)
                self._run_head()

    def sample_first(self, params: SamplingParams, rng: Any) -> int:
        if self._last_logits is None:
            raise RuntimeError("sample_first: call prefill first")
        tok = self.sampling.sample(self._last_logits, params, rng)
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
        H = self._cat(self._pend_h) if len(self._pend_h) > 1 else self._pend_h[0]
        g, u, logits = self._head_rows(H[:n], self._ids(self._pend_x), self.head_len)
        self._materialize(g, u, logits)
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
        base = self.head_len + len(self._pend_x)  # == pos: head position of the pair (h[pos-1], last)
        g, u, logits = self._run_head()
        drafted, rows = [], []
        confidence = 1.0
        for j in range(depth):
            tok, q = self.sampling.draft_token(logits, params, rng)
            drafted.append(tok)
            rows.append(q)
            if j + 1 == depth:
                break
            if params.draft_cutoff > 0:  # adaptive length: stop on a doubtful path
                confidence *= self.sampling.draft_prob(logits, tok, q)
                if confidence < params.draft_cutoff:
                    break
            # draft-time entry at head position base + j (dropped at commit)
            g, u, lg = self._head_rows(self._hid(g, u), self._ids([tok]), base + j)
            logits = lg[-1]
        return drafted, self.sampling.stack_draft_probs(rows)

    def verify(self, drafted: list[int]):
        if self.last is None:
            raise RuntimeError("verify: call prefill and sample_first first")
        T = len(drafted) + 1
        if self.pos + T > self.max_context:
            raise ValueError(f"context limit: {self.pos + T} positions needed, this session holds "
                             f"{self.max_context}; stop generation or raise max_context")
        post, pre, logits = self.model.step(self._ids([self.last, *drafted]), self.cache)
        hid = self._hid(post, pre)
        self._materialize(logits, hid)
        self._verified = (hid, list(drafted))
        return logits  # [D+1, V]

    def accept(self, rows, drafted, q, params: SamplingParams, rng: Any) -> tuple[int, int]:
        return self.sampling.accept(rows, list(drafted), q, params, rng)

    def commit(self, n_accepted: int, next_id: int) -> None:
        if self._verified is None:
            raise RuntimeError("commit: no verify to commit")
        hid, drafted = self._verified
        if not 0 <= n_accepted <= len(drafted):
            raise ValueError(f"commit: n_accepted={n_accepted} outside 0..{len(drafted)}")
        m = n_accepted + 1
        self.cache.keep(m)
        if self.has_head:
            self._drop_draft_head_entries()
            self._pend_h.append(hid[:m])  # verified pairs wait for the next batched rebuild
            self._pend_x.extend(drafted[:n_accepted])
            self._pend_x.append(int(next_id))
        self.pos += m
        self.last = int(next_id)
        self._verified = None

    # -- conveniences
    def decode_step(self):
        """Feed `last` alone (depth 0) and return its logits [V] without committing."""
        return self.verify([])[0]
