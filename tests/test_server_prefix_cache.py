"""The prefix cache through the server: the same answers with the cache on and off, the cached
tokens reported the way each API reports them, /metrics, concurrent requests sharing a prefix."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from mtplx.server.app import create_app  # noqa: E402
from mtplx.server.model_adapter import load_adapter, real_engine_available, write_test_checkpoint  # noqa: E402

if not real_engine_available():  # pragma: no cover
    pytest.skip("needs the torch engine", allow_module_level=True)

BLOCK = 16
SYSTEM = "You are a careful assistant. " + " ".join(f"rule {i}: answer briefly." for i in range(40))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_test_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _app(ckpt, gb: float, parallel: int = 1):
    adapter, depth = load_adapter(str(ckpt), depth=2, dtype="float32", prefix_cache={"gb": gb, "block": BLOCK})
    return create_app(adapter, depth=depth, parallel=parallel, max_tokens_cap=8)


@pytest.fixture(scope="module")
def on(ckpt):
    with TestClient(_app(ckpt, 0.25)) as c:
        yield c


@pytest.fixture(scope="module")
def off(ckpt):
    with TestClient(_app(ckpt, 0)) as c:
        yield c


def _turns():
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2 + 2?"}]
    yield list(msgs)
    msgs += [{"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3, please?"}]
    yield list(msgs)


def _chat(client, messages, **kw):
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 8, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_openai_turns_equal_cache_off_and_report_cached_tokens(on, off):
    for i, msgs in enumerate(_turns()):
        for kw in ({"temperature": 0}, {"temperature": 0.8, "seed": 11}):
            a, b = _chat(on, msgs, **kw), _chat(off, msgs, **kw)
            assert a["choices"][0]["message"] == b["choices"][0]["message"]
            assert b["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        u = a["usage"]
        cached = u["prompt_tokens_details"]["cached_tokens"]
        # turn 1 repeated (second kw) and turn 2 share every block before their last token
        assert cached == (u["prompt_tokens"] - 1) // BLOCK * BLOCK if i == 0 else cached >= BLOCK * 8
        assert a["timings"]["cache_n"] == cached and a["timings"]["prompt_n"] == u["prompt_tokens"] - cached


def test_anthropic_usage_splits_the_prompt(on):
    msgs = [{"role": "user", "content": SYSTEM + " Name a colour."}]
    body = {"model": "m", "max_tokens": 6, "messages": msgs}
    first = on.post("/v1/messages", json=body).json()["usage"]
    second = on.post("/v1/messages", json=body).json()["usage"]
    total = first["input_tokens"] + first["cache_read_input_tokens"] + first["cache_creation_input_tokens"]
    assert total == second["input_tokens"] + second["cache_read_input_tokens"] + second["cache_creation_input_tokens"]
    assert second["cache_read_input_tokens"] > 0 and second["cache_creation_input_tokens"] == 0
    # streamed: message_delta carries the final split
    with on.stream("POST", "/v1/messages", json={**body, "stream": True}) as r:
        text = "".join(r.iter_text())
    import json

    deltas = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ") and "message_delta" in line]
    assert deltas[-1]["usage"]["cache_read_input_tokens"] == second["cache_read_input_tokens"]
    assert deltas[-1]["usage"]["input_tokens"] == second["input_tokens"]


def test_responses_usage_and_metrics(on):
    body = {"model": "m", "input": SYSTEM + " Say hi.", "max_output_tokens": 6}
    on.post("/v1/responses", json=body)
    u = on.post("/v1/responses", json=body).json()["usage"]
    assert u["input_tokens_details"]["cached_tokens"] > 0
    m = on.get("/metrics").text
    for name in ("mtplx_prefix_cache_hit_tokens_total", "mtplx_prefix_cache_bytes", "mtplx_prefix_cache_evicted_bytes_total",
                 "mtplx_prompt_cached_tokens_total"):
        assert name in m
    hit = next(float(l.split()[-1]) for l in m.splitlines() if l.startswith("mtplx_prefix_cache_hit_tokens_total"))
    assert hit > 0


def test_concurrent_requests_sharing_a_prefix_equal_alone(ckpt, off):
    prompts = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}?"}] for i in range(3)]
    alone = [_chat(off, p, temperature=0)["choices"][0]["message"]["content"] for p in prompts]
    with TestClient(_app(ckpt, 0.25, parallel=3)) as c:
        async def go():
            import httpx

            transport = httpx.ASGITransport(app=c.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
                rs = await asyncio.gather(*[ac.post("/v1/chat/completions", json={
                    "model": "m", "messages": p, "max_tokens": 8, "temperature": 0}) for p in prompts * 2])
            return [r.json() for r in rs]

        out = asyncio.run(go())
    assert [o["choices"][0]["message"]["content"] for o in out] == alone * 2
    assert sum(o["usage"]["prompt_tokens_details"]["cached_tokens"] for o in out) > 0
