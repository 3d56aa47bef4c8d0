"""Generation statistics: what mlx-lm / llama.cpp users expect, plus MTP acceptance by depth.

Vocabulary: a *cycle* is draft D -> verify D+1 -> accept -> commit; `drafted[k]` counts
drafts made at depth k+1, `accepted[k]` those accepted; every verify pass decides one
target token: *recovered* (at the first rejection) or *bonus* (all drafts accepted).
Tokens per verify = decided tokens / verify passes = 1 + accepted / verify passes.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def peak_memory_bytes(session=None) -> int:
    """Accelerator peak memory when known (the session's own `peak_memory_bytes()`, else CUDA's
    max_memory_allocated when torch has initialised CUDA), else the process RSS peak."""
    fn = getattr(session, "peak_memory_bytes", None)
    if callable(fn):
        try:
            v = fn()
            if v:
                return int(v)
        except Exception:  # a backend that cannot tell: fall back
            pass
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                v = torch.cuda.max_memory_allocated()
                if v:
                    return int(v)
        except Exception:  # noqa: BLE001
            pass
    return peak_rss_bytes()


@dataclass
class GenerationStats:
    depth: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0  # tokens emitted to the caller
    prompt_time_s: float = 0.0  # prefill + first token
    generation_time_s: float = 0.0  # from the first token to the last emitted token
    drafted: list[int] = field(default_factory=list)  # [depth]
    accepted: list[int] = field(default_factory=list)  # [depth]
    recovered: int = 0
    bonus: int = 0
    verify_passes: int = 0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    accept_time_s: float = 0.0
    commit_time_s: float = 0.0
    peak_memory_bytes: int = 0
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache (not prefilled)
    cache_write_tokens: int = 0  # prompt tokens this request added to the prefix cache
    batch_size_sum: int = 0  # sum over cycles of the sequences in that cycle's verify forward

    def __post_init__(self) -> None:
        if len(self.drafted) < self.depth:
            self.drafted += [0] * (self.depth - len(self.drafted))
        if len(self.accepted) < self.depth:
            self.accepted += [0] * (self.depth - len(self.accepted))

    # ---- recording ---------------------------------------------------------------------
    def record_cycle(self, n_drafted: int, n_accepted: int) -> None:
        """One verify pass that checked `n_drafted` drafts and accepted the first `n_accepted`."""
        self.verify_passes += 1
        if n_drafted > len(self.drafted):
            self.drafted += [0] * (n_drafted - len(self.drafted))
            self.accepted += [0] * (n_drafted - len(self.accepted))
        for k in range(n_drafted):
            self.drafted[k] += 1
        for k in range(n_accepted):
            self.accepted[k] += 1
        if n_accepted < n_drafted:
            self.recovered += 1
        else:
            self.bonus += 1

    # ---- derived -----------------------------------------------------------------------
    @property
    def acceptance(self) -> list[float]:
        """Per depth k+1: accepted[k] / drafted[k] = the share of cycles whose first k+1 drafts
        were all accepted (every cycle drafts all its depths before verifying)."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]

    @property
    def acceptance_rate(self) -> float:
        d = sum(self.drafted)
        return sum(self.accepted) / d if d else 0.0

    @property
    def tokens_per_verify(self) -> float:
        return 1.0 + sum(self.accepted) / self.verify_passes if self.verify_passes else 0.0

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def prompt_tps(self) -> float:
        """Prefilled (not cached) prompt tokens per second of prompt time (llama.cpp's prompt_n)."""
        return self.prefilled_tokens / self.prompt_time_s if self.prompt_time_s > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        """Tokens after the first, over the time after the first (mlx-lm's convention)."""
        n = self.generation_tokens - 1
        return n / self.generation_time_s if n > 0 and self.generation_time_s > 0 else 0.0

    @property
    def peak_memory_gb(self) -> float:
        return self.peak_memory_bytes / 1e9

    def to_dict(self) -> dict:
        return {
            "depth": self.depth,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "prompt_time_s": self.prompt_time_s,
            "generation_time_s": self.generation_time_s,
            "prompt_tps": self.prompt_tps,
            "cached_tokens": self.cached_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "batch_size_mean": self.batch_size_sum / self.verify_passes if self.verify_passes else 0.0,
            "generation_tps": self.generation_tps,
            "drafted": list(self.drafted),
            "accepted": list(self.accepted),
            "acceptance": self.acceptance,
            "recovered": self.recovered,
            "bonus": self.bonus,
            "verify_passes": self.verify_passes,
            "tokens_per_verify": self.tokens_per_verify,
            "draft_time_s": self.draft_time_s,
            "verify_time_s": self.verify_time_s,
            "accept_time_s": self.accept_time_s,
            "commit_time_s": self.commit_time_s,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory_gb": self.peak_memory_gb,
        }

    def format_lines(self) -> list[str]:
        """The lines printed after a generation (mlx-lm style, plus the MTP line)."""
        prompt = f"Prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.3f} tokens-per-sec"
        if self.cached_tokens:
            prompt = (f"Prompt: {self.prompt_tokens} tokens, {self.cached_tokens} from the prefix cache, "
                      f"{self.prefilled_tokens} prefilled at {self.prompt_tps:.3f} tokens-per-sec")
        lines = [
            prompt,
            f"Generation: {self.generation_tokens} tokens, {self.generation_tps:.3f} tokens-per-sec",
            f"Peak memory: {self.peak_memory_gb:.3f} GB",
        ]
        if self.depth > 0:
            acc = "/".join(f"{a:.2f}" for a in self.acceptance)
            lines.append(
                f"MTP: depth {self.depth}, acceptance {acc}, {self.tokens_per_verify:.2f} tokens per verify"
            )
            lines.append(
                f"Cycles: {self.verify_passes} verify, {self.recovered} recovered, {self.bonus} bonus; "
                f"time draft {self.draft_time_s:.3f}s, verify {self.verify_time_s:.3f}s, "
                f"accept {self.accept_time_s:.3f}s, commit {self.commit_time_s:.3f}s"
            )
        return lines
