"""Losslessness of the acceptance math: numpy spec and the torch backend's native version.

The statistical harness runs whole generations (several cycles, crossing cycle boundaries)
for 100k independent chains at once on a Markov "model": the target's next-token row is
P[prev] and the draft's is Q[prev], both filtered with the same SamplingParams. The emitted
token at every position must follow the target marginal (chi-square and total variation),
and the first cycle must accept k drafts with probability e_start^T M^k 1 with
M = min(P, Q) (one-hot Q for greedy drafting), within 4 sigma. Negative controls
(always accept; recover from p instead of the residual) must fail the same checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps

from mtplx.backends.torch import sampling as ts
from mtplx.decoding import acceptance as spec
from mtplx.decoding.filtering import filter_probs
from mtplx.decoding.params import SamplingParams

N_DRAWS = 100_000
CHUNK = 25_000


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # small tensors on a shared 2-core machine: one intra-op thread is 2-3x faster
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- accept functions under test (batched, explicit uniforms) ---------------------------
def numpy_accept(p, drafted, q, ua, us):
    return spec.accept_sampled_batch(p, drafted, q, ua, us)


def torch_accept(p, drafted, q, ua, us):
    n, nxt = ts.accept_sampled_batch(
        torch.from_numpy(p),
        torch.from_numpy(drafted),
        None if q is None else torch.from_numpy(q),
        torch.from_numpy(ua),
        torch.from_numpy(us),
    )
    return n.numpy(), nxt.numpy()


def always_accept(p, drafted, q, ua, us):  # negative control
    D = drafted.shape[1]
    return np.full(len(p), D), spec.sample_batch(p[:, D], us)


def residual_is_p(p, drafted, q, ua, us):  # negative control: recover from p, not max(0, p - q)
    N, D1, V = p.shape
    D = D1 - 1
    p_d = np.take_along_axis(p[:, :D], drafted[..., None], -1)[..., 0]
    q_d = np.ones_like(p_d) if q is None else np.take_along_axis(q, drafted[..., None], -1)[..., 0]
    ok = ua * q_d < p_d
    n = np.where(ok.all(-1), D, np.argmin(ok, -1))
    return n, spec.sample_batch(p[np.arange(N), n], us)


# ---- the harness ---------------------------------------------------------------------------
def make_tables(V, params, seed, greedy_draft=False):
    g = np.random.default_rng(seed)
    target_logits = g.normal(0, 1.5, (V, V))
    draft_logits = 0.6 * target_logits + g.normal(0, 1.2, (V, V))  # correlated, but different
    P = filter_probs(target_logits, params)
    Q = filter_probs(draft_logits, params)
    return P, Q, draft_logits


def simulate(P, Q, draft_logits, start, D, L, accept_fn, seed, greedy_draft=False, n=N_DRAWS, cutoff=0.0):
    """-> out [n, L] emitted tokens, first-cycle n_accepted [n]. cutoff > 0: adaptive draft
    length as in SessionBase.draft (a row stops drafting once the product of its drafts' head
    probabilities falls below cutoff; the draft that crossed it is still verified)."""
    g = np.random.default_rng(seed)
    outs, firsts = [], []
    for c0 in range(0, n, CHUNK):
        m = min(CHUNK, n - c0)
        out = np.full((m, L), -1, dtype=np.int64)
        count = np.zeros(m, dtype=np.int64)
        last = np.full(m, start, dtype=np.int64)
        first = None
        while (count < L).any():
            act = np.flatnonzero(count < L)
            prev = last[act]
            drafts, qrows = [], []
            for _ in range(D):
                if greedy_draft:
                    dk = np.argmax(draft_logits[prev], axis=-1)
                else:
                    dk = spec.sample_batch(Q[prev], g.random(len(act)))
                drafts.append(dk)
                qrows.append(Q[prev])
                prev = dk
            drafted = np.stack(drafts, 1) if D else np.zeros((len(act), 0), dtype=np.int64)
            prows = P[np.concatenate([last[act][:, None], drafted], 1)]  # [a, D+1, V]
            q = None if (greedy_draft or D == 0) else np.stack(qrows, 1)
            ua, us = g.random((len(act), D)), g.random(len(act))
            if cutoff > 0 and D > 1:
                head = np.exp(draft_logits - draft_logits.max(-1, keepdims=True))
                head /= head.sum(-1, keepdims=True)
                src = np.concatenate([last[act][:, None], drafted[:, :-1]], 1)  # row each draft came from
                conf = (head if greedy_draft else Q)[src, drafted]  # [a, D]
                d_eff = 1 + (np.cumprod(conf[:, :-1], 1) >= cutoff).sum(1)
                n_acc, nxt = np.zeros(len(act), dtype=np.int64), np.zeros(len(act), dtype=np.int64)
                for de in np.unique(d_eff):
                    r = np.flatnonzero(d_eff == de)
                    a_, n_ = accept_fn(prows[r, :de + 1], drafted[r, :de], None if q is None else q[r, :de],
                                       ua[r, :de], us[r])
                    n_acc[r], nxt[r] = np.asarray(a_), np.asarray(n_)
                    drafted[r, de:] = -1  # never emitted: n_acc <= de
            else:
                n_acc, nxt = accept_fn(prows, drafted, q, ua, us)
            n_acc = np.asarray(n_acc)
            if first is None:
                first = n_acc.copy()
            toks = np.concatenate([drafted, np.zeros((len(act), 1), dtype=np.int64)], 1)
            toks[np.arange(len(act)), n_acc] = nxt
            for j in range(D + 1):
                pos = count[act] + j
                sel = (j <= n_acc) & (pos < L)
                out[act[sel], pos[sel]] = toks[sel, j]
            count[act] += n_acc + 1
            last[act] = nxt
        outs.append(out)
        firsts.append(first)
    return np.concatenate(outs), np.concatenate(firsts)


def distribution_ok(samples, expected, alpha=1e-4):
    """Chi-square (bins with expected count < 5 pooled) and total variation -> (ok, detail)."""
    n = len(samples)
    V = len(expected)
    obs = np.bincount(samples, minlength=V).astype(np.float64)
    exp = expected * n
    if np.any(obs[expected == 0] > 0):
        return False, "token outside the target support"
    big = exp >= 5
    o = np.append(obs[big], obs[~big].sum())
    e = np.append(exp[big], exp[~big].sum())
    if e[-1] == 0:
        o, e = o[:-1], e[:-1]
    pval = sps.chisquare(o, e * o.sum() / e.sum()).pvalue if len(o) > 1 else 1.0
    tv = 0.5 * np.abs(obs / n - expected).sum()
    tv_bound = 1.5 * np.sqrt(expected * (1 - expected) / n).sum() + 1e-3
    return (pval > alpha and tv < tv_bound), f"p={pval:.2e} tv={tv:.4f} (bound {tv_bound:.4f})"


def check_all(P, Q, draft_logits, start, D, L, accept_fn, seed, greedy_draft):
    out, first = simulate(P, Q, draft_logits, start, D, L, accept_fn, seed, greedy_draft)
    fails = []
    m = np.zeros(P.shape[0])
    m[start] = 1.0
    for j in range(L):
        m = m @ P
        ok, detail = distribution_ok(out[:, j], m)
        if not ok:
            fails.append(f"position {j}: {detail}")
    # acceptance: P(first k drafts accepted) = e_start^T M^k 1
    if greedy_draft:
        M = np.zeros_like(P)
        am = np.argmax(draft_logits, axis=-1)
        M[np.arange(len(P)), am] = P[np.arange(len(P)), am]
    else:
        M = np.minimum(P, Q)
    v = np.zeros(P.shape[0])
    v[start] = 1.0
    for k in range(1, D + 1):
        v = v @ M
        a = v.sum()
        rate = (first >= k).mean()
        sigma = np.sqrt(max(a * (1 - a), 1e-12) / len(first))
        if abs(rate - a) > 4 * sigma:
            fails.append(f"depth {k}: acceptance {rate:.4f} vs sum(min(p,q)) {a:.4f} (4 sigma {4 * sigma:.4f})")
    return fails


CONFIGS = [
    # V, D, params, greedy_draft
    (5, 1, SamplingParams(temperature=1.0), False),
    (17, 3, SamplingParams(temperature=0.7, top_k=8), False),
    (24, 3, SamplingParams(temperature=1.3, top_p=0.9), False),
    (20, 2, SamplingParams(temperature=1.0, min_p=0.05), True),
    (12, 4, SamplingParams(temperature=0.6, top_k=6, top_p=0.8), False),
]


@pytest.mark.parametrize("impl", ["numpy", "torch"])
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_acceptance_is_lossless(impl, cfg):
    V, D, params, greedy_draft = CONFIGS[cfg]
    P, Q, dl = make_tables(V, params, seed=100 + cfg)
    fn = numpy_accept if impl == "numpy" else torch_accept
    fails = check_all(P, Q, dl, start=cfg % V, D=D, L=D + 2, accept_fn=fn, seed=7 + cfg, greedy_draft=greedy_draft)
    assert not fails, f"{impl} config {cfg}: " + "; ".join(fails)


@pytest.mark.parametrize("cfg", [2, 3, 4])
def test_adaptive_draft_length_is_lossless(cfg):
    """Stopping a cycle's drafting on the head's own confidence (params.draft_cutoff) keeps the
    output distribution: the stopping rule only looks at drafts already made."""
    V, D, params, greedy_draft = CONFIGS[cfg]
    P, Q, dl = make_tables(V, params, seed=100 + cfg)
    out, _ = simulate(P, Q, dl, cfg % V, D, D + 2, torch_accept, seed=11 + cfg, greedy_draft=greedy_draft,
                      cutoff=0.3)
    m = np.zeros(V)
    m[cfg % V] = 1.0
    for j in range(D + 2):
        m = m @ P
        ok, detail = distribution_ok(out[:, j], m)
        assert ok, f"config {cfg} position {j}: {detail}"


@pytest.mark.parametrize("control", [always_accept, residual_is_p], ids=["always_accept", "residual_is_p"])
@pytest.mark.parametrize("cfg", [0, 1, 3])
def test_negative_controls_fail(control, cfg):
    V, D, params, greedy_draft = CONFIGS[cfg]
    P, Q, dl = make_tables(V, params, seed=100 + cfg)
    fails = check_all(P, Q, dl, start=cfg % V, D=D, L=D + 2, accept_fn=control, seed=7 + cfg, greedy_draft=greedy_draft)
    assert fails, f"negative control {control.__name__} passed the checks: the test has no power"


# ---- exact agreement: scalar spec == batched spec == torch, same uniforms ----------------
def test_spec_forms_and_torch_agree_exactly():
    g = np.random.default_rng(0)
    for trial in range(300):
        V = int(g.integers(2, 40))
        D = int(g.integers(0, 5))
        params = SamplingParams(
            temperature=float(g.uniform(0.3, 2.0)),
            top_k=int(g.choice([0, 3, 10])),
            top_p=float(g.choice([1.0, 0.9, 0.5])),
            min_p=float(g.choice([0.0, 0.1])),
        )
        p = filter_probs(g.normal(0, 2, (D + 1, V)), params)
        one_hot = bool(g.integers(0, 2))
        q = None if one_hot or D == 0 else filter_probs(g.normal(0, 2, (D, V)), params)
        if q is None:
            drafted = [int(x) for x in g.integers(0, V, D)]
        else:
            drafted = [spec.sample_from(q[i], g.random()) for i in range(D)]
        ua, us = g.random(D), float(g.random())
        want = spec.accept_sampled(p, drafted, q, ua, us)
        dr = np.array([drafted], dtype=np.int64).reshape(1, D)
        nb, xb = spec.accept_sampled_batch(p[None], dr, None if q is None else q[None], ua[None], np.array([us]))
        assert (int(nb[0]), int(xb[0])) == want
        nt, xt = torch_accept(p[None], dr, None if q is None else q[None], ua[None], np.array([us]))
        assert (int(nt[0]), int(xt[0])) == want, (trial, want, nt, xt)
        # greedy
        logits = g.normal(0, 1, (D + 1, V))
        gd = [int(np.argmax(logits[i])) if g.random() < 0.7 else int(g.integers(0, V)) for i in range(D)]
        gw = spec.accept_greedy(logits, gd)
        ng, xg = ts.accept_greedy_batch(torch.from_numpy(logits)[None], torch.tensor([gd], dtype=torch.long).reshape(1, D))
        assert (int(ng[0]), int(xg[0])) == gw
        gn, gx = spec.accept_greedy_batch(logits[None], np.array([gd]).reshape(1, D))
        assert (int(gn[0]), int(gx[0])) == gw
        for dt in (torch.float64, torch.float32):  # the one-sequence path (fp32: the kernel's argmax once loaded)
            assert ts.accept(torch.from_numpy(logits).to(dt), gd, None, SamplingParams(temperature=0.0), None) == gw


def test_greedy_rule():
    logits = np.array([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    assert spec.accept_greedy(logits, [1, 0]) == (2, 2)  # all pass -> bonus argmax of last row
    assert spec.accept_greedy(logits, [1, 2]) == (1, 0)  # mismatch at depth 2 -> recover argmax
    assert spec.accept_greedy(logits, [0, 0]) == (0, 1)
    assert spec.accept_greedy(logits[:1], []) == (0, 1)
    tie = np.array([[1.0, 1.0, 0.0]])
    assert spec.accept_greedy(tie, []) == (0, 0)  # ties: first index
    params = SamplingParams(temperature=0.0)
    g = ts.make_generator(0)
    assert ts.accept(torch.tensor(logits), [1, 0], None, params, g) == (2, 2)
    assert ts.accept(torch.tensor(logits), [1, 2], None, params, g) == (1, 0)
    assert ts.accept(torch.tensor(tie), [], None, params, g) == (0, 0)


def test_sample_never_picks_zero_weight():
    w = np.array([0.0, 0.3, 0.0, 0.7, 0.0])
    u = np.array([0.0, 0.2999, 0.3, 0.9999999999, np.nextafter(1.0, 0)])
    got = spec.sample_batch(np.tile(w, (len(u), 1)), u)
    assert set(got.tolist()) <= {1, 3}
    assert [spec.sample_from(w, x) for x in u] == got.tolist()
    gt = ts.sample_batch(torch.tensor(np.tile(w, (len(u), 1))), torch.tensor(u))
    assert gt.tolist() == got.tolist()


def test_torch_accept_seeded_repeats_and_uses_generator():
    g = np.random.default_rng(3)
    logits = torch.tensor(g.normal(0, 1, (4, 50)))
    q = ts.filter_probs(torch.tensor(g.normal(0, 1, (3, 50))), SamplingParams(temperature=0.8))
    params = SamplingParams(temperature=0.8, top_k=20)
    q = ts.filter_probs(torch.tensor(g.normal(0, 1, (3, 50))), params)
    drafted = [int(torch.argmax(q[i])) for i in range(3)]
    a = [ts.accept(logits, drafted, q, params, ts.make_generator(11)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    gen = ts.make_generator(11)
    seq1 = [ts.accept(logits, drafted, q, params, gen) for _ in range(20)]
    gen = ts.make_generator(11)
    seq2 = [ts.accept(logits, drafted, q, params, gen) for _ in range(20)]
    assert seq1 == seq2
    assert len(set(seq1)) > 1  # the generator advances
    with pytest.raises(ValueError, match="target rows"):
        ts.accept(logits[:2], drafted, q, params, gen)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=0.9, min_p=0.1),
        SamplingParams(temperature=0.5, top_k=20, top_p=0.9, min_p=0.02),
        SamplingParams(temperature=2.0, top_k=1),
        SamplingParams(temperature=1.0, top_p=1e-6),
    ],
    ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}",
)
def test_torch_filter_matches_numpy(params):
    g = np.random.default_rng(1)
    logits = g.normal(0, 3, (64, 50))
    logits[:8, :6] = 4.0  # exact ties at the top: top-k / top-p keep every tied token
    want = filter_probs(logits, params)
    got = ts.filter_probs(torch.from_numpy(logits), params).numpy()
    assert np.array_equal(want > 0, got > 0)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(want.sum(-1), 1.0, rtol=1e-12)
    got32 = ts.filter_probs(torch.from_numpy(logits).float(), params)  # model logits path
    assert got32.dtype == torch.float32 and np.array_equal(want > 0, got32.numpy() > 0)
    if params.top_k and params.top_p == 1.0 and params.min_p == 0.0 and not params.greedy:
        assert ((want > 0).sum(-1) >= min(params.top_k, 50)).all()
    # greedy drafting rows: argmax and filtered argmax agree
    assert np.array_equal(np.argmax(want, -1), np.argmax(logits, -1))


def test_top_k_keeps_ties_at_the_kth_value():
    row = np.array([[5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.0], [9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    for params in (SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=1.0, top_k=3, top_p=0.99)):
        want = filter_probs(row, params)
        assert (want[0] > 0).tolist() == [True] * 5 + [False] * 2
        assert (want[1] > 0).sum() == 3
        got = ts.filter_probs(torch.from_numpy(row), params).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
        got_bf16 = ts.filter_probs(torch.from_numpy(row).to(torch.bfloat16), params).numpy()
        assert np.array_equal(got_bf16 > 0, want > 0)
