"""Torch-native filtering, sampling and exact acceptance (tested against the numpy spec in
`mtplx.decoding.filtering` / `mtplx.decoding.acceptance`, which document the math).

What a TorchSession calls (one request = one `torch.Generator` from `make_generator`):

    make_generator(seed, device="cpu") -> torch.Generator   # seed None: from OS entropy
    filter_probs(logits [..., V], params) -> probs [..., V]  # float32 (float64 if input is)
    sample(logits [V], params, gen) -> int                   # sample_first / depth 0
    draft_token(logits [V], params, gen) -> (id, q_row [V] | None)
    draft_prob(logits [V], id, q_row | None) -> float   # the head's confidence in that draft
        # one drafting step of the MTP head: greedy params or params.greedy_draft -> argmax
        # and None (q one-hot); otherwise a sample from the filtered row and that row.
    stack_draft_probs(rows: list[q_row | None]) -> q [D, V] | None
    accept(target_logits [D+1, V], drafted list[int], draft_probs [D, V] | None, params, gen)
        -> (n_accepted, next_id)  # greedy: argmax rule; sampled: rejection + residual

Randomness: uniforms from `torch.rand(..., generator=gen, dtype=float64)` on gen's device:
a draft step draws 1 uniform (none when drafting greedily); `accept` draws D + 1 (D accept
tests, then 1 for the recovered or bonus sample); `sample` draws 1 (none when greedy). The
batched cores take the uniforms explicitly, so they can be compared with the numpy spec
bit for bit and run the >= 100k-draw statistical tests without a Python loop.
"""

from __future__ import annotations

import torch

from mtplx.decoding.params import SamplingParams

from . import kernels


