"""Loop mechanics on a tiny deterministic numpy session (a bigram table "model").

The real-backend promises (greedy parity, end-to-end distribution) are tested on the torch
backend in tests/test_generate_torch.py; here: stop rules, max_tokens inside an accepted run,
EOS, context limits, errors, seeded repeats, stats bookkeeping, the streaming text contract.
"""

from __future__ import annotations

import numpy as np
import pytest

from mtplx.decoding import acceptance as spec
from mtplx.decoding.filtering import filter_probs
from mtplx.decoding.loop import generate_steps
from mtplx.decoding.params import SamplingParams
from mtplx.decoding.stats import GenerationStats
from mtplx.decoding.stops import StopStrings


class BigramSession:
    """Target logits T[prev], draft logits Q[prev]; acceptance through the numpy spec."""

    def __init__(self, T, Q, max_context=None, oracle=False):
        self.T, self.Q = np.asarray(T, float), np.asarray(Q, float)
        self.max_context = max_context
        self.oracle = oracle  # draft the target's own argmax chain (greedy acceptance ~1)
        self.tokens: list[int] = []
        self.last = None
        self.calls: list[str] = []

    def make_rng(self, seed):
        return np.random.default_rng(seed)

    def prefill(self, ids):
        self.calls.append("prefill")
        self.tokens = list(ids)

    def sample_first(self, params, rng):
        row = self.T[self.tokens[-1]]
        self.last = self._sample(row, params, rng)
        return self.last

    def _sample(self, logits, params, rng):
        if params.greedy:
            return int(np.argmax(logits))
        return spec.sample_from(filter_probs(logits, params), rng.random())

    def draft(self, depth, params, rng):
        self.calls.append(f"draft{depth}")
        out, qs, prev = [], [], self.last
        for _ in range(depth):
            lg = self.T[prev] if self.oracle else self.Q[prev]
            if params.greedy or params.greedy_draft:
                d, q = int(np.argmax(lg)), None
            else:
                q = filter_probs(lg, params)
                d = spec.sample_from(q, rng.random())
            out.append(d)
            qs.append(q)
            prev = d
        return out, (None if qs[0] is None else np.stack(qs))

    def verify(self, drafted):
        self.calls.append(f"verify{len(drafted)}")
        if self.max_context is not None:
            assert len(self.tokens) + len(drafted) + 1 <= self.max_context, "fed past the context"
        return self.T[[self.last, *drafted]]

    def accept(self, rows, drafted, q, params, rng):
        if params.greedy:
            return spec.accept_greedy(rows, drafted)
        p = filter_probs(rows, params)
        return spec.accept_sampled(p, drafted, q, rng.random(len(drafted)), rng.random())

    def commit(self, n, next_id):
        self.calls.append(f"commit{n}")
        self.tokens += [self.last] + self._drafted_kept(n)
        self.last = next_id

    def _drafted_kept(self, n):
        return []  # token history beyond `last` is not needed by a bigram model


def table(V=12, seed=0, scale=3.0):
    return np.random.default_rng(seed).normal(0, scale, (V, V))


def chain_table(V=12):
    """Target: token i -> i+1 (mod V) with a clear margin; draft: same table (all accepted)."""
    T = np.full((V, V), -5.0)
    T[np.arange(V), (np.arange(V) + 1) % V] = 5.0
    return T


def run(session, prompt, params, depth, **kw):
    return list(generate_steps(session, prompt, params, depth, **kw))


class CharDetok:
    """token i -> a fixed string; multi-char tokens let stop strings span tokens."""

    def __init__(self, pieces):
        self.pieces = pieces

    def add(self, t):
        return self.pieces[t]

    def flush(self):
        return ""


# ---- greedy parity and seeded repeats on the toy model ----------------------------------
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_greedy_toy_parity(depth):
    T, Q = table(seed=1), table(seed=2)
    ref = [s.token_id for s in run(BigramSession(T, Q), [3], SamplingParams(max_tokens=60), 0)]
    for oracle in (False, True):
        got = run(BigramSession(T, Q, oracle=oracle), [3], SamplingParams(max_tokens=60), depth)
        assert [s.token_id for s in got] == ref
        st = got[-1].stats
        assert st.generation_tokens == 60 and len(st.drafted) == depth
        if oracle:
            assert st.acceptance[0] > 0.9 and any(s.from_draft for s in got)


