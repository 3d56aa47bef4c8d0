"""Side-by-side speed measurement: plain decoding (depth 0) against each MTP depth.

Runs are interleaved (prompt by prompt, depths in a rotating order) so that machine load and
thermal drift hit every depth alike; speed is reported as a ratio to depth 0 measured in the
same run. At temperature 0 every depth must emit exactly depth 0's tokens: the bench checks it
and reports any mismatch (that would be a bug, never noise).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtplx.decoding.params import SamplingParams

# Held-out style prompts: beginnings of ordinary Python code and one chat request.
DEFAULT_PROMPTS = [
    "import os\nimport sys\n\n\ndef main(argv=None):\n    \"\"\"Parse the command line and run the tool.\"\"\"\n",
    "class LRUCache:\n    \"\"\"A mapping that forgets the least recently used key when full.\"\"\"\n\n"
    "    def __init__(self, capacity):\n",
    "def read_config(path):\n    \"\"\"Return the settings stored in the INI file at *path*.\"\"\"\n"
    "    import configparser\n",
    "    def __repr__(self):\n        return '%s(%r)' % (self.__class__.__name__,",
]


@dataclass
class DepthResult:
    depth: int
    tokens: int = 0
    gen_time_s: float = 0.0
    prompt_tokens: int = 0
    prompt_time_s: float = 0.0
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    verify_passes: int = 0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    mismatches: int = 0  # prompts whose tokens differ from depth 0 (temperature 0 only)
    runs: int = 0

    @property
    def tps(self) -> float:
        return self.tokens / self.gen_time_s if self.gen_time_s > 0 else 0.0

    @property
    def acceptance(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]

    @property
    def tokens_per_verify(self) -> float:
        return self.tokens / self.verify_passes if self.verify_passes else 0.0

    def add(self, stats, token_count: int) -> None:
        self.runs += 1
        # generation time covers tokens after the first; count the same tokens
        self.tokens += max(token_count - 1, 0)
        self.gen_time_s += stats.generation_time_s
        self.prompt_tokens += stats.prompt_tokens
        self.prompt_time_s += stats.prompt_time_s
        if len(self.drafted) < len(stats.drafted):
            self.drafted += [0] * (len(stats.drafted) - len(self.drafted))
            self.accepted += [0] * (len(stats.accepted) - len(self.accepted))
        for k, (d, a) in enumerate(zip(stats.drafted, stats.accepted)):
            self.drafted[k] += d
            self.accepted[k] += a
        self.verify_passes += stats.verify_passes
        self.draft_time_s += stats.draft_time_s
        self.verify_time_s += stats.verify_time_s

    def to_dict(self, base_tps: float) -> dict:
        return {
            "depth": self.depth,
            "runs": self.runs,
            "tokens": self.tokens,
            "generation_tps": self.tps,
            "speedup": self.tps / base_tps if base_tps > 0 else None,
            "acceptance": self.acceptance,
            "tokens_per_verify": self.tokens_per_verify,
            "prompt_tps": self.prompt_tokens / self.prompt_time_s if self.prompt_time_s > 0 else 0.0,
            "draft_time_s": self.draft_time_s,
            "verify_time_s": self.verify_time_s,
            "mismatches_vs_depth0": self.mismatches if self.depth else None,
        }


@dataclass
class BenchReport:
    results: dict[int, DepthResult]
    params: SamplingParams
    prompts: int
    repeats: int

    @property
    def base_tps(self) -> float:
        return self.results[0].tps if 0 in self.results else 0.0

    def speedup(self, depth: int) -> float:
        b = self.base_tps
        return self.results[depth].tps / b if b > 0 else 0.0

    @property
    def best_depth(self) -> int:
        return max(self.results, key=lambda d: self.results[d].tps)

    def to_dict(self) -> dict:
        return {
            "temperature": self.params.temperature,
            "max_tokens": self.params.max_tokens,
            "prompts": self.prompts,
            "repeats": self.repeats,
            "best_depth": self.best_depth,
            "depths": [self.results[d].to_dict(self.base_tps) for d in sorted(self.results)],
        }


def run_bench(model, prompts: list, depths: list[int], params: SamplingParams, repeats: int = 1,
              warmup: bool = True, progress=None) -> BenchReport:
    """Interleave `depths` over `prompts` x `repeats`; return per-depth totals."""
    import mtplx

    if 0 not in depths:
        depths = [0, *depths]
    depths = sorted(set(depths))
    if max(depths) > 0 and not model.has_mtp:
        raise ValueError(f"{model.path} has no MTP head: only depth 0 can run (graft or forge a head first)")
    results = {d: DepthResult(d) for d in depths}
    if warmup:  # first-call costs (allocator, kernels) must not land on one depth
        short = SamplingParams(**{**params.__dict__, "max_tokens": min(8, params.max_tokens)})
        for d in depths:
            mtplx.generate(model, prompts[0], short, d)
    total = repeats * len(prompts) * len(depths)
    i = 0
    for r in range(repeats):
        for p_idx, prompt in enumerate(prompts):
            order = depths[(p_idx + r) % len(depths):] + depths[: (p_idx + r) % len(depths)]
            base_ids = None
            outs = {}
            for d in order:
                res = mtplx.generate(model, prompt, params, d)
                results[d].add(res.stats, len(res.token_ids))
                outs[d] = res.token_ids
                i += 1
                if progress:
                    progress(i, total)
            base_ids = outs[0]
            if params.greedy:
                for d in depths:
                    if d and outs[d] != base_ids:
                        results[d].mismatches += 1
    return BenchReport(results, params, len(prompts), repeats)


def format_table(report: BenchReport, title: str = "mtplx bench"):
    """A rich Table: one row per depth."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("depth", "tok/s", "speedup", "acceptance", "tok/verify", "prompt tok/s", "identical"):
        t.add_column(col, justify="right")
    base = report.base_tps
    for d in sorted(report.results):
        r = report.results[d]
        acc = "/".join(f"{a:.2f}" for a in r.acceptance) if d else "-"
        tpv = f"{r.tokens_per_verify:.2f}" if d else "1.00"
        ptps = r.prompt_tokens / r.prompt_time_s if r.prompt_time_s > 0 else 0.0
        if d == 0 or not report.params.greedy:
            same = "-"
        else:
            same = "yes" if r.mismatches == 0 else f"NO ({r.mismatches} prompts)"
        speed = f"{r.tps / base:.2f}x" if base > 0 else "-"
        t.add_row(str(d), f"{r.tps:.1f}", speed, acc, tpv, f"{ptps:.1f}", same)
    return t
