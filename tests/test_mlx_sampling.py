"""MLX-native filtering / sampling / acceptance against the numpy spec, the statistical
losslessness harness of tests/test_decoding_acceptance.py run on the MLX acceptance, backend
selection, and an end-to-end sampled generation through mtplx.load(..., backend="mlx")."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx.core")  # the suite passes without mlx
pytest.importorskip("mlx_lm")

from test_mlx_common import checkpoint, generate, mlx_model, mx, prompt

from mtplx.backends.mlx import sampling as ms
from mtplx.decoding import acceptance as spec
from mtplx.decoding.filtering import filter_probs as np_filter
from mtplx.decoding.params import SamplingParams


def mlx_accept(p, drafted, q, ua, us):
    n, nxt = ms.accept_sampled_batch(mx.array(p), mx.array(drafted), None if q is None else mx.array(q),
                                     mx.array(ua), mx.array(us))
    return np.array(n), np.array(nxt)


def test_accept_cores_equal_numpy_spec_exactly():
    g = np.random.default_rng(0)
    for trial in range(30):
        N, D, V = 64, int(g.integers(0, 5)), int(g.integers(2, 30))
        p = g.dirichlet(np.full(V, 0.3), (N, D + 1))
        p[g.random((N, D + 1, V)) < 0.3] = 0.0  # zero-weight tokens (filtered out)
        p[..., 0] += 1e-3
        p /= p.sum(-1, keepdims=True)
        drafted = g.integers(0, V, (N, D))
        q = None if trial % 3 == 0 else g.dirichlet(np.ones(V), (N, D))
        ua, us = g.random((N, D)), g.random(N)
        n_ref, x_ref = spec.accept_sampled_batch(p, drafted, q, ua, us)
        n, x = mlx_accept(p, drafted, q, ua, us)
        assert np.array_equal(n, n_ref) and np.array_equal(x, x_ref), f"trial {trial}"
        logits = g.normal(size=(N, D + 1, V))
        logits[:, :, 1] = logits[:, :, 0]  # ties: the first index wins in both
        nr, xr = spec.accept_greedy_batch(logits, drafted)
        ng, xg = ms.accept_greedy_batch(mx.array(logits.astype(np.float32)), mx.array(drafted))
        assert np.array_equal(np.array(ng), nr) and np.array_equal(np.array(xg), xr)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=5),
                                    SamplingParams(temperature=0.8, top_p=0.7), SamplingParams(temperature=1.2, min_p=0.1),
                                    SamplingParams(temperature=0.6, top_k=8, top_p=0.9, min_p=0.02), SamplingParams()])
def test_filter_probs_matches_numpy_spec(params):
    logits = np.random.default_rng(1).normal(0, 2, (6, 50)).astype(np.float32)
    got = np.array(ms.filter_probs(mx.array(logits), params))
    ref = np_filter(logits, params)
    assert np.array_equal(got > 0, ref > 0)  # the same kept sets
    assert np.abs(got - ref).max() < 1e-6


STAT_CONFIGS = [  # V, D, params, greedy_draft (as in test_decoding_acceptance, fewer)
    (17, 3, SamplingParams(temperature=0.7, top_k=8), False),
    (33, 2, SamplingParams(temperature=1.0, min_p=0.05), True),
]


@pytest.mark.parametrize("cfg", range(len(STAT_CONFIGS)))
def test_mlx_acceptance_is_lossless(cfg):
    pytest.importorskip("scipy")
    pytest.importorskip("torch")
    from test_decoding_acceptance import check_all, make_tables

    V, D, params, greedy_draft = STAT_CONFIGS[cfg]
    P, Q, draft_logits = make_tables(V, params, seed=cfg)
    fails = check_all(P, Q, draft_logits, start=0, D=D, L=D + 3, accept_fn=mlx_accept, seed=100 + cfg,
                      greedy_draft=greedy_draft)
    assert not fails, fails


def test_seeded_sampled_generation_repeats_and_is_valid():
    m = mlx_model("dense")
    params = SamplingParams(temperature=8.0, top_k=40)  # the tied toy model is very peaked
    p = prompt(5, seed=30)
    a = generate(m, p, 2, 10, params=params, seed=7)[0]
    b = generate(m, p, 2, 10, params=params, seed=7)[0]
    c = generate(m, p, 2, 10, params=params, seed=8)[0]
    assert a == b, "same seed, different tokens"
    assert a != c, "another seed, the same tokens"
    assert all(0 <= t < m.cfg.vocab_size for t in a)


def test_backend_selection(monkeypatch):
    import mtplx
    import mtplx.backends as bk

    assert bk.is_available("mlx") and "mlx" in bk.available_backends()
    monkeypatch.setattr(bk, "is_apple_silicon", lambda: True)
    assert bk.default_backend() == "mlx" and mtplx.api.default_backend() == "mlx"
    monkeypatch.setattr(bk, "is_apple_silicon", lambda: False)
    assert bk.default_backend() == "torch"
    monkeypatch.setitem(bk._NEEDS, "mlx", ("mlx", "no_such_module_mtplx"))
    with pytest.raises(bk.BackendUnavailable, match=r"pip install 'mtplx\[mlx\]'"):
        mtplx.load(checkpoint("dense").path, backend="mlx")
    with pytest.raises(ValueError, match="backend must be one of"):
        bk.require_backend("jax")


def test_api_generate_on_mlx():
    import mtplx

    model = mtplx.load(checkpoint("dense").path, backend="mlx")
    assert model.backend == "mlx" and model.has_mtp and model.dtype == "float32"
    ids = prompt(5, seed=40)
    r0 = mtplx.generate(model, ids, SamplingParams(max_tokens=8, ignore_eos=True), depth=0)
    r3 = mtplx.generate(model, ids, SamplingParams(max_tokens=8, ignore_eos=True), depth=3)
    assert r0.token_ids == r3.token_ids and len(r0.token_ids) == 8
