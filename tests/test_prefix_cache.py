"""The prefix cache: the store itself, and cache on == cache off token for token.

Exactness across block sizes and prompt shapes (a prefix ending inside a block, on a block edge,
a prompt that is a whole number of blocks, an exact repeat, a longer turn), depths 0..3, greedy
and seeded sampling, dense and MoE, fp32 and bf16, with eviction forced mid-run; the disk tier's
round trip, its refusal of another model's folder, and a corrupt block file skipped.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

from mtplx.decoding.loop import generate_steps
from mtplx.decoding.params import SamplingParams
from mtplx.prefix import ForeignCacheError, PrefixCache, chain_keys, make_prefix_cache
from test_torch_common import fused_available, our_model

torch.set_num_threads(1)

GREEDY = SamplingParams(max_tokens=12)
SAMPLED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=7)


# ---- the store ----------------------------------------------------------------------------


def _fill(cache: PrefixCache, ids: list[int], nbytes: int = 10) -> list[bytes]:
    keys = cache.chain(ids)
    for k, key in enumerate(keys):
        B = cache.block_size
        cache.store(key, keys[k - 1] if k else None, ids[k * B:(k + 1) * B], {"n": nbytes})
    return keys


def _cache(max_bytes=1000, block=4, **kw) -> PrefixCache:
    return PrefixCache(max_bytes=max_bytes, block_size=block, nbytes=lambda p: p["n"], **kw)


def test_chain_keys_depend_on_the_whole_prefix():
    a = chain_keys(list(range(12)), 4)
    b = chain_keys([99] + list(range(1, 12)), 4)
    assert len(a) == 3 and a[0] != b[0] and a[1] != b[1] and a[2] != b[2]
    assert chain_keys(list(range(12)) + [5, 6], 4) == a  # a partial last block has no key


def test_match_stops_at_divergence_and_always_leaves_a_token():
    c = _cache()
    ids = list(range(16))
    _fill(c, ids)
    assert len(c) == 4
    assert len(c.match(ids, c.chain(ids))) == 3  # 16 tokens: the 4th block would leave nothing to feed
    other = ids[:9] + [77] + ids[10:]
    assert len(c.match(other, c.chain(other))) == 2  # diverges inside block 2
    assert c.counters.hit_tokens == 12 + 8


def test_eviction_is_lru_by_bytes_and_leaves_first():
    c = _cache(max_bytes=50)  # 5 blocks of 10 bytes
    a = list(range(100, 116))  # 4 blocks
    _fill(c, a)
    b = list(range(100, 108)) + list(range(200, 208))  # shares 2 blocks with a, adds 2
    _fill(c, b)
    assert c.bytes <= 50 and len(c) == 5
    # a's leaf was the oldest leaf: evicted; the shared root blocks stay
    keys_a = c.chain(a)
    assert keys_a[0] in c and keys_a[1] in c and keys_a[3] not in c
    assert c.counters.evicted_tokens == 4 and c.counters.evicted_bytes == 10
    # a block whose parent is gone is never stored (it could not be reached)
    assert not c.store(b"x" * 16, b"gone" * 4, [1, 2, 3, 4], {"n": 1})


def test_budget_zero_and_oversized_blocks():
    c = _cache(max_bytes=5)
    assert not c.store(c.chain([1, 2, 3, 4])[0], None, [1, 2, 3, 4], {"n": 10})
    assert len(c) == 0 and not PrefixCache(max_bytes=0).enabled
    with pytest.raises(ValueError, match="block"):
        PrefixCache(max_bytes=1, block_size=0)


def test_ttl_drops_unused_blocks():
    now = [0.0]
    c = _cache(ttl_s=10, clock=lambda: now[0])
    ids = list(range(9))
    _fill(c, ids)
    now[0] = 5
    assert len(c.match(ids, c.chain(ids))) == 2
    now[0] = 16
    assert c.match(ids, c.chain(ids)) == [] and len(c) == 0 and c.counters.expired_tokens == 8


# ---- exactness on the torch backend --------------------------------------------------------


def _run(model, prompt, params, depth, cache, block):
    s = model.new_session(prefix_cache=cache, prefill_block=block)
    steps = list(generate_steps(s, prompt, params, depth, rng=s.make_rng(params.seed)))
    return [st.token_id for st in steps], s


def _prompts(V: int, block: int, seed: int = 0) -> list[list[int]]:
    """A conversation-like sequence of prompts: each shares a prefix with earlier ones."""
    r = random.Random(block * 1000 + seed)
    base = [r.randrange(V) for _ in range(5 * block + block // 2 + 1)]
    return [
        base,
        base[:3 * block + block // 3] + [r.randrange(V) for _ in range(block)],  # diverges inside block 3
        base + [r.randrange(V) for _ in range(2 * block + 3)],  # the next turn
        base,  # an exact repeat
        base[:4 * block],  # a whole number of blocks, all cached
        base[:4 * block + 1],  # one past a block edge
    ]


@pytest.mark.parametrize("kind,dtype,kernel", [
    ("dense", torch.float32, "torch"), ("moe", torch.float32, "torch"), ("moe", torch.bfloat16, "torch"),
    ("next", torch.float32, "torch"), ("moe", torch.float32, "fused"), ("next", torch.bfloat16, "fused")])
def test_cache_on_equals_cache_off(kind, dtype, kernel):
    if kernel == "fused" and not fused_available():
        pytest.skip("no compiled step kernel on this CPU / without a compiler")
    m = our_model(kind, dtype, kernel=kernel)
    V = m.cfg.vocab_size
    for block in (7, 32):
        prompts = _prompts(V, block)
        for depth, params in ((0, GREEDY), (3, GREEDY), (2, SAMPLED)):
            cache = PrefixCache(max_bytes=1 << 30, block_size=block, nbytes=_nbytes)
            for i, p in enumerate(prompts):
                off, _ = _run(m, p, params, depth, None, block)
                on, s = _run(m, p, params, depth, cache, block)
                assert on == off, (kind, dtype, block, depth, i)
                if i == 0:
                    assert s.cached_tokens == 0 and s.stored_tokens == (len(p) // block) * block
            # every later prompt found its shared blocks
            assert cache.counters.hit_tokens > 0


def test_cache_on_equals_off_with_eviction_mid_run():
    m = our_model("moe", torch.float32)
    block = 8
    prompts = _prompts(m.cfg.vocab_size, block)
    probe = PrefixCache(max_bytes=1 << 30, block_size=block, nbytes=_nbytes)
    _run(m, prompts[0], GREEDY, 0, probe, block)
    per_block = probe.bytes // len(probe)
    cache = PrefixCache(max_bytes=7 * per_block + 1, block_size=block, nbytes=_nbytes)
    other = _prompts(m.cfg.vocab_size, block, seed=1)  # a second conversation competes for the room
    for p in [q for pair in zip(prompts, other) for q in pair]:
        assert _run(m, p, SAMPLED, 2, cache, block)[0] == _run(m, p, SAMPLED, 2, None, block)[0]
        assert cache.bytes <= cache.max_bytes
    assert cache.counters.evicted_tokens > 0 and cache.counters.hit_tokens > 0


def test_sessions_sharing_blocks_do_not_disturb_each_other():
    """Interleaved sessions that restored the same blocks: each equals its solo run."""
    m = our_model("dense", torch.float32)
    block = 8
    r = random.Random(3)
    shared = [r.randrange(m.cfg.vocab_size) for _ in range(40)]
    prompts = [shared + [r.randrange(m.cfg.vocab_size) for _ in range(5 + i)] for i in range(3)]
    solo = [_run(m, p, GREEDY, 2, None, block)[0] for p in prompts]
    cache = PrefixCache(max_bytes=1 << 30, block_size=block, nbytes=_nbytes)
    _run(m, shared + [1], GREEDY, 0, cache, block)
    gens = []
    for p in prompts:
        s = m.new_session(prefix_cache=cache, prefill_block=block)
        gens.append(generate_steps(s, p, GREEDY, 2, rng=s.make_rng(None)))
    outs = [[] for _ in prompts]
    live = set(range(len(prompts)))
    while live:
        for i in sorted(live):
            try:
                outs[i].append(next(gens[i]).token_id)
            except StopIteration:
                live.discard(i)
    assert outs == solo


def test_session_block_must_match_the_cache():
    m = our_model("dense", torch.float32)
    with pytest.raises(ValueError, match="block"):
        m.new_session(prefix_cache=PrefixCache(max_bytes=1 << 20, block_size=16, nbytes=_nbytes), prefill_block=8)


def test_sessions_of_one_cache_share_the_head_hidden_source():
    m = our_model("dense", torch.float32)
    cache = PrefixCache(max_bytes=1 << 20, block_size=8, nbytes=_nbytes)
    m.new_session(prefix_cache=cache, hidden_source="post")
    with pytest.raises(ValueError, match="hidden_source"):
        m.new_session(prefix_cache=cache, hidden_source="pre")


def _nbytes(payload):
    from mtplx.backends.torch.session import payload_nbytes

    return payload_nbytes(payload)


# ---- through the Python API, and the disk tier ----------------------------------------------


@pytest.fixture(scope="module")
def api_model():
    import mtplx
    from mtplx.checkpoint.synthetic import write_synthetic_checkpoint
    import tempfile
    from pathlib import Path

    ck = write_synthetic_checkpoint(Path(tempfile.mkdtemp()) / "m", "qwen3.5-35b-a3b", seed=1)
    return mtplx.load(ck.path, backend="torch", dtype="float32")


def _api_run(model, ids):
    import mtplx

    r = list(mtplx.stream_generate(model, ids, GREEDY, 2))
    return [x.token for x in r], r[-1].stats


def test_api_stats_and_stats_line(api_model):
    model = api_model
    model.enable_prefix_cache(gb=0.5, block=16)
    try:
        ids = list(range(3, 90))
        off, _ = _api_run_off(model, ids)
        first, s1 = _api_run(model, ids)
        again, s2 = _api_run(model, ids + [5, 6, 7])
        assert first == off and s1.cached_tokens == 0 and s1.cache_write_tokens == 80
        assert s2.cached_tokens == 80 and s2.prefilled_tokens == 10
        assert "80 from the prefix cache, 10 prefilled" in s2.format_lines()[0]
        assert s2.to_dict()["cached_tokens"] == 80
    finally:
        model.prefix_cache = None


def _api_run_off(model, ids):
    import mtplx

    s = model.new_session(prefix_cache=None, prefill_block=16)
    r = list(mtplx.stream_generate(model, ids, GREEDY, 2, session=s))
    return [x.token for x in r], r[-1].stats


def test_disk_tier_round_trip_foreign_and_corrupt(api_model, tmp_path, caplog):
    model = api_model
    ids = list(range(10, 110))
    ref, _ = _api_run_off(model, ids)
    c1 = model.enable_prefix_cache(gb=0.5, block=16, cache_dir=tmp_path / "pc")
    try:
        assert _api_run(model, ids)[0] == ref
        c1.disk.flush()
        files = sorted((tmp_path / "pc" / "blocks").glob("*.safetensors"))
        assert len(files) == 6 and (tmp_path / "pc" / "manifest.json").is_file()
        # a restart: an empty RAM tier over the same folder
        c2 = model.enable_prefix_cache(gb=0.5, block=16, cache_dir=tmp_path / "pc")
        toks, st = _api_run(model, ids)
        assert toks == ref and st.cached_tokens == 96 and c2.counters.disk_hit_tokens == 96
        # a corrupt (truncated) block: skipped with a warning, removed, the output unchanged
        model.enable_prefix_cache(gb=0.5, block=16, cache_dir=tmp_path / "pc")
        victim = (tmp_path / "pc" / "blocks" / f"{chain_keys(ids, 16)[2].hex()}.safetensors")
        victim.write_bytes(victim.read_bytes()[:100])
        with caplog.at_level(logging.WARNING, logger="mtplx.prefix"):
            toks, st = _api_run(model, ids)
        assert toks == ref and st.cached_tokens == 32
        assert any("skipping" in r.message for r in caplog.records)
        model.prefix_cache.disk.flush()  # recomputed, so written again, whole
        assert victim.stat().st_size > 1000
        # another block size (or model, dtype, threads...) is another computation: refused
        with pytest.raises(ForeignCacheError, match="another model or setup.*block"):
            make_prefix_cache(model, gb=0.5, block=32, cache_dir=tmp_path / "pc")
    finally:
        model.prefix_cache = None


def test_prefill_on_more_threads_keeps_cache_on_equal_to_off():
    """Prefill blocks may run on more threads than decode (loader.apply_default_threads); a full
    block always does and a tail never does, so cache on == off still holds."""
    m = our_model("moe", torch.float32)
    block = 8
    prompts = _prompts(m.cfg.vocab_size, block, seed=4)
    seen = []  # (block length, threads) of every prefill forward
    original = type(m).prefill

    def spy(self, ids, cache):
        seen.append((ids.shape[0], torch.get_num_threads()))
        return original(self, ids, cache)

    m.prefill_threads = 2
    type(m).prefill = spy
    try:
        cache = PrefixCache(max_bytes=1 << 30, block_size=block, nbytes=_nbytes)
        for p in prompts:
            off, _ = _run(m, p, SAMPLED, 2, None, block)
            on, s = _run(m, p, SAMPLED, 2, cache, block)
            assert on == off
            assert torch.get_num_threads() == 1  # decode's count is back after the prefill
        assert cache.counters.hit_tokens > 0
        # a full block always runs on 2 threads and a tail on 1, restored prefix or not
        assert {(n == block, t) for n, t in seen} <= {(True, 2), (False, 1)} and (False, 1) in {(n == block, t) for n, t in seen}
    finally:
        type(m).prefill = original
        m.prefill_threads = None
