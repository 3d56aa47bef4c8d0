"""The generation loop over a `Session` (see mtplx/backends/base.py for the cycle).

    prefill(prompt) -> sample_first
    repeat: draft D -> verify [last, d1..dD] -> accept -> emit d1..dn, next -> commit(n, next)

Depth 0 is the same cycle with no drafts. Tokens are emitted one by one as soon as a cycle
decides them; the loop stops exactly at the first stop condition (stop id / EOS, a stop
string completed by the detokenized text, max_tokens, the context limit) and never emits a
token past it, even in the middle of an accepted run. Near the end of the budget the depth
shrinks so a cycle never decides more tokens than may still be emitted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

from .params import SamplingParams
from .stats import GenerationStats, peak_memory_bytes
from .stops import StopStrings, stop_token_set


class Detokenizer(Protocol):
    def add(self, token_id: int) -> str:
        """Take one decided token, return the text that is now complete (maybe "")."""

    def flush(self) -> str:
        """Return any text still held (end of generation)."""


@dataclass
class GenerationStep:
    token_id: int
    text: str  # text released with this token (may be "" while held back)
    from_draft: bool  # an accepted draft (True) or a target-sampled token (False)
    finish_reason: str | None  # None, "stop" (stop id / EOS / stop string) or "length"
    stats: GenerationStats  # running statistics (the same object throughout)
    stop: str | int | None = None  # what ended it: the stop string, or the stop / EOS token id
    logprob: float | None = None  # params.logprobs: the raw log-probability of token_id
    top_logprobs: list[tuple[int, float]] | None = None  # the params.logprobs most likely (id, logprob)
    prompt_logprobs: list | None = None  # first step, params.prompt_logprobs: (id, logprob, top) per prompt token


def check_prompt(prompt_ids: list[int], max_context: int | None) -> None:
    if len(prompt_ids) == 0:
        raise ValueError("empty prompt: give at least one token (for text, at least one character)")
    if max_context is not None and len(prompt_ids) >= max_context:
        raise ValueError(
            f"prompt is {len(prompt_ids)} tokens but the model's context holds {max_context} "
            f"positions, leaving no room to generate: shorten the prompt to at most {max_context - 1} tokens"
        )


class Generation:
    """One request's decoding, advanced by a driver: `generate_steps` alone, or the batch runner
    (mtplx/decoding/batch.py) with other requests. Either way the session sees the same calls in
    the same order - prefill blocks, sample_first, then per cycle draft -> verify -> accept ->
    commit - and the rng the same draws, so a request's tokens never depend on its neighbours.

        g = Generation(session, prompt_ids, params, depth, ...)
        while not g.prefill_block(): ...        # one prefill block per call
        first = g.start()                       # the first token's step
        while not g.finished:
            drafted = g.draft()                 # (g.draft(d) caps this cycle's depth at d)
            steps = g.finish_cycle(session.verify(drafted))
    """

    def __init__(self, session: Any, prompt_ids: list[int], params: SamplingParams, depth: int = 0, *,
                 eos_token_ids: list[int] | tuple[int, ...] = (), detokenizer: Detokenizer | None = None,
                 rng: Any = None, grammar: Any = None):
        params.validate()
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be an integer >= 0, got {depth!r}")
        self.prompt_ids = [int(t) for t in prompt_ids]
        max_context = getattr(session, "max_context", None)
        check_prompt(self.prompt_ids, max_context)
        if params.stop and detokenizer is None:
            raise ValueError("stop strings need a detokenizer (load the model with its tokenizer)")
        self.session, self.params, self.depth, self.detokenizer = session, params, depth, detokenizer
        self.stops = StopStrings(params.stop)
        self.stop_ids = stop_token_set(eos_token_ids, params.stop_token_ids, params.ignore_eos)
        self.budget = params.max_tokens
        if max_context is not None:
            self.budget = min(self.budget, max_context - len(self.prompt_ids))
        self.stats = GenerationStats(depth=depth, prompt_tokens=len(self.prompt_ids))
        self.rng = session.make_rng(params.seed) if rng is None else rng
        if grammar is None and params.grammar is not None:
            grammar = params.grammar.matcher()
        self._install_processors(grammar)
        self.generated = 0
        self.finished = False
        self.drafted: list[int] = []
        self._q = None
        self._blocks = None
        self._t0 = self._t_first = None

    def _install_processors(self, grammar: Any) -> None:
        """Penalties and a grammar (an llguidance matcher) run inside the session, at each drafted
        prefix (mtplx/decoding/processors.py)."""
        from .processors import Chain, GrammarMask, Penalties

        s, p = self.session, self.params
        procs = []
        if p.penalized:
            procs.append(Penalties(s.sampling, p.presence_penalty, p.frequency_penalty, p.repetition_penalty,
                                   self.prompt_ids))
        if grammar is not None:
            procs.append(GrammarMask(s.sampling, grammar, int(s.model.cfg.vocab_size), self.stop_ids))
        if procs:
            s.processor = Chain(procs)
        self.grammar = procs[-1] if grammar is not None else None

    # -- prefill
    def prefill_block(self) -> bool:
        """Compute the next prefill block; True once the whole prompt is in."""
        if self._blocks is None:
            self._t0 = time.perf_counter()
            blocks = getattr(self.session, "prefill_blocks", None)
            self._blocks = blocks(self.prompt_ids) if blocks else iter([self.session.prefill(self.prompt_ids)][1:])
        if next(self._blocks, None) is not None:
            return False
        self.stats.cached_tokens = int(getattr(self.session, "cached_tokens", 0))
        self.stats.cache_write_tokens = int(getattr(self.session, "stored_tokens", 0))
        return True

    def start(self) -> GenerationStep:
        """Sample the first token (after the prefill) and emit it."""
        first = self.session.sample_first(self.params, self.rng)
        self._t_first = time.perf_counter()
        self.stats.prompt_time_s = self._t_first - self._t0
        step = self._emit(int(first), False, getattr(self.session, "_last_logits", None))
        if self.params.prompt_logprobs is not None:
            step.prompt_logprobs = self.session.prompt_logprobs(self.prompt_ids, self.params.prompt_logprobs)
        return step

    # -- cycles
    def cycle_depth(self, cap: int | None = None) -> int:
        """The drafts this cycle asks for: the request's depth (capped by `cap`, the load), never
        more than may still be emitted."""
        d = self.depth if cap is None else min(cap, self.depth)
        return max(0, min(d, self.budget - self.generated - 1))

    def draft(self, cap: int | None = None) -> list[int]:
        """This cycle's drafts (none at depth 0), drafted by the session alone."""
        d = self.cycle_depth(cap)
        t = time.perf_counter()
        drafted, q = self.session.draft(d, self.params, self.rng) if d > 0 else ([], None)
        return self.set_drafted(drafted, q, time.perf_counter() - t)

    def set_drafted(self, drafted: list[int], q: Any, seconds: float) -> list[int]:
        """This cycle's drafts, however they were drafted (alone, or batched by the runner)."""
        self.drafted, self._q = [int(x) for x in drafted], q
        self.stats.draft_time_s += seconds
        self._t_verify = time.perf_counter()
        return self.drafted

    def finish_cycle(self, rows: Any) -> list[GenerationStep]:
        """Accept against the verify rows, emit the decided tokens (stopping exactly at the first
        stop condition, then without commit), commit."""
        stats, clock = self.stats, time.perf_counter
        t_verify = clock()
        stats.verify_time_s += t_verify - self._t_verify
        n, nxt = self.session.accept(rows, self.drafted, self._q, self.params, self.rng)
        n, nxt = int(n), int(nxt)
        stats.accept_time_s += clock() - t_verify
        stats.record_cycle(len(self.drafted), n)
        steps = []
        for i, tok in enumerate(self.drafted[:n] + [nxt]):
            steps.append(self._emit(tok, i < n, rows[i]))
            if self.finished:
                return steps
        t = clock()
        self.session.commit(n, nxt)
        stats.commit_time_s += clock() - t
        return steps

    # -- emission
    def _drain(self) -> tuple[str, bool]:
        """End of text: release what the detokenizer and the stop filter still hold."""
        tail = self.detokenizer.flush() if self.detokenizer else ""
        text, stopped = self.stops.feed(tail)
        return (text, True) if stopped else (text + self.stops.flush(), False)

    def _emit(self, tok: int, from_draft: bool, row: Any = None) -> GenerationStep:
        self.generated += 1
        stats, stops = self.stats, self.stops
        stats.generation_tokens = self.generated
        finish = matched = None
        if tok in self.stop_ids:  # a stop id / EOS: its own text is never emitted
            text, stopped = self._drain()
            finish, matched = "stop", (stops.matched if stopped else tok)
        else:
            text, stopped = stops.feed(self.detokenizer.add(tok) if self.detokenizer else "")
            if stopped:
                finish, matched = "stop", stops.matched
            elif self.generated >= self.budget:
                more, stopped = self._drain()
                text += more
                finish, matched = ("stop", stops.matched) if stopped else ("length", None)
        stats.generation_time_s = time.perf_counter() - self._t_first
        if finish is not None:
            stats.peak_memory_bytes = peak_memory_bytes(self.session)
            self.finished = True
        lp = top = None
        if self.params.logprobs is not None and row is not None:
            lp, top = self.session.sampling.logprobs(row, tok, self.params.logprobs)
        return GenerationStep(tok, text, from_draft, finish, stats, matched, lp, top)


def generate_steps(
    session: Any,
    prompt_ids: list[int],
    params: SamplingParams,
    depth: int = 0,
    *,
    eos_token_ids: list[int] | tuple[int, ...] = (),
    detokenizer: Detokenizer | None = None,
    rng: Any = None,
) -> Iterator[GenerationStep]:
    """Run one generation on `session`, yielding every emitted token as a GenerationStep."""
    g = Generation(session, prompt_ids, params, depth, eos_token_ids=eos_token_ids,
                   detokenizer=detokenizer, rng=rng)
    while not g.prefill_block():
        pass
    yield g.start()
    while not g.finished:
        rows = session.verify(g.draft())
        yield from g.finish_cycle(rows)