TOP_P_CANDIDATES = 1024


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def argmax(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim, first index on ties (a NaN wins, as in torch's max). On CPU, once a
    model has loaded the compiled kernel, its `argmax_rows` (~1 us where torch's reduction takes 7-30), else
    `max(dim).indices` (~2x faster than `argmax`). Every greedy choice in the backend goes through it."""
    if x.device.type == "cpu" and x.dtype in _ARGMAX_DTYPES and x.numel():
        mod = kernels.loaded()
        if mod is not None:
            return mod.argmax_rows(x)
    return x.max(dim=-1).indices


_ARGMAX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _uniforms(n: int, gen: torch.Generator) -> torch.Tensor:  # [n] float64 in [0, 1)
    return torch.rand(n, generator=gen, dtype=torch.float64, device=gen.device)


def filter_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] logits -> [..., V] probabilities: temperature -> top_k -> top_p -> min_p."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    V = x.shape[-1]
    if params.greedy:
        out = torch.zeros_like(x)
        return out.scatter_(-1, argmax(x)[..., None], 1.0)
    z = x / params.temperature
    if 0 < params.top_k < V:
        # filter the candidates only and scatter them back (dense passes over V: topk, one
        # compare, one scatter); tokens tied with the k-th value are all kept
        vals, idx = torch.topk(z, params.top_k, dim=-1)  # [..., k] descending
        kth = vals[..., -1:]
        c = int((z >= kth).sum(dim=-1).max())
        if c > params.top_k:
            vals, idx = torch.topk(z, c, dim=-1)
            vals = vals.masked_fill(vals < kth, float("-inf"))
        pv = _top_p_min_p_sorted(torch.softmax(vals, dim=-1), params)
        return torch.zeros_like(z).scatter_(-1, idx, pv)
    p = torch.softmax(z, dim=-1)
    if params.top_p < 1.0:
        # the kept prefix of the descending sort, found among the top k0 candidates (a full sort
        # of a 248k vocabulary costs ~30 ms a row on CPU); k0 grows until the prefix ends inside
        k0 = min(V, TOP_P_CANDIDATES)
        while True:
            s = torch.topk(p, k0, dim=-1).values  # [..., k0] descending
            before = torch.cumsum(s, dim=-1) - s
            n_keep = (before < params.top_p).sum(dim=-1, keepdim=True)
            if k0 == V or bool((n_keep < k0).all()):
                break
            k0 = min(V, k0 * 8)
        n_keep = n_keep.clamp_min(1)
        thresh = torch.gather(s, -1, n_keep - 1)
        p = torch.where(p >= thresh, p, 0.0)
        p = p / p.sum(dim=-1, keepdim=True)
    if params.min_p > 0.0:
        p = torch.where(p >= params.min_p * p.amax(dim=-1, keepdim=True), p, 0.0)
        p = p / p.sum(dim=-1, keepdim=True)
    return p


def _top_p_min_p_sorted(s: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """top_p then min_p on probabilities sorted descending along the last dim (same value
    thresholds as the dense path), renormalised."""
    if params.top_p < 1.0:
        before = torch.cumsum(s, dim=-1) - s
        n_keep = (before < params.top_p).sum(dim=-1, keepdim=True).clamp_min(1)
        s = torch.where(s >= torch.gather(s, -1, n_keep - 1), s, 0.0)
        s = s / s.sum(dim=-1, keepdim=True)
    if params.min_p > 0.0:
        s = torch.where(s >= params.min_p * s[..., :1], s, 0.0)
        s = s / s.sum(dim=-1, keepdim=True)
    return s


# ---- batched cores (explicit uniforms) ----------------------------------------------------


def sample_batch(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """w [N, V] non-negative weights, u [N] uniforms -> ids [N] (inverse CDF, never weight 0)."""
    w = w.to(torch.float64)
    c = torch.cumsum(w, dim=-1)
    t = u.to(w.device, torch.float64) * c[:, -1]
    V = w.shape[-1]
    idx = torch.searchsorted(c, t[:, None], right=True)[:, 0].clamp_max(V - 1)
    bad = torch.gather(w, 1, idx[:, None])[:, 0] <= 0  # rounding pushed past the last token
    if bool(bad.any()):
        last = V - 1 - torch.argmax((w[bad] > 0).flip(-1).to(torch.uint8), dim=-1)
        idx[bad] = last
    return idx


def accept_sampled_batch(
    p: torch.Tensor,  # [N, D+1, V] filtered target probs
    drafted: torch.Tensor,  # [N, D] int64
    q: torch.Tensor | None,  # [N, D, V] filtered draft probs, None = one-hot drafts
    u_accept: torch.Tensor,  # [N, D] float64
    u_sample: torch.Tensor,  # [N] float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (n_accepted [N], next_id [N]); the numpy spec `accept_sampled_batch`, in torch."""
    N, D1, V = p.shape
    D = D1 - 1
    if D == 0:
        return torch.zeros(N, dtype=torch.long, device=p.device), sample_batch(p[:, 0], u_sample)
    # full rows stay in their dtype (float32 from the model, float64 in the spec tests); the
    # accept test runs in float64 on the gathered values, the final sample's CDF in float64
    drafted = drafted.to(device=p.device, dtype=torch.long)
    u_accept = u_accept.to(device=p.device, dtype=torch.float64)
    p_d = torch.gather(p[:, :D], -1, drafted[..., None])[..., 0].to(torch.float64)  # [N, D]
    if q is None:
        q_d = torch.ones_like(p_d)
    else:
        q = q.to(p.dtype)
        q_d = torch.gather(q, -1, drafted[..., None])[..., 0].to(torch.float64)
    ok = u_accept * q_d < p_d  # [N, D]
    all_ok = ok.all(dim=-1)
    n = torch.where(all_ok, D, torch.argmin(ok.to(torch.uint8), dim=-1))  # first rejection
    p_n = torch.gather(p, 1, n[:, None, None].expand(N, 1, V))[:, 0]  # [N, V]
    n_c = n.clamp_max(D - 1)
    if q is None:
        q_n = torch.zeros_like(p_n)
        q_n.scatter_(1, torch.gather(drafted, 1, n_c[:, None]), 1.0)
    else:
        q_n = torch.gather(q, 1, n_c[:, None, None].expand(N, 1, V))[:, 0]
    q_n = torch.where(all_ok[:, None], 0.0, q_n)
    r = (p_n - q_n).clamp_min(0.0)
    empty = ~(r.sum(dim=-1) > 0)
    if bool(empty.any()):
        r = torch.where(empty[:, None], p_n, r)
    return n, sample_batch(r, u_sample)


def accept_greedy_batch(target: torch.Tensor, drafted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """target [N, D+1, V] logits, drafted [N, D] -> (n [N], next_id [N])."""
    best = argmax(target)  # [N, D+1]
    N, D1 = best.shape
    D = D1 - 1
    if D == 0:
        return torch.zeros(N, dtype=torch.long, device=best.device), best[:, 0]
    ok = drafted.to(best.device, torch.long) == best[:, :D]
    n = torch.where(ok.all(dim=-1), D, torch.argmin(ok.to(torch.uint8), dim=-1))
    return n, best[torch.arange(N, device=best.device), n]


# ---- processor primitives (mtplx/decoding/processors.py) ------------------------------------


def penalize(row: torch.Tensor, ids: list[int], sub: list[float], rep_ids: list[int], rep: float) -> torch.Tensor:
    """row [V] -> fp32 copy: repetition penalty on rep_ids (positive / rep, negative * rep), then
    `sub` subtracted at ids (presence + frequency * count)."""
    out = row.float().clone()
    if rep_ids:
        idx = torch.tensor(rep_ids, dtype=torch.long, device=out.device)
        v = out[idx]
        out[idx] = torch.where(v > 0, v / rep, v * rep)
    if ids:
        idx = torch.tensor(ids, dtype=torch.long, device=out.device)
        out[idx] -= torch.tensor(sub, dtype=torch.float32, device=out.device)
    return out


def mask_row(row: torch.Tensor, allowed) -> torch.Tensor:
    """row [V] -> fp32 copy with the tokens not `allowed` (numpy bool [V]) at -inf."""
    keep = torch.from_numpy(allowed).to(row.device)
    return row.float().masked_fill(~keep, float("-inf"))


def stack_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(rows)


def logprobs(row: torch.Tensor, tok: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """Raw log-probability of `tok` under row [V] (log-softmax in fp32) and the k most likely
    (id, logprob), highest first (ties: lower id first)."""
    lp = torch.log_softmax(row.float(), dim=-1)
    top = []
    if k:
        vals, idx = torch.topk(lp, k)
        top = [(int(i), float(v)) for v, i in zip(vals.tolist(), idx.tolist())]
    return float(lp[tok]), top


# ---- per-request API (what a Session calls) -----------------------------------------------


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """logits [V] -> one token id (argmax when greedy, else a sample of the filtered row)."""
    if params.greedy:
        return int(argmax(logits))
    p = filter_probs(logits[None], params)
    return int(sample_batch(p, _uniforms(1, gen))[0])


def draft_token(
    logits: torch.Tensor, params: SamplingParams, gen: torch.Generator
) -> tuple[int, torch.Tensor | None]:
    """One MTP drafting step: logits [V] -> (id, q_row [V] or None for a one-hot q)."""
    if params.greedy or params.greedy_draft:
        return int(argmax(logits)), None
    q = filter_probs(logits[None], params)  # [1, V]
    return int(sample_batch(q, _uniforms(1, gen))[0]), q[0]


def draft_prob(logits: torch.Tensor, tok: int, q_row: torch.Tensor | None) -> float:
    """The head's probability of its draft `tok`: q_row[tok] for a sampled draft, else the
    softmax of the raw head logits [V] at tok (greedy drafting)."""
    if q_row is not None:
        return float(q_row[tok])
    return float(torch.softmax(logits.float(), dim=-1)[tok])


def stack_draft_probs(rows: list[torch.Tensor | None]) -> torch.Tensor | None:
    """q rows from `draft_token` -> [D, V], or None when every draft was greedy (or D == 0)."""
    if not rows or all(r is None for r in rows):
        return None
    if any(r is None for r in rows):
        raise ValueError("mixed greedy and sampled draft rows in one cycle")
    return torch.stack(rows)


def accept(
    target_logits: torch.Tensor,  # [D+1, V]
    drafted: list[int],  # [D]
    draft_probs: torch.Tensor | None,  # [D, V] filtered, None = one-hot drafts
    params: SamplingParams,
    gen: torch.Generator,
) -> tuple[int, int]:
    """Exact acceptance for one sequence -> (n_accepted, next_id)."""
    D = len(drafted)
    if target_logits.shape[0] != D + 1:
        raise ValueError(f"accept: expected {D + 1} target rows for {D} drafts, got {target_logits.shape[0]}")
    if params.greedy:  # accept_greedy_batch's rule for one sequence, without its tensor ops
        best = argmax(target_logits).tolist()  # [D+1]
        n = 0
        while n < D and int(drafted[n]) == best[n]:
            n += 1
        return n, best[n]
    dev = target_logits.device
    ids = torch.tensor([drafted], dtype=torch.long, device=dev).reshape(1, D)
    p = filter_probs(target_logits, params)[None]  # [1, D+1, V]
    q = None if draft_probs is None else draft_probs[None]
    u = _uniforms(D + 1, gen)
    n, nxt = accept_sampled_batch(p, ids, q, u[None, :D], u[D:])
    return int(n[0]), int(nxt[0])
