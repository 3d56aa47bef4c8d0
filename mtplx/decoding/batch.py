"""Continuous batching of generations on one model, each still exact.

    runner = BatchRunner(max_batch=8)
    runner.add(key, generation)                 # mtplx.decoding.loop.Generation, any time
    for key, step in runner.step(): ...         # one engine step: GenerationSteps as decided
    runner.remove(key)                          # a cancelled request leaves at once

One step = at most one prefill block of one waiting generation (so a long prompt delays the
running streams by one block's time per step, never by its whole prefill), then one cycle of
every running generation: each drafts with its own session (MTP head, rng; greedy ones share batched
head forwards, since their drafts decide no token), all their rows [last, d1..dD] go through ONE
target forward (`verify_many`: row-invariant kernels, attention
and recurrence per sequence), each accepts and commits on its own. A generation sees exactly the
calls it would see alone, so its tokens are the same whatever else is in the batch, whenever it
arrived.

Depth under load (`DepthPolicy`): a greedy request's tokens do not depend on its depth, so for
greedy generations the runner may draft less than asked when the measured costs say the batch
decides more tokens per second that way; sampled requests always keep their own depth (their
tokens do depend on it).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Hashable

from .loop import Generation, GenerationStep


@dataclass
class DepthPolicy:
    """Chooses the greedy generations' depth each step from measured costs: verify seconds as a
    function of the rows in the forward (running means per row count, linear in between), draft
    seconds per drafted token, and each generation's own acceptance by depth. Picks the depth
    that maximizes decided tokens per second over the whole batch, never below 0 (plain
    decoding), re-trying the requested depth every `explore` steps so acceptance keeps being
    measured."""

    explore: int = 16
    alpha: float = 0.2
    verify_s: dict = field(default_factory=dict)  # rows -> running mean seconds
    draft_s: float | None = None  # seconds per drafted token (per sequence)
    steps: int = 0

    def observe(self, rows: int, verify_s: float, drafted: int, draft_s: float) -> None:
        old = self.verify_s.get(rows)
        self.verify_s[rows] = verify_s if old is None else old + self.alpha * (verify_s - old)
        if drafted:
            per = draft_s / drafted
            self.draft_s = per if self.draft_s is None else self.draft_s + self.alpha * (per - self.draft_s)

    def _verify_cost(self, rows: int) -> float | None:
        known = sorted(self.verify_s)
        if not known:
            return None
        if rows in self.verify_s:
            return self.verify_s[rows]
        lo = [r for r in known if r < rows]
        hi = [r for r in known if r > rows]
        if lo and hi:
            a, b = lo[-1], hi[0]
            return self.verify_s[a] + (self.verify_s[b] - self.verify_s[a]) * (rows - a) / (b - a)
        if len(known) == 1:
            return self.verify_s[known[0]] * max(rows, 1) / max(known[0], 1) if not lo else self.verify_s[known[0]]
        a, b = (known[-2], known[-1]) if lo else (known[0], known[1])
        slope = max((self.verify_s[b] - self.verify_s[a]) / (b - a), 0.0)
        return max(self.verify_s[a] + slope * (rows - a), 0.0)

    def choose(self, gens: list[Generation]) -> int | None:
        """The depth cap for the greedy generations of this step (None: no cap)."""
        self.steps += 1
        greedy = [g for g in gens if g.params.greedy and g.depth > 0]
        if not greedy or self.draft_s is None or self.steps % self.explore == 0:
            return None
        fixed_rows = sum(1 + g.depth for g in gens if g not in greedy)
        fixed_tokens = sum(1 + _expected_accepted(g, g.depth) for g in gens if g not in greedy)
        best, best_rate = None, -1.0
        for d in range(max(g.depth for g in greedy) + 1):
            rows = fixed_rows + sum(1 + min(d, g.depth) for g in greedy)
            cost = self._verify_cost(rows)
            if cost is None:
                return None
            cost += self.draft_s * sum(min(d, g.depth) for g in greedy)
            tokens = fixed_tokens + sum(1 + _expected_accepted(g, min(d, g.depth)) for g in greedy)
            rate = tokens / cost if cost > 0 else 0.0
            if rate > best_rate * 1.02:  # a deeper draft must win clearly
                best, best_rate = d, rate
        return best


def _expected_accepted(g: Generation, d: int) -> float:
    """Expected accepted drafts per cycle at depth d from the generation's measured acceptance
    (accepted[k] / drafted[k] is the share of cycles whose first k+1 drafts were all accepted)."""
    acc = g.stats.acceptance
    return sum(acc[k] if k < len(acc) and g.stats.drafted[k] else 0.5 ** (k + 1) for k in range(d))


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
        if self.prefilling:
            key, gen = next(iter(self.prefilling.items()))
            before = gen.session.pos if hasattr(gen.session, "pos") else 0
            done = gen.prefill_block()
            report.prefill_tokens = getattr(gen.session, "pos", before) - before
            if done:
                del self.prefilling[key]
                first = gen.start()
                out.append((key, first))
                if not gen.finished:
                    self.running[key] = gen
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
            self.policy.observe(n_rows, t2 - t1, sum(len(d) for d in drafted), t1 - t0)
            report.batch, report.rows, report.depth_cap, report.verify_s = len(gens), n_rows, cap, t2 - t1
            for key, g, r in zip(keys, gens, rows):
                g.stats.batch_size_sum += len(gens)
                for st in g.finish_cycle(r):
                    out.append((key, st))
                if g.finished:
                    del self.running[key]
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
