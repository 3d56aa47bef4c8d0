"""Continuous batching of generations on one model, each still exact.

    runner = BatchRunner(max_batch=8)
    runner.add(key, generation)                 # mtplx.decoding.loop.Generation, any time
    for key, step in runner.step(): ...         # one engine step: GenerationSteps as decided
    runner.remove(key)                          # a cancelled request leaves at once

One step = about one prefill block of tokens of the waiting generations, first come first
served (one block of a long prompt, or several short prompts whole), so a long prompt delays the
running streams by one block's time per step, never by its whole prefill; then one cycle of
every running generation: each drafts with its own session (MTP head, rng; greedy ones share batched
head forwards, since their drafts decide no token), all their rows [last, d1..dD] go through ONE
target forward (`verify_many`: row-invariant kernels, attention
and recurrence per sequence), each accepts and commits on its own. A generation sees exactly the
calls it would see alone, so its tokens are the same whatever else is in the batch, whenever it
arrived.

Depth under load (`DepthPolicy`): a greedy request's tokens do not depend on its depth, so for
greedy generations the runner may draft less than asked when the batch, measured, decides more
tokens per second that way; sampled requests always keep their own depth (their tokens do
depend on it), and a generation alone always keeps its depth.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Hashable

from .loop import Generation, GenerationStep


@dataclass
class DepthPolicy:
    """Chooses the greedy generations' depth cap each step from measured throughput: for each
    batch size class (2, 3-4, 5-8, 9-16, ...) and cap (None = the requested depths, then
    D-1 .. 0), the tokens decided per second over its last `window` steps. The caps are tried in
    turn (round robin, so all see the same phase of the generations) until each has `trials`
    steps; then the best is used, and every `explore` steps the caps are all measured again in
    turn. A cap must beat the requested depths by `margin` to replace them. One generation alone
    is never capped: its depth is the one asked for (or tuned)."""

    trials: int = 8
    explore: int = 30
    window: int = 24
    margin: float = 0.1  # one step's decided tokens vary a lot (acceptance): small wins are noise
    history: dict = field(default_factory=dict)  # (class, cap) -> [(tokens, seconds)] last `window`
    steps: int = 0

    @staticmethod
    def _class(n: int) -> int:
        return n.bit_length() - (n & (n - 1) == 0)  # 2 -> 1, 3-4 -> 2, 5-8 -> 3, ...

    def rate(self, n: int, cap: int | None) -> float:
        h = self.history.get((self._class(n), cap), [])
        sec = sum(t for _, t in h)
        return sum(k for k, _ in h) / sec if sec > 0 else 0.0

    def choose(self, gens: list[Generation]) -> int | None:
        self.steps += 1
        greedy_depth = max((g.depth for g in gens if g.params.greedy), default=0)
        n = len(gens)
        if n < 2 or greedy_depth == 0:
            return None
        caps = [None] + list(range(greedy_depth - 1, -1, -1))
        c = self._class(n)
        if min(len(self.history.get((c, cap), [])) for cap in caps) < self.trials:
            return caps[self.steps % len(caps)]
        phase = self.steps % self.explore
        if phase < len(caps):  # re-measure every cap once, in turn
            return caps[phase]
        best = max(caps[1:], key=lambda cap: self.rate(n, cap))
        return best if self.rate(n, best) > self.rate(n, None) * (1 + self.margin) else None

    def observe(self, n: int, cap: int | None, tokens: int, seconds: float) -> None:
        if n < 2 or seconds <= 0:
            return
        h = self.history.setdefault((self._class(n), cap), [])
        h.append((tokens, seconds))
        del h[:-self.window]


@dataclass
class StepReport:
    batch: int = 0  # generations in this step's verify forward
    rows: int = 0
    depth_cap: int | None = None
    prefill_tokens: int = 0
    verify_s: float = 0.0


class BatchRunner:
    def __init__(self, max_batch: int = 8, verify_many: Any = None, policy: DepthPolicy | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self._verify_many = verify_many  # (sessions, drafted lists) -> rows; default: the sessions' own
        self.policy = policy if policy is not None else DepthPolicy()
        self.prefilling: OrderedDict[Hashable, Generation] = OrderedDict()
        self.running: OrderedDict[Hashable, Generation] = OrderedDict()
        self.last = StepReport()

    def __len__(self) -> int:
        return len(self.prefilling) + len(self.running)

    @property
    def free(self) -> int:
        return self.max_batch - len(self)

    def add(self, key: Hashable, gen: Generation) -> None:
        if len(self) >= self.max_batch:
            raise RuntimeError(f"the batch is full ({self.max_batch} generations)")
        self.prefilling[key] = gen

    def remove(self, key: Hashable) -> None:
        self.prefilling.pop(key, None)
        self.running.pop(key, None)

    def step(self) -> list[tuple[Hashable, GenerationStep]]:
        """One engine step (see the module doc). Finished generations leave the runner."""
        out: list[tuple[Hashable, GenerationStep]] = []
        report = StepReport()
        for key, gen in list(self.prefilling.items()):  # FIFO, about one block of tokens per step
            budget = getattr(gen.session, "prefill_block", 256)
            if report.prefill_tokens and report.prefill_tokens + len(gen.prompt_ids) - getattr(gen.session, "pos", 0) > budget:
                break
            before = getattr(gen.session, "pos", 0)
            done = gen.prefill_block()
            report.prefill_tokens += max(getattr(gen.session, "pos", before) - before, 1)
            if done:
                del self.prefilling[key]
                out.append((key, gen.start()))
                if not gen.finished:
                    self.running[key] = gen
            if not done or report.prefill_tokens >= budget:
                break
        if self.running:
            keys, gens = list(self.running), list(self.running.values())
            cap = self.policy.choose(gens)
            t0 = time.perf_counter()
            drafted = self._draft(gens, cap)
            t1 = time.perf_counter()
            verify = self._verify_many or type(gens[0].session).verify_many
            rows = verify([g.session for g in gens], drafted)
            t2 = time.perf_counter()
            n_rows = sum(len(d) + 1 for d in drafted)
            report.batch, report.rows, report.depth_cap, report.verify_s = len(gens), n_rows, cap, t2 - t1
            decided = 0
            for key, g, r in zip(keys, gens, rows):
                g.stats.batch_size_sum += len(gens)
                for st in g.finish_cycle(r):
                    out.append((key, st))
                    decided += 1
                if g.finished:
                    del self.running[key]
            self.policy.observe(len(gens), cap, decided, time.perf_counter() - t0)
        self.last = report
        return out

    @staticmethod
    def _draft(gens: list[Generation], cap: int | None) -> list[list[int]]:
        """Sampled requests draft alone (their drafts' bits are part of their output); greedy
        ones (whose drafts only decide how many tokens a cycle gets) share batched head
        forwards when the session class has `draft_many`."""
        greedy = [g for g in gens if g.params.greedy and g.cycle_depth(cap) > 0]
        many = getattr(type(gens[0].session), "draft_many", None)
        if len(greedy) < 2 or many is None:
            greedy = []
        for g in gens:
            if g not in greedy:
                g.draft(cap if g.params.greedy else None)
        if greedy:
            t = time.perf_counter()
            res = many([g.session for g in greedy], [g.cycle_depth(cap) for g in greedy],
                       [g.params for g in greedy], [g.rng for g in greedy])
            share = (time.perf_counter() - t) / len(greedy)
            for g, (d, q) in zip(greedy, res):
                g.set_drafted(d, q, share)
        return [g.drafted for g in gens]


__all__ = ["BatchRunner", "DepthPolicy", "StepReport"]
