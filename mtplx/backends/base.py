"""The boundary between the backend-free decoding loop and an array backend.

One `Session` generates one sequence. Token ids cross the boundary as Python ints; logits and
draft probabilities stay inside the backend as opaque objects.

Positions and the MTP head (see shared reference, section 2). Write h[t] for the target hidden
at position t (it predicts x[t+1]). The head predicts x[t+2] from (h[t], x[t+1]) at position t.

A cycle of the loop, with `last` = the newest emitted token, not yet fed to the target:
    drafted, q = session.draft(depth, params, rng)        # d1..dD, from (h_last, last)
    rows       = session.verify(drafted)                  # target over [last, d1..dD] -> D+1 rows
    n, next_id = session.accept(rows, drafted, q, params, rng)
    session.commit(n)                                     # keep last + d1..dn, drop the rest
    emit d1..dn, next_id; last = next_id
Depth 0 (plain decoding) is the same cycle with no drafts: verify([]) feeds only `last`.
After `prefill(prompt)` the session holds the logits of the last prompt position; the loop
samples the first token from them with `session.sample_first(params, rng)`.

What the loop (mtplx/decoding/loop.py) guarantees and expects:
- One rng per request: `rng = session.make_rng(params.seed)`, passed to every call; a backend
  draws its uniforms from it only (same seed, same calls -> same tokens).
- Depth 0 never calls `draft`; the loop passes drafted=[] and q=None to verify/accept. Near the
  end of max_tokens or of the context the loop asks for fewer drafts than its depth (it never
  decides tokens it could not emit); `draft(d)` must return exactly d ids.
- q is None when drafting is greedy (temperature 0, or params.greedy_draft): q is one-hot at
  the drafted id. Otherwise q[i] is the draft row filtered exactly like the target rows
  (temperature -> top_k -> top_p -> min_p; mtplx.decoding.filtering is the reference).
- `accept` is exact (mtplx.decoding.acceptance is the numpy spec; torch: backends/torch/sampling).
- When a stop condition (stop id / EOS, stop string, max_tokens, context end) falls inside a
  cycle's tokens, the loop stops emitting there and does NOT call `commit`: the session is
  finished and may be dropped.
- Optional: `peak_memory_bytes() -> int` (e.g. torch.cuda.max_memory_allocated on a GPU); the
  stats fall back to the process's peak RSS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from mtplx.decoding.params import SamplingParams


@dataclass
class CycleTimings:
    draft_s: float = 0.0
    verify_s: float = 0.0
    commit_s: float = 0.0


class Session(Protocol):
    max_context: int  # positions the session can hold (prompt + generated)

    def prefill(self, prompt_ids: list[int]) -> None:
        """Run the target over the prompt, fill target and MTP-head caches."""

    def sample_first(self, params: SamplingParams, rng: Any) -> int:
        """Sample the first generated token from the last prompt position's logits."""

    def draft(self, depth: int, params: SamplingParams, rng: Any) -> tuple[list[int], Any]:
        """Draft up to `depth` tokens with the MTP head (fewer when params.draft_cutoff stops a
        doubtful path); returns ids and opaque draft probs q."""

    def verify(self, drafted: list[int]) -> Any:
        """Feed [last, *drafted] to the target in one pass; opaque logits for len+1 rows."""

    def accept(self, rows: Any, drafted: list[int], q: Any, params: SamplingParams, rng: Any) -> tuple[int, int]:
        """Exact acceptance: (n_accepted, next_id) where next_id is recovered or bonus."""

    def commit(self, n_accepted: int, next_id: int) -> None:
        """Keep `last` and the first n_accepted drafts in every cache; `next_id` becomes `last`."""

    def make_rng(self, seed: int | None) -> Any:
        """A per-request random generator native to the backend."""


@dataclass
class BackendInfo:
    name: str  # "torch" | "mlx"
    device: str
    dtype: str
    extras: dict = field(default_factory=dict)
