"""The serving features on the MLX backend (tiny models): the prefix cache (cache on == off, disk tier), the
batch runner, penalties and logprobs - each exact against its own reference."""

from __future__ import annotations

import random

import pytest

from test_mlx_common import mlx_model  # noqa: E402  (skips without mlx)

from mtplx.backends.mlx.session import payload_nbytes  # noqa: E402
from mtplx.decoding.loop import generate_steps  # noqa: E402
from mtplx.decoding.params import SamplingParams  # noqa: E402
from mtplx.prefix import PrefixCache  # noqa: E402


def _run(model, prompt, params, depth, cache, block):
    s = model.new_session(prefix_cache=cache, prefill_block=block)
    return [st.token_id for st in generate_steps(s, prompt, params, depth, rng=s.make_rng(params.seed))], s


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_mlx_cache_on_equals_cache_off(kind):
    m = mlx_model(kind)
    V, block = m.cfg.vocab_size, 8
    r = random.Random(0)
    base = [r.randrange(V) for _ in range(3 * block + 3)]
    prompts = [base, base[:2 * block + 2] + [r.randrange(V) for _ in range(5)], base + [r.randrange(V) for _ in range(9)]]
    for depth, params in ((0, SamplingParams(max_tokens=6)), (2, SamplingParams(max_tokens=6)),
                          (2, SamplingParams(max_tokens=6, temperature=0.9, seed=3))):
        cache = PrefixCache(max_bytes=1 << 28, block_size=block, nbytes=payload_nbytes)
        for i, p in enumerate(prompts):
            off, _ = _run(m, p, params, depth, None, block)
            on, s = _run(m, p, params, depth, cache, block)
            assert on == off, (kind, depth, i)
            assert s.cached_tokens == [0, 2 * block, 3 * block][i]


def test_mlx_disk_tier_round_trip(tmp_path):
    import mtplx
    from test_mlx_common import checkpoint

    model = mtplx.load(checkpoint("moe").path, backend="mlx", dtype="float32")
    ids = list(range(5, 60))
    params = SamplingParams(max_tokens=6)
    ref, _ = _run(model.model, ids, params, 2, None, 8)
    cache = model.enable_prefix_cache(gb=0.1, block=8, cache_dir=tmp_path / "pc")
    assert _run(model.model, ids, params, 2, cache, 8)[0] == ref
    cache.close()
    restarted = model.enable_prefix_cache(gb=0.1, block=8, cache_dir=tmp_path / "pc")
    toks, s = _run(model.model, ids, params, 2, restarted, 8)
    assert toks == ref and s.cached_tokens == 48 and restarted.counters.disk_hit_tokens == 48


def test_mlx_batch_runner_equals_alone():
    """MLX sessions in the batch runner (each verifies on its own: MLX has no step_many yet)."""
    from mtplx.decoding.batch import BatchRunner
    from mtplx.decoding.loop import Generation

    m = mlx_model("moe")
    reqs = [([3, 5, 7, 9, 11][: 2 + i], SamplingParams(max_tokens=6, temperature=0.8 * (i % 2), seed=i), i % 3)
            for i in range(4)]
    alone = [_run(m, p, params, d, None, 8)[0] for p, params, d in reqs]
    runner = BatchRunner(max_batch=4)
    for i, (p, params, d) in enumerate(reqs):
        runner.add(i, Generation(m.new_session(), p, params, d))
    out = {i: [] for i in range(4)}
    while len(runner):
        for k, st in runner.step():
            out[k].append(st.token_id)
    assert [out[i] for i in range(4)] == alone


def test_mlx_penalties_and_logprobs_greedy_mtp_equals_depth0():
    m = mlx_model("moe")
    p = SamplingParams(max_tokens=10, presence_penalty=0.6, repetition_penalty=1.3, logprobs=2)
    from mtplx.decoding.loop import generate_steps

    runs = []
    for depth in (0, 2):
        s = m.new_session()
        runs.append([(st.token_id, st.logprob, st.top_logprobs) for st in generate_steps(s, [3, 5, 7, 3], p, depth)])
    assert runs[0] == runs[1] and all(lp <= 0 for _, lp, _ in runs[0])