def test_seeded_runs_repeat_and_seeds_differ():
    T, Q = table(seed=1, scale=1.0), table(seed=2, scale=1.0)
    p = SamplingParams(temperature=1.0, top_k=8, seed=123, max_tokens=50)
    a = [s.token_id for s in run(BigramSession(T, Q), [0], p, 3)]
    b = [s.token_id for s in run(BigramSession(T, Q), [0], p, 3)]
    c = [s.token_id for s in run(BigramSession(T, Q), [0], SamplingParams(temperature=1.0, top_k=8, seed=124, max_tokens=50), 3)]
    assert a == b and a != c


# ---- max_tokens, EOS, stop ids inside an accepted run ------------------------------------
@pytest.mark.parametrize("depth", [0, 1, 3, 4])
@pytest.mark.parametrize("max_tokens", [1, 2, 5, 7])
def test_max_tokens_exact(depth, max_tokens):
    T = chain_table()
    s = BigramSession(T, T, oracle=True)
    steps = run(s, [0], SamplingParams(max_tokens=max_tokens), depth)
    assert [x.token_id for x in steps] == [(i + 1) % 12 for i in range(max_tokens)]
    assert steps[-1].finish_reason == "length" and all(x.finish_reason is None for x in steps[:-1])
    # the depth shrinks near the end: no cycle decides tokens that could not be emitted
    drafts = [int(c[5:]) for c in s.calls if c.startswith("draft")]
    assert sum(drafts) + len(drafts) + 1 <= max_tokens + 1


def test_max_tokens_inside_accepted_run_without_depth_clamp():
    """A session that drafts more than asked (a misbehaving backend) still never over-emits."""
    T = chain_table()

    class Greedy(BigramSession):
        def draft(self, depth, params, rng):
            return super().draft(4, params, rng)

    steps = run(Greedy(T, T, oracle=True), [0], SamplingParams(max_tokens=3), 1)
    assert [x.token_id for x in steps] == [1, 2, 3] and steps[-1].finish_reason == "length"


@pytest.mark.parametrize("depth", [0, 2, 4])
def test_stop_id_and_eos_inside_run(depth):
    T = chain_table()
    # EOS = 5: tokens 1, 2, 3, 4, 5 then stop; 5 is the last step, its text is not emitted
    steps = run(BigramSession(T, T, oracle=True), [0], SamplingParams(max_tokens=50), depth,
                eos_token_ids=[5], detokenizer=CharDetok([f"<{i}>" for i in range(12)]))
    assert [x.token_id for x in steps] == [1, 2, 3, 4, 5]
    assert steps[-1].finish_reason == "stop" and steps[-1].stop == 5 and steps[-1].text == ""
    assert "".join(x.text for x in steps) == "<1><2><3><4>"
    # ignore_eos runs through EOS; stop_token_ids stop even so
    steps = run(BigramSession(T, T, oracle=True), [0], SamplingParams(max_tokens=8, ignore_eos=True), depth, eos_token_ids=[5])
    assert len(steps) == 8 and steps[-1].finish_reason == "length"
    steps = run(BigramSession(T, T, oracle=True), [0],
                SamplingParams(max_tokens=50, ignore_eos=True, stop_token_ids=[3]), depth, eos_token_ids=[5])
    assert [x.token_id for x in steps] == [1, 2, 3] and steps[-1].stop == 3


def test_first_token_can_stop():
    T = chain_table()
    steps = run(BigramSession(T, T), [0], SamplingParams(max_tokens=10), 3, eos_token_ids=[1])
    assert [x.token_id for x in steps] == [1] and steps[-1].finish_reason == "stop"


# ---- stop strings ---------------------------------------------------------------------------
PIECES = ["a", "b", "c", "d", "e", "f", "gh", "ij", "kl", "mn", "op", "qr"]


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize(
    "stop,text,last",
    [
        (["c"], "ab", 3),  # one token
        (["cd"], "ab", 4),  # spans two tokens
        (["hij"], "abcdefg", 8),  # starts inside a token, spans two
        (["fghi"], "abcde", 8),  # spans three tokens
        (["zz", "de"], "abc", 5),  # the first of several that matches
        (["ijk", "hi"], "abcdefg", 8),  # earliest match wins
        (["nomatch"], None, 12),  # held prefixes are released at the end ("n" of "mn")
    ],
)
def test_stop_strings_span_tokens(depth, stop, text, last):
    T = chain_table()  # 0 -> 1 -> ... ; token i prints PIECES[i]
    steps = run(BigramSession(T, T, oracle=True), [11], SamplingParams(max_tokens=12, stop=stop), depth,
                detokenizer=CharDetok(PIECES))
    out = "".join(x.text for x in steps)
    if text is None:
        assert out == "".join(PIECES) and steps[-1].finish_reason == "length"
    else:
        assert out == text
        assert steps[-1].finish_reason == "stop" and steps[-1].stop in stop
        assert len(steps) == last  # nothing emitted past the token that completed the stop string


