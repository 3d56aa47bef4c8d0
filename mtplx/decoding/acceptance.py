"""Exact speculative acceptance: the numpy specification.

Every backend implements this natively and is tested against it; the statistical tests of
losslessness run on it. Randomness enters ONLY through explicit uniforms in [0, 1), so a
backend given the same uniforms must return the same result.

Vocabulary: D drafted tokens d1..dD; the target gives D+1 rows of probabilities p[0..D]
(row i is the target's distribution for the token at draft position i+1, row D is the bonus
row); q[i] is the draft distribution d(i+1) was drawn from (None: greedy drafting, q one-hot).

Sampled (temperature > 0), shared reference section 5:
    for i in 0..D-1:
        accept d(i+1) iff u_accept[i] * q[i, d] < p[i, d]      (probability min(1, p/q))
        else: next = sample(normalise(max(0, p[i] - q[i])), u_sample)  (p[i] if that is empty)
              return (i, next)                                          -> "recovered"
    return (D, sample(p[D], u_sample))                                   -> "bonus"
With q one-hot at d (greedy drafting) this is: accept with probability p(d); recover from p
with d removed.

Greedy (temperature 0): accept while d == argmax(row) (first index on ties); the first
mismatching row's argmax is the recovered token; when all pass, the bonus is argmax(row D).

`sample(w, u)` is the inverse CDF: the first index whose cumulative weight exceeds
u * sum(w), never an index of zero weight.

Penalties and grammar masks (mtplx/decoding/processors.py) change the logits as a function of the
tokens before a position. At a drafted prefix, row i is processed with the prefix + d1..di, and
so is the draft distribution of d(i+1) (`processed_rows`); acceptance then runs on the processed,
filtered rows as above, and the output follows the processed target exactly.
"""

from __future__ import annotations

import numpy as np


def sample_from(w: np.ndarray, u: float) -> int:
    """Inverse-CDF sample of unnormalised non-negative weights w [V] with a uniform u in [0, 1)."""
    w = np.asarray(w, dtype=np.float64)
    c = np.cumsum(w)
    i = int(np.searchsorted(c, u * c[-1], side="right"))
    last = int(np.flatnonzero(w > 0)[-1])
    return min(i, last)


def processed_rows(rows: np.ndarray, drafted: list[int], process) -> np.ndarray:
    """rows [D+1, V] raw logits of a cycle, process(row, prefix) -> the processed row: row i is
    processed with this cycle's prefix drafted[:i] (after the emitted tokens `process` knows)."""
    return np.stack([process(np.asarray(rows[i], dtype=np.float64), list(drafted[:i])) for i in range(len(rows))])


def accept_greedy(target_logits: np.ndarray, drafted: list[int]) -> tuple[int, int]:
    """target_logits [D+1, V] (or probs), drafted [D] -> (n_accepted, next_id)."""
    best = np.argmax(np.asarray(target_logits), axis=-1)  # [D+1]
    for i, d in enumerate(drafted):
        if int(d) != int(best[i]):
            return i, int(best[i])
    return len(drafted), int(best[len(drafted)])


def accept_sampled(
    p: np.ndarray,  # [D+1, V] filtered target probs
    drafted: list[int],  # [D]
    q: np.ndarray | None,  # [D, V] filtered draft probs, None = one-hot (greedy drafting)
    u_accept: np.ndarray,  # [D] uniforms
    u_sample: float,  # one uniform for the recovered or bonus sample
) -> tuple[int, int]:
    """-> (n_accepted, next_id): exact rejection sampling with residual correction."""
    p = np.asarray(p, dtype=np.float64)
    for i, d in enumerate(drafted):
        if q is None:
            qi = np.zeros(p.shape[-1])
            qi[d] = 1.0
        else:
            qi = np.asarray(q[i], dtype=np.float64)
        if u_accept[i] * qi[d] < p[i, d]:
            continue
        r = np.maximum(p[i] - qi, 0.0)
        if not r.sum() > 0:
            r = p[i]
        return i, sample_from(r, u_sample)
    D = len(drafted)
    return D, sample_from(p[D], u_sample)


# ---- batched forms (the statistical tests draw >= 100k cycles at once) --------------------


def sample_batch(w: np.ndarray, u: np.ndarray) -> np.ndarray:
    """w [N, V] non-negative weights, u [N] -> ids [N] (inverse CDF, as `sample_from`)."""
    c = np.cumsum(w, axis=-1)
    V = w.shape[-1]
    idx = np.minimum((c <= (u * c[:, -1])[:, None]).sum(axis=-1), V - 1)
    bad = np.take_along_axis(w, idx[:, None], axis=-1)[:, 0] <= 0  # rounding past the end
    if bad.any():
        idx[bad] = V - 1 - np.argmax((w[bad] > 0)[:, ::-1], axis=-1)
    return idx


def accept_sampled_batch(
    p: np.ndarray,  # [N, D+1, V]
    drafted: np.ndarray,  # [N, D] int
    q: np.ndarray | None,  # [N, D, V] or None (one-hot drafts)
    u_accept: np.ndarray,  # [N, D]
    u_sample: np.ndarray,  # [N]
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised `accept_sampled` over N independent cycles -> (n [N], next_id [N])."""
    N, D1, V = p.shape
    D = D1 - 1
    rows = np.arange(N)
    if D == 0:
        return np.zeros(N, dtype=np.int64), sample_batch(p[:, 0], u_sample)
    drafted = np.asarray(drafted, dtype=np.int64)
    p_d = np.take_along_axis(p[:, :D], drafted[..., None], axis=-1)[..., 0]  # [N, D]
    q_d = np.ones_like(p_d) if q is None else np.take_along_axis(q, drafted[..., None], axis=-1)[..., 0]
    ok = u_accept * q_d < p_d  # [N, D]
    n = np.where(ok.all(axis=-1), D, np.argmin(ok, axis=-1))  # first rejection, or D
    p_n = p[rows, n]  # [N, V]: the rejected row, or the bonus row
    if q is None:
        q_n = np.zeros((N, V))
        rej = n < D
        q_n[rows[rej], drafted[rows[rej], n[rej]]] = 1.0
    else:
        q_n = np.where((n < D)[:, None], q[rows, np.minimum(n, D - 1)], 0.0)
    r = np.maximum(p_n - q_n, 0.0)
    empty = ~(r.sum(axis=-1) > 0)
    r[empty] = p_n[empty]
    return n, sample_batch(r, u_sample)


def accept_greedy_batch(target: np.ndarray, drafted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """target [N, D+1, V] logits or probs, drafted [N, D] -> (n [N], next_id [N])."""
    best = np.argmax(target, axis=-1)  # [N, D+1]
    N, D1 = best.shape
    D = D1 - 1
    if D == 0:
        return np.zeros(N, dtype=np.int64), best[:, 0]
    ok = np.asarray(drafted) == best[:, :D]
    n = np.where(ok.all(axis=-1), D, np.argmin(ok, axis=-1))
    return n, best[np.arange(N), n]
