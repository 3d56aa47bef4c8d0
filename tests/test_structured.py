"""Logprobs, penalties and structured output under MTP.

- logprobs: raw, the same bits at depth 0 and depth 3; tokens join to the text; values <= 0; top
  lists sorted, holding the chosen token where it ranks;
- penalties and JSON-schema grammars: greedy MTP == depth 0 at depths 1..4, dense and MoE; the
  output parses and validates (or ends with `length`);
- sampled: the numpy spec with penalties and a prefix-dependent mask at the drafted prefix keeps
  the processed target distribution (chi-square on the first tokens' joint law); processing every
  row at the cycle's first prefix instead (the negative control) is caught;
- the server: logprobs in chat (stream and not) and completions (echo), response_format, 400s.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from mtplx.decoding import acceptance as spec
from mtplx.decoding.filtering import softmax
from mtplx.decoding.loop import generate_steps
from mtplx.decoding.params import SamplingParams
from test_torch_common import our_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def default():
    import mtplx

    return mtplx.load(None, backend="torch")


def _run(model, prompt, params, depth, **kw):
    s = model.new_session()
    return list(generate_steps(s, prompt, params, depth, **kw))


# ---- logprobs ------------------------------------------------------------------------------


def test_logprobs_identical_across_depths_and_well_formed(default):
    ids = default.tokenizer.encode("import json\n\ndef load(path):\n")
    params = SamplingParams(max_tokens=40, logprobs=5)
    kw = dict(eos_token_ids=default.eos_token_ids)
    d0 = _run(default.model, ids, params, 0, detokenizer=default.tokenizer.detokenizer(), **kw)
    d3 = _run(default.model, ids, params, 3, detokenizer=default.tokenizer.detokenizer(), **kw)
    assert [(s.token_id, s.logprob, s.top_logprobs) for s in d0] == [(s.token_id, s.logprob, s.top_logprobs) for s in d3]
    assert "".join(s.text for s in d0) == default.tokenizer.decode([s.token_id for s in d0])
    for s in d0:
        assert s.logprob <= 0
        vals = [v for _, v in s.top_logprobs]
        assert vals == sorted(vals, reverse=True) and len(vals) == 5
        if s.logprob >= vals[-1]:  # greedy: the chosen token is the top one
            assert s.token_id in [i for i, _ in s.top_logprobs]
        assert s.top_logprobs[0][0] == s.token_id  # greedy picks the argmax


def test_logprobs_sampled_and_moe_bf16_identical_across_depths():
    m = our_model("moe", torch.bfloat16)
    p = SamplingParams(max_tokens=20, temperature=0.9, seed=3, logprobs=2)
    a = _run(m, [5, 9, 11, 3], p, 0)
    b = _run(m, [5, 9, 11, 3], SamplingParams(max_tokens=20, logprobs=2), 0)
    c = _run(m, [5, 9, 11, 3], SamplingParams(max_tokens=20, logprobs=2), 3)
    assert [(s.token_id, s.logprob) for s in b] == [(s.token_id, s.logprob) for s in c]
    assert all(s.logprob <= 0 for s in a)


# ---- penalties and grammars: greedy MTP == depth 0 ------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_penalized_greedy_mtp_equals_depth0(kind):
    m = our_model(kind, torch.float32)
    prompt = [3, 7, 7, 12, 3, 5]
    for params in (SamplingParams(max_tokens=24, presence_penalty=0.7, frequency_penalty=0.4),
                   SamplingParams(max_tokens=24, repetition_penalty=1.3),
                   SamplingParams(max_tokens=24, presence_penalty=-0.5, repetition_penalty=0.8)):
        ref = [s.token_id for s in _run(m, prompt, params, 0)]
        for d in (1, 2, 3, 4):
            assert [s.token_id for s in _run(m, prompt, params, d)] == ref, (kind, d, params)


def test_penalties_change_the_output(default):
    ids = default.tokenizer.encode("x = 1\nx = 1\nx = 1\n")
    plain = [s.token_id for s in _run(default.model, ids, SamplingParams(max_tokens=30), 2)]
    pen = [s.token_id for s in _run(default.model, ids, SamplingParams(max_tokens=30, frequency_penalty=2.0), 2)]
    assert plain != pen and len(set(pen)) >= len(set(plain))


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"], "additionalProperties": False}


def _validate(text, schema=SCHEMA):
    obj = json.loads(text)
    assert set(obj) == set(schema["required"]) and isinstance(obj["name"], str)
    assert isinstance(obj["age"], int) and isinstance(obj["ok"], bool)


def test_json_schema_greedy_mtp_equals_depth0_and_validates(default):
    from mtplx.decoding.grammar import compile_json

    g = compile_json(default.tokenizer, default.config.vocab_size, default.eos_token_ids, SCHEMA)
    for i in range(3):
        ids = default.tokenizer.encode_chat([{"role": "user", "content": f"Record {i} as JSON."}])
        params = SamplingParams(max_tokens=60, grammar=g)
        kw = dict(eos_token_ids=default.eos_token_ids)
        ref = _run(default.model, ids, params, 0, detokenizer=default.tokenizer.detokenizer(), **kw)
        for d in (1, 2, 3, 4):
            out = _run(default.model, ids, params, d, detokenizer=default.tokenizer.detokenizer(), **kw)
            assert [s.token_id for s in out] == [s.token_id for s in ref], (i, d)
        text = "".join(s.text for s in ref)
        if ref[-1].finish_reason != "length":
            _validate(text)
    # sampled: every output is valid JSON of the schema (or cut by max_tokens)
    for seed in range(4):
        out = _run(default.model, ids, SamplingParams(max_tokens=80, temperature=1.0, seed=seed, grammar=g), 3,
                   detokenizer=default.tokenizer.detokenizer(), eos_token_ids=default.eos_token_ids)
        if out[-1].finish_reason != "length":
            _validate("".join(s.text for s in out))


def test_bad_schemas_are_clear_errors(default):
    from mtplx.decoding.grammar import GrammarError, compile_json

    for bad in ({"type": "object", "properties": {"a": {"type": "nope"}}}, {"$ref": "#/definitions/missing"}):
        with pytest.raises(GrammarError):
            compile_json(default.tokenizer, default.config.vocab_size, default.eos_token_ids, bad)
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=3).validate()
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(logprobs=21).validate()


# ---- the sampled law with processors (numpy spec) ---------------------------------------------


V, L, START = 5, 3, 0
_rng = np.random.default_rng(7)
TARGET = _rng.normal(0, 1.3, (V, V))
DRAFT = 0.6 * TARGET + _rng.normal(0, 1.0, (V, V))


def _process(row, history):
    """Penalties over the history, and a prefix-dependent mask: never repeat the previous token."""
    out = row.copy()
    for t in set(history):
        out[t] -= 0.6 + 0.4 * history.count(t)
    if history:
        out[history[-1]] = -np.inf
    return out


def _target_probs(history):
    prev = history[-1] if history else START
    return softmax(_process(TARGET[prev], history)[None])[0]


def _exact_joint():
    law = {}
    for seq in itertools.product(range(V), repeat=L):
        pr = 1.0
        for j in range(L):
            pr *= _target_probs(list(seq[:j]))[seq[j]]
        law[seq] = pr
    return law


def _simulate(n, D, at_prefix=True, seed=0):
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        hist: list[int] = []
        while len(hist) < L:
            prev = hist[-1] if hist else START
            drafted, qrows = [], []
            for _j in range(D):
                h = hist + drafted
                q = softmax(_process(DRAFT[prev], h)[None])[0]
                d = spec.sample_from(q, g.random())
                drafted.append(d)
                qrows.append(q)
                prev = d
            prevs = [hist[-1] if hist else START] + drafted
            raw = np.stack([TARGET[t] for t in prevs])
            if at_prefix:
                logits = spec.processed_rows(raw, drafted, lambda r, pre: _process(r, hist + pre))
            else:  # negative control: every row processed as if at the cycle's first position
                logits = np.stack([_process(r, hist) for r in raw])
            p = softmax(logits)
            n_acc, nxt = spec.accept_sampled(p, drafted, np.stack(qrows), g.random(D), g.random())
            hist += drafted[:n_acc] + [nxt]
        out.append(tuple(hist[:L]))
    return out


def _law_ok(samples, law):
    from scipy import stats as sps

    keys = [k for k, v in law.items() if v > 0]
    obs = np.array([sum(1 for s in samples if s == k) for k in keys], dtype=float)
    if sum(1 for s in samples if law.get(s, 0) == 0):
        return False
    exp = np.array([law[k] for k in keys]) * len(samples)
    big = exp >= 5
    o, e = np.append(obs[big], obs[~big].sum()), np.append(exp[big], exp[~big].sum())
    return sps.chisquare(o, e * o.sum() / e.sum()).pvalue > 1e-4


def test_processed_acceptance_is_lossless_and_the_negative_control_fails():
    law = _exact_joint()
    assert _law_ok(_simulate(12000, D=2), law)
    assert not _law_ok(_simulate(12000, D=2, at_prefix=False, seed=1), law)


def test_torch_penalties_match_the_reference():
    from mtplx.backends.torch import sampling
    from mtplx.decoding.processors import Penalties

    g = np.random.default_rng(3)
    row = g.normal(0, 2, 50).astype(np.float32)
    pen = Penalties(sampling, 0.5, 0.25, 1.4, prompt_ids=[1, 2, 3])
    pen.commit([4, 4, 7])
    got = pen.draft(torch.from_numpy(row), [7, 9]).numpy()
    ref = row.astype(np.float64).copy()
    counts = {4: 2, 7: 2, 9: 1}
    for t in {1, 2, 3} | set(counts):
        ref[t] = ref[t] / 1.4 if ref[t] > 0 else ref[t] * 1.4
    for t, c in counts.items():
        ref[t] -= 0.5 + 0.25 * c
    assert np.allclose(got, ref, atol=1e-5)


# ---- the server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mtplx.server.app import create_app
    from mtplx.server.model_adapter import load_adapter

    adapter, depth = load_adapter(None, depth=3, prefix_cache={"gb": 0})
    with TestClient(create_app(adapter, depth=depth)) as c:
        yield c


MSGS = [{"role": "user", "content": "A person as JSON."}]


def test_server_chat_logprobs_stream_and_not(client):
    body = {"messages": MSGS, "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    r = client.post("/v1/chat/completions", json=body).json()
    content = r["choices"][0]["logprobs"]["content"]
    # every generated token has its entry: the content is their text less the chat format's markup
    assert r["choices"][0]["message"]["content"] in "".join(e["token"] for e in content)
    assert all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 3 for e in content)
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    streamed = [e for c in chunks for ch in c["choices"] if ch.get("logprobs") for e in ch["logprobs"]["content"]]
    assert [e["logprob"] for e in streamed] == [e["logprob"] for e in content]


def test_server_completions_logprobs_and_echo(client):
    r = client.post("/v1/completions", json={"prompt": "def add(a, b):", "max_tokens": 6, "temperature": 0,
                                             "logprobs": 2, "echo": True}).json()
    ch = r["choices"][0]
    lp = ch["logprobs"]
    assert ch["text"].startswith("def add(a, b):") and "".join(lp["tokens"]) == ch["text"]
    assert lp["token_logprobs"][0] is None and all(v <= 0 for v in lp["token_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_server_response_format_json_schema_and_errors(client):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": SCHEMA}}
    r = client.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 60, "temperature": 0,
                                                  "response_format": rf}).json()
    if r["choices"][0]["finish_reason"] != "length":
        _validate(r["choices"][0]["message"]["content"])
    r = client.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 40, "temperature": 0.8, "seed": 1,
                                                  "response_format": {"type": "json_object"}}).json()
    if r["choices"][0]["finish_reason"] != "length":
        assert isinstance(json.loads(r["choices"][0]["message"]["content"]), dict)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}
    e = client.post("/v1/chat/completions", json={"messages": MSGS, "response_format": bad})
    assert e.status_code == 400 and "schema" in e.json()["error"]["message"].lower()
    e = client.post("/v1/chat/completions", json={"messages": MSGS, "frequency_penalty": -3})
    assert e.status_code == 400
    ok = client.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 8, "presence_penalty": 1.0,
                                                   "frequency_penalty": 0.5, "repetition_penalty": 1.2})
    assert ok.status_code == 200


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                     "days": {"type": "integer"}, "units": {"type": "string", "enum": ["c", "f"]},
                                     "alerts": {"type": "boolean"}},
    "required": ["city", "days", "units", "alerts"]}}}


def test_forced_tool_call_arguments_follow_the_schema(client):
    """A forced call (named, or required with one call) is generated under its tool's schema: the
    default model, untrained for tools, still gives typed, complete arguments (enums, an integer,
    a boolean: free text it would not end, it is a code model)."""
    calls = 0
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        for temp in (0, 0.9):
            body = {"messages": [{"role": "user", "content": "Weather in Paris for 3 days?"}], "tools": [WEATHER],
                    "tool_choice": choice, "parallel_tool_calls": False, "max_tokens": 80, "temperature": temp, "seed": 5}
            r = client.post("/v1/chat/completions", json=body).json()
            ch = r["choices"][0]
            if ch["finish_reason"] == "length":
                continue
            call = ch["message"]["tool_calls"][0]["function"]
            args = json.loads(call["arguments"])
            assert call["name"] == "get_weather" and set(args) == {"city", "days", "units", "alerts"}
            assert args["city"] in ("Paris", "Oslo", "Lima") and isinstance(args["days"], int)
            assert args["units"] in ("c", "f") and isinstance(args["alerts"], bool)
            calls += 1
    assert calls >= 2  # the grammar closes the call: the model, untrained for tools, does not run to max_tokens


def test_forced_call_grammar_greedy_mtp_equals_depth0(default):
    from mtplx.chat.prompt import build_prompt
    from mtplx.chat.tools import ToolChoice, openai_tools
    from mtplx.decoding.grammar import compile_lark

    tools, _ = openai_tools([WEATHER])
    tk = default.tokenizer
    p = build_prompt(tk.apply_chat_template, tk.chat_template, [{"role": "user", "content": "Weather?"}], tools,
                     ToolChoice("named", name="get_weather"), {"enable_thinking": False})
    assert p.call_grammar is not None
    g = compile_lark(tk, default.config.vocab_size, default.eos_token_ids, p.call_grammar)
    ids = tk.encode(p.text, add_special_tokens=False)
    params = SamplingParams(max_tokens=60, grammar=g, stop=p.stops)
    kw = dict(eos_token_ids=default.eos_token_ids)
    ref = [s.token_id for s in _run(default.model, ids, params, 0, detokenizer=tk.detokenizer(), **kw)]
    for d in (1, 3):
        assert [s.token_id for s in _run(default.model, ids, params, d, detokenizer=tk.detokenizer(), **kw)] == ref