def test_stop_strings_unit():
    s = StopStrings(["abc"])
    assert s.feed("xa") == ("x", False)
    assert s.feed("b") == ("", False)
    assert s.feed("d") == ("abd", False)
    assert s.feed("zab") == ("z", False)
    assert s.feed("c!") == ("", True) and s.matched == "abc"
    s = StopStrings(["aab"])
    assert s.feed("aaa") == ("a", False)  # "aa" may still start "aab"
    assert s.feed("b") == ("", True)  # released in all: "a", then the stop "aab"
    s = StopStrings([])
    assert s.feed("anything") == ("anything", False)


def test_stop_string_needs_detokenizer():
    T = chain_table()
    with pytest.raises(ValueError, match="detokenizer"):
        run(BigramSession(T, T), [0], SamplingParams(stop=["x"]), 1)


# ---- prompt and context errors ------------------------------------------------------------
def test_empty_prompt_clear_error():
    T = chain_table()
    with pytest.raises(ValueError, match="empty prompt"):
        run(BigramSession(T, T), [], SamplingParams(), 2)


def test_prompt_longer_than_context_clear_error():
    T = chain_table()
    with pytest.raises(ValueError, match=r"prompt is 20 tokens .* context holds 16"):
        run(BigramSession(T, T, max_context=16), list(range(12)) + list(range(8)), SamplingParams(), 2)
    with pytest.raises(ValueError, match="no room"):
        run(BigramSession(T, T, max_context=16), [0] * 16, SamplingParams(), 2)


@pytest.mark.parametrize("depth", [0, 3])
def test_generation_stops_at_context_limit(depth):
    T = chain_table()
    s = BigramSession(T, T, max_context=10, oracle=True)
    steps = run(s, [0, 0, 0, 0], SamplingParams(max_tokens=100), depth)
    assert len(steps) == 6 and steps[-1].finish_reason == "length"  # 4 prompt + 6 = 10 positions


def test_bad_params_and_depth():
    T = chain_table()
    with pytest.raises(ValueError, match="top_p"):
        run(BigramSession(T, T), [0], SamplingParams(top_p=0.0), 1)
    with pytest.raises(ValueError, match="depth"):
        run(BigramSession(T, T), [0], SamplingParams(), -1)


# ---- stats ------------------------------------------------------------------------------------
def test_stats_bookkeeping():
    T, Q = table(seed=3), table(seed=4)
    T2 = T.copy()
    Q2 = 0.5 * T2 + 0.5 * Q  # partial agreement: a mix of accepts and rejections
    steps = run(BigramSession(T2, Q2), [1], SamplingParams(max_tokens=80, temperature=1.0, seed=5), 3)
    st = steps[-1].stats
    assert st.generation_tokens == 80 == len(steps)
    assert st.verify_passes == st.recovered + st.bonus
    assert all(a <= d for a, d in zip(st.accepted, st.drafted))
    assert st.accepted[0] >= st.accepted[1] >= st.accepted[2]
    n_draft = sum(s.from_draft for s in steps)
    assert n_draft <= sum(st.accepted)  # accepted drafts past the end are not emitted
    assert 1.0 <= st.tokens_per_verify <= 4.0
    assert st.prompt_tokens == 1 and st.peak_memory_bytes > 0
    d = st.to_dict()
    assert d["acceptance"] == st.acceptance and d["tokens_per_verify"] == st.tokens_per_verify
    lines = st.format_lines()
    assert lines[0].startswith("Prompt: 1 tokens")
    assert lines[3].startswith("MTP: depth 3, acceptance ") and lines[3].endswith("tokens per verify")


def test_stats_format_mtp_line():
    # tokens per verify counts every token a verify decides: 1 (recovered or bonus) + accepted
    st = GenerationStats(depth=3, drafted=[100, 100, 100], accepted=[86, 70, 57], verify_passes=100)
    assert "MTP: depth 3, acceptance 0.86/0.70/0.57, 3.13 tokens per verify" in st.format_lines()
