"""Sampling parameters of one request.

Filtering order (numpy spec `mtplx.decoding.filtering` and every backend):
temperature -> top_k -> top_p -> min_p -> renormalise. Target and draft rows are filtered
with the SAME parameters; acceptance runs on the filtered distributions.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # stop strings (never emitted)
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop ids besides EOS
    ignore_eos: bool = False
    # temperature > 0 only: draft with argmax of the head (q one-hot) instead of sampling
    # from the filtered head distribution. Both are exact; sampling usually accepts more.
    greedy_draft: bool = False
    # adaptive draft length: a cycle stops drafting once the head's confidence in its path (the
    # product of its draft tokens' probabilities) falls below this; 0 = always draft `depth`.
    # The stopping rule only looks at drafts already made, so output stays exact.
    draft_cutoff: float = 0.0
    # penalties (mtplx/decoding/processors.py), applied at every drafted prefix: OpenAI presence /
    # frequency over the generated tokens, the multiplicative repetition penalty over prompt +
    # generated tokens (1 = off)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # log-probabilities of each emitted token (raw: the target's own log-softmax, before
    # penalties, grammar, temperature and filtering), with this many alternatives; None = off
    logprobs: int | None = None
    # structured output: a compiled grammar (mtplx.decoding.grammar.CompiledGrammar); each
    # generation takes a fresh matcher from it
    grammar: object = None
    # completions echo: the log-probabilities of the prompt's tokens (after the first) too
    prompt_logprobs: int | None = None

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self) -> None:
        """Raise ValueError with a user-facing message for out-of-range values."""
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if not 0.0 <= self.draft_cutoff < 1.0:
            raise ValueError(f"draft_cutoff must be in [0, 1) (0 = off), got {self.draft_cutoff}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2] (0 = off), got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError(f"repetition_penalty must be in (0, 10] (1 = off), got {self.repetition_penalty}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20):
            raise ValueError(f"top_logprobs must be an integer in [0, 20], got {self.logprobs!r}")
