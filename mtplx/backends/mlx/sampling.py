"""MLX-native filtering, sampling and exact acceptance (tested against the numpy spec in
`mtplx.decoding.filtering` / `mtplx.decoding.acceptance`, which document the math).

Same API as `mtplx.backends.torch.sampling`:

    make_rng(seed) -> MlxRng                                 # seed None: from OS entropy
    filter_probs(logits [..., V], params) -> probs [..., V]  # float32, on the default device
    sample(logits [V], params, rng) -> int
    draft_token(logits [V], params, rng) -> (id, q_row [V] | None)
    stack_draft_probs(rows) -> q [D, V] | None
    accept(target_logits [D+1, V], drafted, draft_probs [D, V] | None, params, rng) -> (n, next_id)

Filtering runs in float32 on the model's device. The acceptance cores (`sample_batch`,
`accept_sampled_batch`) run in float64 on the CPU stream (Metal has no float64; the rows are
small and memory is unified on Apple Silicon), so given the same probabilities and uniforms they
return exactly what the numpy spec returns.

Randomness: one `MlxRng` per request (an mlx.random key, split at every draw). Uniforms per
call, as in the torch backend: a draft step draws 1 (none when drafting greedily), `accept`
draws D + 1, `sample` draws 1 (none when greedy).
"""

from __future__ import annotations

import secrets

import mlx.core as mx

from mtplx.decoding.params import SamplingParams

CPU = mx.cpu


class MlxRng:
    """A per-request random generator: an mlx.random key, split at every draw."""

    def __init__(self, seed: int | None):
        self.seed = secrets.randbits(63) if seed is None else int(seed)
        self.key = mx.random.key(self.seed)

    def uniforms(self, n: int) -> mx.array:  # [n] float64 in [0, 1), on the CPU stream
        self.key, sub = mx.random.split(self.key)
        return mx.random.uniform(shape=(n,), key=sub, stream=CPU).astype(mx.float64, stream=CPU)


def make_rng(seed: int | None) -> MlxRng:
    return MlxRng(seed)


def filter_probs(logits: mx.array, params: SamplingParams) -> mx.array:
    """[..., V] logits -> [..., V] probabilities: temperature -> top_k -> top_p -> min_p."""
    x = logits.astype(mx.float32)
    V = x.shape[-1]
    if params.greedy:
        best = mx.argmax(x, axis=-1, keepdims=True)
        return (mx.arange(V) == best).astype(mx.float32)
    z = x / params.temperature
    if 0 < params.top_k < V:
        kth = mx.min(mx.topk(z, params.top_k, axis=-1), axis=-1, keepdims=True)
        z = mx.where(z < kth, -mx.inf, z)
    p = mx.softmax(z, axis=-1, precise=True)
    if params.top_p < 1.0:
        s = -mx.sort(-p, axis=-1)  # descending
        before = mx.cumsum(s, axis=-1) - s
        n_keep = mx.maximum((before < params.top_p).sum(axis=-1, keepdims=True), 1)
        thresh = mx.take_along_axis(s, n_keep - 1, axis=-1)
        p = mx.where(p >= thresh, p, 0.0)
        p = p / p.sum(axis=-1, keepdims=True)
    if params.min_p > 0.0:
        p = mx.where(p >= params.min_p * p.max(axis=-1, keepdims=True), p, 0.0)
        p = p / p.sum(axis=-1, keepdims=True)
    return p


# ---- batched cores (explicit uniforms, float64 on the CPU stream) -----------------------------


def _f64(a: mx.array) -> mx.array:
    return a.astype(mx.float64, stream=CPU)


def sample_batch(w: mx.array, u: mx.array) -> mx.array:
    """w [N, V] non-negative weights, u [N] uniforms -> ids [N] (inverse CDF, never weight 0)."""
    with mx.stream(CPU):
        w = _f64(w)
        V = w.shape[-1]
        c = mx.cumsum(w, axis=-1)
        t = _f64(u) * c[:, -1]
        idx = mx.minimum((c <= t[:, None]).astype(mx.int32).sum(axis=-1), V - 1)
        picked = mx.take_along_axis(w, idx[:, None], axis=-1)[:, 0]
        last = V - 1 - mx.argmax((w[:, ::-1] > 0).astype(mx.int32), axis=-1)  # last nonzero index
        return mx.where(picked <= 0, last, idx)


def accept_sampled_batch(p: mx.array, drafted: mx.array, q: mx.array | None, u_accept: mx.array,
                         u_sample: mx.array) -> tuple[mx.array, mx.array]:
    """p [N, D+1, V] filtered target probs, drafted [N, D], q [N, D, V] | None (one-hot drafts),
    u_accept [N, D], u_sample [N] -> (n_accepted [N], next_id [N]); the numpy spec in MLX."""
    N, D1, V = p.shape
    D = D1 - 1
    with mx.stream(CPU):
        p = _f64(p)
        if D == 0:
            return mx.zeros((N,), dtype=mx.int32), sample_batch(p[:, 0], u_sample)
        drafted = drafted.astype(mx.int32)
        p_d = mx.take_along_axis(p[:, :D], drafted[..., None], axis=-1)[..., 0]  # [N, D]
        if q is None:
            q_d = mx.ones_like(p_d)
        else:
            q = _f64(q)
            q_d = mx.take_along_axis(q, drafted[..., None], axis=-1)[..., 0]
        ok = (_f64(u_accept) * q_d < p_d).astype(mx.int32)  # [N, D]
        all_ok = ok.min(axis=-1) > 0
        n = mx.where(all_ok, D, mx.argmin(ok, axis=-1)).astype(mx.int32)  # first rejection, or D
        p_n = mx.take_along_axis(p, n[:, None, None], axis=1)[:, 0]  # [N, V]
        n_c = mx.minimum(n, D - 1)
        if q is None:
            d_n = mx.take_along_axis(drafted, n_c[:, None], axis=1)  # [N, 1]
            q_n = (mx.arange(V)[None] == d_n).astype(mx.float64)
        else:
            q_n = mx.take_along_axis(q, n_c[:, None, None], axis=1)[:, 0]
        q_n = mx.where(all_ok[:, None], 0.0, q_n)
        r = mx.maximum(p_n - q_n, 0.0)
        empty = ~(r.sum(axis=-1) > 0)
        r = mx.where(empty[:, None], p_n, r)
        return n, sample_batch(r, u_sample)


