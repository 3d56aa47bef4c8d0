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

Prefill runs in blocks of `prefill_block` tokens at absolute positions (0, B, 2B, ...; then the
tail), the head right behind each block, so that a block's result depends on nothing but the
tokens up to its end: with a prefix cache (mtplx/prefix) a prompt restores the blocks it shares
with earlier prompts and computes exactly what a cache-off prefill computes after them. The
backend hooks `_export_block` / `_import_blocks` move a block between the caches and a payload.
"""

from __future__ import annotations

from typing import Any

from mtplx.decoding.params import SamplingParams
from mtplx.prefix.cache import DEFAULT_BLOCK


class SessionBase:
    sampling: Any  # the backend's sampling module

    def __init__(self, model, head, max_context: int | None, hidden_source: str | None,
                 prefix_cache=None, prefill_block: int | None = None):
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
        block = prefill_block or (prefix_cache.block_size if prefix_cache is not None else DEFAULT_BLOCK)
        if prefix_cache is not None and prefix_cache.block_size != block:
            raise ValueError(f"prefill block {block} differs from the prefix cache's block "
                             f"{prefix_cache.block_size}: a session must prefill in the cache's blocks")
        if block < 1:
            raise ValueError(f"prefill block must be >= 1 token, got {block}")
        self.prefill_block = int(block)
        self.prefix_cache = prefix_cache if prefix_cache is not None and prefix_cache.enabled else None
        if self.prefix_cache is not None and self.has_head:  # blocks hold the head's pending hidden
            self.prefix_cache.bind("hidden_source", self.hidden_source)
        self.processor = None  # mtplx.decoding.processors.Chain: penalties / grammar at each prefix
        self.cached_tokens = 0  # prompt tokens restored from the prefix cache
        self.stored_tokens = 0  # prompt tokens this prefill added to it

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

    def _export_block(self, start: int, end: int) -> dict:
        """Copies of what positions start..end-1 left in the caches (target KV, GatedDeltaNet
        state at `end`, the head's KV of head positions max(start-1, 0)..end-2 and its pending
        hidden h[end-1]) as a dict name -> array."""
        raise NotImplementedError

    def _import_blocks(self, payloads: list[dict], end: int) -> None:
        """Set the caches to the state after positions 0..end-1 from consecutive block payloads."""
        raise NotImplementedError

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
        for _ in self.prefill_blocks(prompt_ids):
            pass

    def prefill_blocks(self, prompt_ids: list[int]):
        """`prefill` one block at a time: a generator that yields after each computed block (a
        batching engine runs other sequences' cycles in between)."""
        if self.pos or self.last is not None:
            raise RuntimeError("prefill: this session already holds a sequence; create a new session")
        P = len(prompt_ids)
        if P == 0:
            raise ValueError("prefill: empty prompt")
        if P + 1 > self.max_context:
            raise ValueError(f"prompt of {P} tokens does not fit the context of {self.max_context} positions "
                             f"(it needs at least {P + 1}); shorten the prompt or raise max_context")
        prompt_ids = [int(t) for t in prompt_ids]
        B, store = self.prefill_block, self.prefix_cache
        keys = store.chain(prompt_ids) if store is not None else []
        start = 0
        if store is not None:
            hit = store.match(prompt_ids, keys)
            if hit:
                start = len(hit) * B
                self._import_blocks([b.payload for b in hit], start)
                self.pos = start
                if self.has_head:  # h[start-1] waits for x[start], like after a computed block
                    self.head_len = start - 1
                    self._pend_h = [hit[-1].payload["hid"]]
        self.cached_tokens = start
        last = None
        for s in range(start, P, B):
            e = min(s + B, P)
            with self._block_context(e - s == B):
                post, pre, last = self.model.prefill(self._ids(prompt_ids[s:e]), self.cache)
                self._materialize(last)
                self.pos = e
                if self.has_head:  # pairs (h[t], x[t+1]) whose token is in this block
                    self._pend_h.append(self._hid(post, pre))
                    self._pend_x.extend(prompt_ids[max(s, 1):e])
                    self._run_head()
            k = s // B
            if store is not None and e - s == B and keys[k] not in store:
                payload = self._export_block(s, e)
                if store.store(keys[k], keys[k - 1] if k else None, prompt_ids[s:e], payload):
                    self.stored_tokens += B
            if e < P:
                yield e
        self._last_logits = last

    def sample_first(self, params: SamplingParams, rng: Any) -> int:
        if self._last_logits is None:
            raise RuntimeError("sample_first: call prefill first")
        logits = self._last_logits if self.processor is None else self.processor.first(self._last_logits)
        tok = self.sampling.sample(logits, params, rng)
        if self.processor is not None:
            self.processor.commit([tok])
        self.last = tok
        if self.has_head:
            self._pend_x.append(tok)
        return tok

    def _take_pending(self):
        """The pending complete pairs as one head batch (hid [n, H], ids [n], head position), the
        bookkeeping moved past them; None when there are none. A hidden without its token stays."""
        n = len(self._pend_x)
        if n == 0:
            return None
        H = self._cat(self._pend_h) if len(self._pend_h) > 1 else self._pend_h[0]
        batch = (H[:n], self._ids(self._pend_x), self.head_len)
        self.head_len += n
        self._pend_h = [H[n:]] if H.shape[0] > n else []
        self._pend_x = []
        return batch

    def _run_head(self):
        """Run the pending complete pairs through the head (one batched forward) and return
        (g [1, H], u [1, H], logits [V]) of the last one."""
        batch = self._take_pending()
        if batch is None:
            return None
        g, u, logits = self._head_rows(*batch)
        self._materialize(g, u, logits)
        return g[-1:], u[-1:], logits[-1]

    def draft(self, depth: int, params: SamplingParams, rng: Any):
        return type(self).draft_many([self], [depth], [params], [rng])[0]

    def prompt_logprobs(self, prompt_ids: list[int], k: int) -> list:
        """Raw log-probabilities of prompt tokens 1..P-1 (each under the logits of the position
        before it, one parallel forward of the whole prompt) -> [(id, logprob, top k)]."""
        rows = self.model.prompt_logits(self._ids(prompt_ids))  # [P, V]
        return [(int(t), *self.sampling.logprobs(rows[i], int(t), k)) for i, t in enumerate(prompt_ids[1:])]

    @classmethod
    def draft_many(cls, sessions: list, depths: list[int], params: list[SamplingParams], rngs: list) -> list:
        """Draft for several sessions of one model -> [(drafted, q)] per session. Each cycle
        starts with the head over the session's pending verified pairs (whose last row, the pair
        (h[pos-1], last), gives the first draft), then one head row per further draft, at head
        position pos + j (draft-time entries, dropped at commit). The sessions' rows of a step go
        through one head forward (`_head_rows_many`, batched by the backend when there are
        several): only for requests whose drafts decide no token (greedy), since a batched head
        forward need not give a session the bits it gets alone. A draft may stop early:
        params.draft_cutoff (adaptive length) stops a doubtful path."""
        n = len(sessions)
        drafted: list[list[int]] = [[] for _ in range(n)]
        rows: list[list] = [[] for _ in range(n)]
        conf, base, pending = [1.0] * n, [0] * n, []
        for i, (s, d) in enumerate(zip(sessions, depths)):
            if d <= 0:
                continue
            if not s.has_head:
                raise RuntimeError("draft: this model has no MTP head (load a checkpoint with mtp.* weights or graft one)")
            if s.last is None:
                raise RuntimeError("draft: call prefill and sample_first first")
            if s.pos + d + 1 > s.max_context:
                raise ValueError(f"context limit: drafting {d} tokens at position {s.pos} exceeds "
                                 f"the context of {s.max_context} positions")
            base[i] = s.head_len + len(s._pend_x)  # == pos: head position of the pair (h[pos-1], last)
            batch = s._take_pending()
            if batch is None:  # sample_first and commit always leave the pair (h[pos-1], last)
                raise RuntimeError("draft: no verified pair is pending (call sample_first or commit first)")
            pending.append((i, *batch))
        if n == 1 and pending:  # one greedy session: the backend may draft every step in one call
            chain = sessions[0]._draft_chain(tuple(pending[0][1:]), depths[0], params[0])
            if chain is not None:
                return [([int(t) for t in chain], None)]
        while pending:
            results = cls._head_rows_many([(sessions[i], *rest) for i, *rest in pending])
            step = []
            for (i, *_), (g, u, logits) in zip(pending, results):
                s = sessions[i]
                if s.processor is not None:
                    logits = s.processor.draft(logits, drafted[i])
                tok, q = s.sampling.draft_token(logits, params[i], rngs[i])
                drafted[i].append(tok)
                rows[i].append(q)
                if len(drafted[i]) == depths[i]:
                    continue
                if params[i].draft_cutoff > 0:  # adaptive length: stop on a doubtful path
                    conf[i] *= s.sampling.draft_prob(logits, tok, q)
                    if conf[i] < params[i].draft_cutoff:
                        continue
                # draft-time entry at head position base + j (dropped at commit)
                step.append((i, s._hid(g, u), s._ids([tok]), base[i] + len(drafted[i]) - 1))
            pending = step
        return [(d, sessions[i].sampling.stack_draft_probs(rows[i]) if d else None) for i, d in enumerate(drafted)]

    def _block_context(self, full: bool):
        """Context of one prefill block (full: B tokens, else the prompt's tail); a backend may
        give full blocks more threads. It must depend on nothing else: cache on == off."""
        import contextlib

        return contextlib.nullcontext()

    @classmethod
    def _batch_threads(cls, model):
        """Context of a batched verify (a backend may run it on more threads)."""
        import contextlib

        return contextlib.nullcontext()

    def _draft_chain(self, batch, depth: int, params: SamplingParams) -> list[int] | None:
        """All `depth` drafts from the pending `batch` (hid, ids, head position) in one backend call,
        the very drafts the step-by-step loop makes; None: draft step by step (the default)."""
        return None

    @classmethod
    def _head_rows_many(cls, items: list) -> list:
        """Head rows of several sessions [(session, hid [n, H], ids [n], head_pos)] -> per session
        (g [1, H], u [1, H], logits [V]) of its last row. Default: one session at a time."""
        res = []
        for s, hid, ids, pos in items:
            g, u, logits = s._head_rows(hid, ids, pos)
            s._materialize(g, u, logits)
            res.append((g[-1:], u[-1:], logits[-1]))
        return res

    def verify(self, drafted: list[int]):
        return type(self).verify_many([self], [drafted])[0]

    def _check_verify(self, drafted: list[int]) -> None:
        if self.last is None:
            raise RuntimeError("verify: call prefill and sample_first first")
        T = len(drafted) + 1
        if self.pos + T > self.max_context:
            raise ValueError(f"context limit: {self.pos + T} positions needed, this session holds "
                             f"{self.max_context}; stop generation or raise max_context")

    @classmethod
    def verify_many(cls, sessions: list, drafted: list[list[int]]) -> list:
        """`verify` of several sessions of one model (each its own sequence): one target forward
        when the backend's model has `step_many`, whose rows are bit-identical to each session's
        own verify. -> each session's logits [D_i+1, V]."""
        for s, d in zip(sessions, drafted):
            s._check_verify(d)
        model = sessions[0].model
        feeds = [[s.last, *d] for s, d in zip(sessions, drafted)]
        if len(sessions) == 1 or not hasattr(model, "step_many"):
            outs = [model.step(s._ids(f), s.cache) for s, f in zip(sessions, feeds)]
        else:
            with cls._batch_threads(model):
                post, pre, logits = model.step_many(sessions[0]._ids([t for f in feeds for t in f]),
                                                    [len(f) for f in feeds], [s.cache for s in sessions])
            outs, r = [], 0
            for f in feeds:
                outs.append((post[r:r + len(f)], pre[r:r + len(f)], logits[r:r + len(f)]))
                r += len(f)
        rows = []
        for s, d, (post, pre, logits) in zip(sessions, drafted, outs):
            hid = s._hid(post, pre)
            s._materialize(logits, hid)
            s._verified = (hid, list(d))
            rows.append(logits)  # [D+1, V]
        return rows

    def accept(self, rows, drafted, q, params: SamplingParams, rng: Any) -> tuple[int, int]:
        if self.processor is not None:
            rows = self.processor.rows(rows, list(drafted))
        return self.sampling.accept(rows, list(drafted), q, params, rng)

    def commit(self, n_accepted: int, next_id: int) -> None:
        if self._verified is None:
            raise RuntimeError("commit: no verify to commit")
        hid, drafted = self._verified
        if not 0 <= n_accepted <= len(drafted):
            raise ValueError(f"commit: n_accepted={n_accepted} outside 0..{len(drafted)}")
        m = n_accepted + 1
        if self.processor is not None:
            self.processor.commit(list(drafted[:n_accepted]) + [int(next_id)])
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
