"""Logits processors applied at the drafted prefix: penalties and grammars, exact under MTP.

A processor turns raw logits into the ones a request samples from, as a function of the tokens
before the position: with speculation, verify row i of a cycle ([last, d1..dD] fed) is the
target's logits after `emitted + d1..di`, so it is processed with the state after that prefix,
and so is the draft distribution of d(i+1). Greedy MTP then equals depth 0 (each row is the
depth-0 row, processed alike) and sampled acceptance runs on the processed distributions, so the
output follows the processed target distribution exactly.

    proc.first(logits)            # the prompt's last row, before the first token
    proc.draft(logits, prefix)    # a draft step: prefix = this cycle's drafts so far
    proc.rows(rows, drafted)      # the verify rows [D+1, V]
    proc.commit(tokens)           # tokens emitted (accepted drafts + the recovered / bonus one)

Array work goes through the backend's sampling module: `penalize(row, ids, sub, rep_ids, rep)`
and `mask_row(row, allowed_bool_numpy)`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Chain:
    """Processors applied in order (penalties, then the grammar mask)."""

    def __init__(self, procs: list):
        self.procs = [p for p in procs if p is not None]

    def __bool__(self) -> bool:
        return bool(self.procs)

    def first(self, logits):
        for p in self.procs:
            logits = p.first(logits)
        return logits

    def draft(self, logits, prefix: list[int]):
        for p in self.procs:
            logits = p.draft(logits, prefix)
        return logits

    def rows(self, rows, drafted: list[int]):
        for p in self.procs:
            rows = p.rows(rows, drafted)
        return rows

    def commit(self, tokens: list[int]) -> None:
        for p in self.procs:
            p.commit(tokens)


@dataclass
class Penalties:
    """OpenAI presence / frequency penalties over the generated tokens (subtracted from the
    logits: presence once per token seen, frequency per occurrence) and the HF / vLLM
    multiplicative repetition penalty over prompt + generated tokens (a positive logit divided by
    it, a negative one multiplied)."""

    sampling: Any  # the backend's sampling module
    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    prompt_ids: list[int] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._prompt = set(int(t) for t in self.prompt_ids) if self.repetition != 1.0 else set()

    def _apply(self, row, extra: list[int]):
        counts = self.counts + Counter(extra) if extra else self.counts
        ids, sub = [], []
        if self.presence or self.frequency:
            for t, c in counts.items():
                ids.append(t)
                sub.append(self.presence + self.frequency * c)
        rep_ids = sorted(self._prompt | set(counts)) if self.repetition != 1.0 else []
        if not ids and not rep_ids:
            return row
        return self.sampling.penalize(row, ids, sub, rep_ids, self.repetition)

    def first(self, logits):
        return self._apply(logits, [])

    def draft(self, logits, prefix: list[int]):
        return self._apply(logits, prefix)

    def rows(self, rows, drafted: list[int]):
        return self.sampling.stack_rows([self._apply(rows[i], drafted[:i]) for i in range(rows.shape[0])])

    def commit(self, tokens: list[int]) -> None:
        self.counts.update(int(t) for t in tokens)


class GrammarMask:
    """A grammar (llguidance) as a mask: row i is masked with the matcher state after the
    emitted tokens + this cycle's first i drafts. The matcher advances over the drafts
    speculatively (the masks of a cycle's states are kept for its verify rows) and rolls back
    before the tokens actually emitted are committed."""

    def __init__(self, sampling: Any, matcher, vocab_size: int, stop_ids=()):
        self.sampling, self.matcher, self.V = sampling, matcher, vocab_size
        self.stop_ids = set(int(t) for t in stop_ids)  # generation ends there: never consumed
        self._spec: list[int] = []  # tokens consumed speculatively this cycle
        self._masks: list[np.ndarray] = []  # allowed [V] bool after committed + _spec[:i]
        self._dead = False  # a speculative token the grammar refused: later states do not exist
        self.mask_s = 0.0  # time spent computing masks (the benchmark reports it)

    def _mask_now(self) -> np.ndarray:
        import time

        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        t = time.perf_counter()
        bits = allocate_token_bitmask(1, self.V)
        fill_next_token_bitmask(self.matcher, bits, 0)
        allowed = np.unpackbits(bits.view(np.uint8), bitorder="little")[: self.V].astype(bool)
        self.mask_s += time.perf_counter() - t
        return allowed

    def _mask_at(self, prefix: list[int]) -> np.ndarray | None:
        """The mask after committed + prefix (advancing the matcher over prefix as needed)."""
        n = len(prefix)
        k = min(n, len(self._spec))
        if self._spec[:k] != prefix[:k]:  # another path than the one consumed: start over
            self._reset_spec()
        while len(self._masks) <= n:
            i = len(self._masks)
            if i > len(self._spec):
                tok = int(prefix[i - 1])
                if self._dead or tok in self.stop_ids or not self.matcher.consume_token(tok):
                    self._dead = True  # no state after a stop token or a refused one
                    return None
                self._spec.append(tok)
            self._masks.append(self._mask_now())
        return self._masks[n]

    def _reset_spec(self) -> None:
        if self._spec:
            self.matcher.rollback(len(self._spec))
        self._spec, self._masks, self._dead = [], [], False

    def first(self, logits):
        return self.sampling.mask_row(logits, self._mask_at([]))

    def draft(self, logits, prefix: list[int]):
        m = self._mask_at(list(prefix))
        return logits if m is None else self.sampling.mask_row(logits, m)

    def rows(self, rows, drafted: list[int]):
        out, last = [], None
        for i in range(rows.shape[0]):
            m = self._mask_at(list(drafted[:i]))
            last = m if m is not None else last  # past a refused draft: never read (acceptance stops)
            out.append(self.sampling.mask_row(rows[i], last))
        return self.sampling.stack_rows(out)

    def commit(self, tokens: list[int]) -> None:
        self._reset_spec()
        for t in tokens:
            if int(t) in self.stop_ids or not self.matcher.consume_token(int(t)):
                break  # the end of the generation

    @property
    def accepting(self) -> bool:
        return bool(self.matcher.is_accepting())


__all__ = ["Chain", "Penalties", "GrammarMask"]