def accept_greedy_batch(target: mx.array, drafted: mx.array) -> tuple[mx.array, mx.array]:
    """target [N, D+1, V] logits, drafted [N, D] -> (n [N], next_id [N]) (first index on ties)."""
    best = mx.argmax(target, axis=-1).astype(mx.int32)  # [N, D+1]
    N, D1 = best.shape
    D = D1 - 1
    if D == 0:
        return mx.zeros((N,), dtype=mx.int32), best[:, 0]
    ok = (drafted.astype(mx.int32) == best[:, :D]).astype(mx.int32)
    n = mx.where(ok.min(axis=-1) > 0, D, mx.argmin(ok, axis=-1)).astype(mx.int32)
    return n, mx.take_along_axis(best, n[:, None], axis=1)[:, 0]


# ---- per-request API (what an MlxSession calls) -----------------------------------------------


def sample(logits: mx.array, params: SamplingParams, rng: MlxRng) -> int:
    """logits [V] -> one token id (argmax when greedy, else a sample of the filtered row)."""
    if params.greedy:
        return int(mx.argmax(logits).item())
    p = filter_probs(logits[None], params)
    return int(sample_batch(p, rng.uniforms(1))[0].item())


def draft_token(logits: mx.array, params: SamplingParams, rng: MlxRng) -> tuple[int, mx.array | None]:
    """One MTP drafting step: logits [V] -> (id, q_row [V] or None for a one-hot q)."""
    if params.greedy or params.greedy_draft:
        return int(mx.argmax(logits).item()), None
    q = filter_probs(logits[None], params)  # [1, V]
    return int(sample_batch(q, rng.uniforms(1))[0].item()), q[0]


def draft_prob(logits: mx.array, tok: int, q_row: mx.array | None) -> float:
    """The head's probability of its draft `tok` (q_row[tok], or softmax of the raw logits)."""
    if q_row is not None:
        return float(q_row[tok].item())
    return float(mx.softmax(logits.astype(mx.float32), axis=-1)[tok].item())


def stack_draft_probs(rows: list) -> mx.array | None:
    if not rows or all(r is None for r in rows):
        return None
    if any(r is None for r in rows):
        raise ValueError("mixed greedy and sampled draft rows in one cycle")
    return mx.stack(rows)


def accept(target_logits: mx.array, drafted: list[int], draft_probs: mx.array | None, params: SamplingParams,
           rng: MlxRng) -> tuple[int, int]:
    """Exact acceptance for one sequence -> (n_accepted, next_id)."""
    D = len(drafted)
    if target_logits.shape[0] != D + 1:
        raise ValueError(f"accept: expected {D + 1} target rows for {D} drafts, got {target_logits.shape[0]}")
    ids = mx.array([list(drafted)], dtype=mx.int32).reshape(1, D)
    if params.greedy:
        n, nxt = accept_greedy_batch(target_logits[None], ids)
    else:
        p = filter_probs(target_logits, params)[None]
        q = None if draft_probs is None else draft_probs[None]
        u = rng.uniforms(D + 1)
        n, nxt = accept_sampled_batch(p, ids, q, u[None, :D], u[D:])
    return int(n[0].item()), int(nxt[0].item())


__all__ = ["MlxRng", "make_rng", "filter_probs", "sample", "draft_token", "stack_draft_probs", "accept",
           "sample_batch", "accept_sampled_batch", "accept_greedy_batch"]


# ---- processor primitives (mtplx/decoding/processors.py) ------------------------------------


def penalize(row: mx.array, ids: list[int], sub: list[float], rep_ids: list[int], rep: float) -> mx.array:
    """row [V] -> fp32: repetition penalty on rep_ids, then `sub` subtracted at ids."""
    out = row.astype(mx.float32)
    if rep_ids:
        idx = mx.array(rep_ids, dtype=mx.int32)
        v = out[idx]
        out[idx] = mx.where(v > 0, v / rep, v * rep)
    if ids:
        idx = mx.array(ids, dtype=mx.int32)
        out[idx] = out[idx] - mx.array(sub, dtype=mx.float32)
    return out


def mask_row(row: mx.array, allowed) -> mx.array:
    return mx.where(mx.array(allowed), row.astype(mx.float32), mx.array(float("-inf"), dtype=mx.float32))


def stack_rows(rows: list) -> mx.array:
    return mx.stack(rows)


def logprobs(row: mx.array, tok: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    x = row.astype(mx.float32)
    lp = x - mx.logsumexp(x, axis=-1)
    top = []
    if k:
        idx = mx.argsort(-lp)[:k]
        top = [(int(i), float(lp[int(i)])) for i in idx.tolist()]
    return float(lp[tok]), top
