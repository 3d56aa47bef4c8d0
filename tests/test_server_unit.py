"""In-process server tests against the deterministic FakeModel (fast; no weights)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from mtplx.decoding.params import SamplingParams  # noqa: E402
from mtplx.server.app import create_app  # noqa: E402
from mtplx.server.engine import DoneEvent, Engine, QueueFull, StepEvent  # noqa: E402
from mtplx.server.fake import FakeModel  # noqa: E402

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def client():
    app = create_app(FakeModel(max_context=256, fail_on="FAILNOW"), depth=2, max_body=64 * 1024)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def sse(text: str) -> list:
    out = []
    for block in text.strip().split("\n\n"):
        ev, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                ev = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        out.append((ev, data if data == "[DONE]" else json.loads(data)))
    return out


def assert_openai_error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.text and ".py" not in r.text
    return err


def assert_anthropic_error(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["message"]
    assert "Traceback" not in r.text
    return body["error"]


def test_chat_nonstream_greedy_usage_timings(client):
    body = {"model": "x", "messages": MSG, "max_tokens": 7, "temperature": 0}
    a, b = client.post(CHAT, json=body).json(), client.post(CHAT, json=body).json()
    assert a["object"] == "chat.completion" and a["model"] == "fake-model"
    ch = a["choices"][0]
    assert ch["message"]["role"] == "assistant" and ch["finish_reason"] == "length"
    assert ch["message"]["content"] == b["choices"][0]["message"]["content"]
    assert a["usage"]["completion_tokens"] == 7 and a["usage"]["total_tokens"] == a["usage"]["prompt_tokens"] + 7
    t = a["timings"]
    assert t["predicted_n"] == 7 and t["mtp_depth"] == 2 and len(t["draft_n_by_depth"]) == 2
    assert t["draft_n"] == sum(t["draft_n_by_depth"]) and t["draft_n_accepted"] <= t["draft_n"]


def test_chat_stream_shape_and_equal_to_nonstream(client):
    body = {"messages": MSG, "max_tokens": 9, "temperature": 0}
    full = client.post(CHAT, json=body).json()["choices"][0]["message"]["content"]
    r = client.post(CHAT, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [d for _, d in sse(r.text)]
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({c["id"] for c in chunks}) == 1 and {c["model"] for c in chunks} == {"fake-model"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 9
    assert all(c["usage"] is None for c in chunks[:-1])


def test_completions_text_and_token_ids(client):
    r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 5, "temperature": 0}).json()
    assert r["object"] == "text_completion" and len(r["choices"][0]["text"]) == 5
    r2 = client.post("/v1/completions", json={"prompt": [97, 98, 99], "max_tokens": 5, "temperature": 0}).json()
    assert r2["choices"][0]["text"] == r["choices"][0]["text"]
    s = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 5, "temperature": 0, "stream": True})
    ev = [d for _, d in sse(s.text)]
    assert ev[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in ev[:-1]) == r["choices"][0]["text"]
    assert_openai_error(client.post("/v1/completions", json={"prompt": [1, 99999]}), 400)


def test_seeded_sampling_repeats(client):
    body = {"messages": MSG, "max_tokens": 12, "temperature": 0.8, "seed": 1234, "top_p": 0.9, "top_k": 5,
            "min_p": 0.01}
    a = client.post(CHAT, json=body).json()["choices"][0]["message"]["content"]
    b = client.post(CHAT, json=body).json()["choices"][0]["message"]["content"]
    assert a == b


def test_stop_strings(client):
    body = {"messages": MSG, "max_tokens": 30, "temperature": 0}
    full = client.post(CHAT, json=body).json()["choices"][0]["message"]["content"]
    stop = full[5:7]
    r = client.post(CHAT, json={**body, "stop": stop}).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["message"]["content"] == full[: full.index(stop)]
    a = client.post("/v1/messages", json={"model": "m", "messages": MSG, "max_tokens": 30, "temperature": 0,
                                          "stop_sequences": [stop]}).json()
    assert a["stop_reason"] == "stop_sequence" and a["stop_sequence"] == stop


def test_anthropic_messages_and_stream_order(client):
    body = {"model": "m", "system": "be brief", "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                         {"role": "user", "content": [{"type": "text", "text": "again"}]}]}
    m = client.post("/v1/messages", json=body).json()
    assert m["type"] == "message" and m["role"] == "assistant" and m["stop_reason"] == "max_tokens"
    assert m["usage"]["output_tokens"] == 6 and m["content"][0]["type"] == "text"
    r = client.post("/v1/messages", json={**body, "stream": True})
    events = sse(r.text)
    names = [e for e, _ in events]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) <= {"ping", "content_block_delta"}
    text = "".join(d["delta"]["text"] for e, d in events if e == "content_block_delta")
    assert text == m["content"][0]["text"]
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 6
    n = client.post("/v1/messages/count_tokens", json={k: body[k] for k in ("model", "system", "messages")}).json()
    assert n["input_tokens"] == m["usage"]["input_tokens"]


@pytest.mark.parametrize("payload", [
    b"{not json",
    b"[1, 2]",
    b'"just a string"',
    json.dumps({"messages": "hello"}).encode(),
    json.dumps({"messages": []}).encode(),
    json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),
    json.dumps({"messages": [{"content": "x"}]}).encode(),
    json.dumps({"messages": MSG, "max_tokens": "5"}).encode(),
    json.dumps({"messages": MSG, "max_tokens": 0}).encode(),
    json.dumps({"messages": MSG, "temperature": "hot"}).encode(),
    json.dumps({"messages": MSG, "temperature": True}).encode(),
    json.dumps({"messages": MSG, "n": 3}).encode(),
    json.dumps({"messages": MSG, "stream": "yes"}).encode(),
    json.dumps({"messages": MSG, "logprobs": True, "top_logprobs": 21}).encode(),
    json.dumps({"messages": MSG, "top_logprobs": 2}).encode(),  # without logprobs: true
    json.dumps({"messages": MSG, "presence_penalty": 2.5}).encode(),
    json.dumps({"messages": MSG, "repetition_penalty": 0}).encode(),
    json.dumps({"messages": MSG, "response_format": {"type": "xml"}}).encode(),
    json.dumps({"messages": MSG, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "string"}}}]}).encode(),
    json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "x" * 2000}]}).encode(),  # over the 256 context
])
def test_malformed_openai(client, payload):
    r = client.post(CHAT, content=payload, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


def test_max_tokens_beyond_the_context_is_clamped_and_a_prompt_too_long_is_400(client):
    r = client.post(CHAT, json={"messages": MSG, "max_tokens": 10**6, "temperature": 0}).json()
    u = r["usage"]
    assert r["choices"][0]["finish_reason"] == "length" and u["total_tokens"] == 256  # the whole context used
    m = client.post("/v1/messages", json={"model": "m", "messages": MSG, "max_tokens": 32000}).json()
    assert m["stop_reason"] == "max_tokens" and m["usage"]["input_tokens"] + m["usage"]["output_tokens"] == 256
    e = assert_openai_error(client.post(CHAT, json={"messages": [{"role": "user", "content": "y" * 300}]}), 400)
    assert e["code"] == "context_length_exceeded" and "256" in e["message"]
    assert_anthropic_error(client.post("/v1/messages", json={"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": "y" * 300}]}), 400)


@pytest.mark.parametrize("payload", [
    b"{",
    json.dumps({"model": "m", "messages": MSG}).encode(),  # max_tokens missing
    json.dumps({"model": "m", "messages": [], "max_tokens": 5}).encode(),
    json.dumps({"model": "m", "messages": [{"role": "system", "content": "x"}], "max_tokens": 5}).encode(),
    json.dumps({"model": "m", "messages": MSG, "max_tokens": 5, "temperature": 1.5}).encode(),
    json.dumps({"model": "m", "messages": [{"role": "user", "content": [{"type": "image"}]}],
                "max_tokens": 5}).encode(),
])
def test_malformed_anthropic(client, payload):
    r = client.post("/v1/messages", content=payload, headers={"content-type": "application/json"})
    e = assert_anthropic_error(r, 400)
    assert e["type"] == "invalid_request_error"


def test_body_limit_and_unknown_route(client):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 70_000}]})
    assert_openai_error(client.post(CHAT, content=big, headers={"content-type": "application/json"}), 413)
    assert assert_anthropic_error(client.post("/v1/messages", content=big), 413)["type"] == "request_too_large"
    assert_openai_error(client.get("/v1/nope"), 404)
    assert_openai_error(client.get(CHAT), 405)


def test_no_content_type_is_read_as_json(client):
    r = client.post(CHAT, content=json.dumps({"messages": MSG, "max_tokens": 2}),
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200


def test_generation_failure_is_500_without_trace(client):
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "FAILNOW"}], "max_tokens": 3})
    err = assert_openai_error(r, 500)
    assert "secret" not in r.text and "line 42" not in r.text
    assert err["type"] == "server_error"
    assert client.post(CHAT, json={"messages": MSG, "max_tokens": 2}).status_code == 200  # still serving


def test_models_health_metrics(client):
    m = client.get("/v1/models").json()
    assert m["object"] == "list" and m["data"][0]["id"] == "fake-model"
    assert client.get("/v1/models/fake-model").json()["id"] == "fake-model"
    assert_openai_error(client.get("/v1/models/other"), 404)
    h = client.get("/health").json()
    assert h["status"] == "ok"
    client.post(CHAT, json={"messages": MSG, "max_tokens": 4, "temperature": 0})
    text = client.get("/metrics").text
    for name in ("mtplx_requests_total", "mtplx_prompt_tokens_total", "mtplx_generation_tokens_total",
                 "mtplx_generation_tokens_per_second", "mtplx_acceptance_rate{depth=\"1\"}", "mtplx_queue_depth",
                 "mtplx_errors_total", "mtplx_draft_tokens_total{depth=\"2\"}"):
        assert name in text, name


def test_api_key():
    app = create_app(FakeModel(), api_key="sekret")
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        assert_openai_error(c.get("/v1/models"), 401)
        assert_openai_error(c.get("/v1/models", headers={"authorization": "Bearer wrong"}), 401)
        assert_anthropic_error(c.post("/v1/messages", json={}), 401)
        assert c.get("/v1/models", headers={"authorization": "Bearer sekret"}).status_code == 200
        assert c.get("/v1/models", headers={"x-api-key": "sekret"}).status_code == 200
        assert_openai_error(c.get("/metrics"), 401)


def test_cli_refuses_public_bind_without_key(capsys):
    from mtplx.cli import serve_cmd

    assert serve_cmd.is_loopback("127.0.0.1") and serve_cmd.is_loopback("::1")
    assert not serve_cmd.is_loopback("0.0.0.0")
    assert serve_cmd.main(["--host", "0.0.0.0", "--api-key", ""]) == 2
    assert "--api-key" in capsys.readouterr().err


# ---------------------------------------------------------------------------- engine level
def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def _drain(job):
    text = ""
    while True:
        ev = await job.events.get()
        if isinstance(ev, StepEvent):
            text += ev.step.text
        elif isinstance(ev, DoneEvent):
            return text, ev.finish_reason
        else:
            raise AssertionError(ev)


def test_engine_queue_full_and_cancel():
    model = FakeModel(step_delay_s=0.02)
    eng = Engine(model, depth=1, max_queue=1, parallel=1)
    eng.start()

    async def go():
        p = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
        a = eng.submit([1, 2, 3], p)
        await asyncio.sleep(0.1)  # a is running
        b = eng.submit([4, 5, 6], SamplingParams(temperature=0, max_tokens=3))
        with pytest.raises(QueueFull):
            eng.submit([7], p)
        a.cancel()  # the client of `a` went away
        text, reason = await _drain(a)
        assert reason == "cancelled"
        text, reason = await _drain(b)
        assert reason == "length" and len(text) == 3

    try:
        _run(go())
        deadline = time.time() + 2
        while model.open_generations and time.time() < deadline:
            time.sleep(0.01)
        assert model.open_generations == 0
    finally:
        eng.shutdown()


def test_engine_interleaved_equals_alone():
    model = FakeModel()
    prompts = [[i, i + 1, i + 2] for i in range(6)]
    p = SamplingParams(temperature=0, max_tokens=20)
    alone = Engine(model, depth=3, parallel=1)
    inter = Engine(model, depth=3, parallel=4, max_queue=8)
    alone.start(), inter.start()

    async def go():
        ref = [await _drain(alone.submit(q, p)) for q in prompts]
        jobs = [inter.submit(q, p) for q in prompts]
        got = await asyncio.gather(*[_drain(j) for j in jobs])
        assert got == ref

    try:
        _run(go())
    finally:
        alone.shutdown(), inter.shutdown()


def test_queue_full_is_429_in_both_shapes():
    import threading

    app = create_app(FakeModel(step_delay_s=0.02), parallel=1, max_queue=0)
    with TestClient(app) as c:
        busy = threading.Thread(target=lambda: c.post(CHAT, json={"messages": MSG, "max_tokens": 60,
                                                                  "ignore_eos": True}))
        busy.start()
        try:
            deadline = time.time() + 5
            while c.get("/health").json()["active"] == 0 and time.time() < deadline:
                time.sleep(0.01)
            r = c.post(CHAT, json={"messages": MSG, "max_tokens": 2})
            err = assert_openai_error(r, 429)
            assert err["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
            r = c.post("/v1/messages", json={"model": "m", "messages": MSG, "max_tokens": 2})
            assert assert_anthropic_error(r, 429)["type"] == "rate_limit_error"
        finally:
            busy.join(10)
        assert c.post(CHAT, json={"messages": MSG, "max_tokens": 2}).status_code == 200


def test_cancel_while_queued_frees_the_slot():
    model = FakeModel(step_delay_s=0.02)
    eng = Engine(model, parallel=1, max_queue=1)
    eng.start()

    async def go():
        p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        a = eng.submit([1], p)
        await asyncio.sleep(0.05)
        b = eng.submit([2], p)
        assert eng.queue_depth == 1
        b.cancel()
        assert eng.queue_depth == 0 and (await _drain(b))[1] == "cancelled"
        c = eng.submit([3], p)  # the freed slot is usable at once
        assert (await _drain(a))[1] == "length" and (await _drain(c))[1] == "length"

    try:
        _run(go())
    finally:
        eng.shutdown()


from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=12)
_fields = st.sampled_from(["model", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop", "stream",
                           "prompt", "system", "n", "seed", "stop_sequences", "role", "content", "stream_options"])
_bodies = _json | st.dictionaries(_fields, _json, max_size=6) | st.fixed_dictionaries(
    {"model": st.just("m"), "max_tokens": st.integers(-3, 5) | _json,
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                                 "content": _json}), max_size=3)})


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=_bodies, path=st.sampled_from([CHAT, "/v1/completions", "/v1/messages", "/v1/messages/count_tokens"]))
def test_arbitrary_json_never_500(client, body, path):
    r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        (assert_anthropic_error if path.startswith("/v1/messages") else assert_openai_error)(r, r.status_code)


def test_chat_template_kwargs_reach_the_template(client):
    base = {"messages": MSG, "max_tokens": 2, "temperature": 0}
    a = client.post(CHAT, json=base).json()["usage"]["prompt_tokens"]
    b = client.post(CHAT, json={**base, "chat_template_kwargs": {"enable_thinking": True}}).json()
    assert b["usage"]["prompt_tokens"] != a  # the template opens <think> instead of an empty block
    assert_openai_error(client.post(CHAT, json={**base, "chat_template_kwargs": {"x": [1]}}), 400)


def test_cors_opt_in():
    app = create_app(FakeModel(), api_key="k", allow_origins=["http://ui.example"])
    with TestClient(app) as c:
        pre = c.options(CHAT, headers={"origin": "http://ui.example", "access-control-request-method": "POST",
                                       "access-control-request-headers": "authorization"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://ui.example"
        r = c.get("/v1/models", headers={"origin": "http://ui.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://ui.example"
    with TestClient(create_app(FakeModel())) as c:
        assert "access-control-allow-origin" not in c.get("/v1/models", headers={"origin": "http://x"}).headers
