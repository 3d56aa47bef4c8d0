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


def check_prompt(prompt_ids: list[int], max_context: int | None) -> None:
    if len(prompt_ids) == 0:
        raise ValueError("empty prompt: give at least one token (for text, at least one character)")
    if max_context is not None and len(prompt_ids) >= max_context:
        raise ValueError(
            f"prompt is {len(prompt_ids)} tokens but the model's context holds {max_context} "
            f"positions, leaving no room to generate: shorten the prompt to at most {max_context - 1} tokens"
        )


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
    params.validate()
    if not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be an integer >= 0, got {depth!r}")
    prompt_ids = [int(t) for t in prompt_ids]
    max_context = getattr(session, "max_context", None)
    check_prompt(prompt_ids, max_context)
    if params.stop and detokenizer is None:
        raise ValueError("stop strings need a detokenizer (load the model with its tokenizer)")

    stops = StopStrings(params.stop)
    stop_ids = stop_token_set(eos_token_ids, params.stop_token_ids, params.ignore_eos)
    budget = params.max_tokens
    if max_context is not None:
        budget = min(budget, max_context - len(prompt_ids))
    stats = GenerationStats(depth=depth, prompt_tokens=len(prompt_ids))
    if rng is None:
        rng = session.make_rng(params.seed)
    clock = time.perf_counter

    t0 = clock()
    session.prefill(prompt_ids)
    stats.cached_tokens = int(getattr(session, "cached_tokens", 0))
    stats.cache_write_tokens = int(getattr(session, "stored_tokens", 0))
    first = session.sample_first(params, rng)
    t_first = clock()
    stats.prompt_time_s = t_first - t0
    generated = 0

    def drain() -> tuple[str, bool]:
        """End of text: release what the detokenizer and the stop filter still hold."""
        tail = detokenizer.flush() if detokenizer else ""
        text, stopped = stops.feed(tail)
        return (text, True) if stopped else (text + stops.flush(), False)

    def emit(tok: int, from_draft: bool) -> GenerationStep:
        nonlocal generated
        generated += 1
        stats.generation_tokens = generated
        finish = matched = None
        if tok in stop_ids:  # a stop id / EOS: its own text is never emitted
            text, stopped = drain()
            finish, matched = "stop", (stops.matched if stopped else tok)
        else:
            text, stopped = stops.feed(detokenizer.add(tok) if detokenizer else "")
            if stopped:
                finish, matched = "stop", stops.matched
            elif generated >= budget:
                more, stopped = drain()
                text += more
                finish, matched = ("stop", stops.matched) if stopped else ("length", None)
        stats.generation_time_s = clock() - t_first
        if finish is not None:
            stats.peak_memory_bytes = peak_memory_bytes(session)
        return GenerationStep(tok, text, from_draft, finish, stats, matched)

    step = emit(int(first), False)
    yield step
    if step.finish_reason is not None:
        return
    while True:
        d = min(depth, budget - generated - 1)  # never decide more than may be emitted
        t = clock()
        if d > 0:
            drafted, q = session.draft(d, params, rng)
            drafted = [int(x) for x in drafted]
        else:
            drafted, q = [], None
        t_draft = clock()
        rows = session.verify(drafted)
        t_verify = clock()
        n, nxt = session.accept(rows, drafted, q, params, rng)
        n, nxt = int(n), int(nxt)
        t_accept = clock()
        stats.draft_time_s += t_draft - t
        stats.verify_time_s += t_verify - t_draft
        stats.accept_time_s += t_accept - t_verify
        stats.record_cycle(len(drafted), n)
        for i, tok in enumerate(drafted[:n] + [nxt]):
            step = emit(tok, i < n)
            yield step
            if step.finish_reason is not None:
                return
        t = clock()
        session.commit(n, nxt)
        stats.commit_time_s += clock() - t
