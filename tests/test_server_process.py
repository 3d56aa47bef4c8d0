"""A real `mtplx serve` process on loopback, a real tiny checkpoint, real clients (openai, anthropic SDKs)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

from mtplx.server.testing import ServerProcess, sdk_clients  # noqa: E402

DEPTH = 2
MAX_CAP = 8  # --max-tokens: default completion length when a request gives none


def _real_engine_available() -> bool:
    try:
        from mtplx.checkpoint.synthetic import write_synthetic_checkpoint  # noqa: F401
        from mtplx.server.model_adapter import real_engine_available

        return real_engine_available()
    except ImportError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if _real_engine_available():
        from mtplx.server.model_adapter import write_test_checkpoint

        model_dir = write_test_checkpoint(tmp_path_factory.mktemp("ckpt"))
        args = ["mtplx", "serve", "--model", str(model_dir), "--depth", str(DEPTH), "--parallel", "4",
                "--max-tokens", str(MAX_CAP), "--max-queue", "32", "--log-level", "warning", "--threads", "1"]
    else:  # until the engine lands: the same server around the deterministic fake model
        args = ["mtplx.server.fake", "--depth", str(DEPTH), "--parallel", "4", "--step-delay", "0.002",
                "--max-queue", "32"]
    with ServerProcess(args, startup_timeout=120, env={"OMP_NUM_THREADS": "1"}) as srv:
        srv.real = args[0] == "mtplx"
        srv.model_id = httpx.get(srv.base_url + "/v1/models").json()["data"][0]["id"]
        yield srv


@pytest.fixture(scope="module")
def oai(server):
    return sdk_clients(server.base_url, timeout=60)[0]


@pytest.fixture(scope="module")
def ant(server):
    return sdk_clients(server.base_url, timeout=60)[1]


USER = [{"role": "user", "content": "Tell me a story."}]
GREEDY = {"temperature": 0, "top_k": 0, "top_p": 1.0}


def test_openai_sdk_chat(oai, server):
    r = oai.chat.completions.create(model=server.model_id, messages=USER, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 0
    timings = r.model_extra["timings"]
    assert timings["mtp_depth"] == DEPTH and timings["predicted_n"] == r.usage.completion_tokens
    assert len(timings["draft_n_by_depth"]) == DEPTH and timings["draft_n_accepted"] <= timings["draft_n"]
    if server.real:  # the tiny MoE checkpoint with its MTP head really drafted
        assert server.model_id == "tiny-moe" and timings["draft_n"] > 0 and timings["verify_passes"] > 0

    chunks = list(oai.chat.completions.create(model=server.model_id, messages=USER, max_tokens=6, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [r.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [m.id for m in oai.models.list().data] == [server.model_id]


def test_openai_sdk_completions(oai, server):
    r = oai.completions.create(model=server.model_id, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 5
    # streaming: the SDK's Completion type forbids finish_reason=null, which OpenAI itself sends in
    # every chunk but the last, so strict validation cannot apply to these chunks
    lax = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    s = list(lax.completions.create(model=server.model_id, prompt="Once upon a time", max_tokens=5,
                                    temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in s if c.choices) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in s if c.choices][-1] == r.choices[0].finish_reason
    assert s[-1].usage.completion_tokens == r.usage.completion_tokens and len({c.id for c in s}) == 1
    # sampling with a seed repeats
    a = oai.completions.create(model=server.model_id, prompt="x", max_tokens=6, temperature=0.9, top_p=0.95,
                               seed=7, extra_body={"top_k": 20, "min_p": 0.01})
    b = oai.completions.create(model=server.model_id, prompt="x", max_tokens=6, temperature=0.9, top_p=0.95,
                               seed=7, extra_body={"top_k": 20, "min_p": 0.01})
    assert a.choices[0].text == b.choices[0].text


def test_openai_sdk_errors(oai, server):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=server.model_id, messages=USER, n=2)
    assert "n" in str(e.value)
    # a max_tokens beyond the context is clamped (finish "length"); only a prompt that cannot fit is a 400
    r = oai.chat.completions.create(model=server.model_id, messages=USER, max_tokens=10**9, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    room = httpx.get(server.base_url + "/v1/models").json()["data"][0]["max_model_len"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": "x " * room}])
    assert e.value.code == "context_length_exceeded"


def test_anthropic_sdk(ant, server):
    m = ant.messages.create(model=server.model_id, max_tokens=6, system="You are terse.",
                            messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                      {"role": "user", "content": [{"type": "text", "text": "more"}]}],
                            extra_body=GREEDY)
    assert m.type == "message" and m.role == "assistant" and m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.output_tokens <= 6
    # anthropic>=2 dropped temperature/top_p/top_k from the signature: they travel in extra_body
    with ant.messages.stream(model=server.model_id, max_tokens=6, system="You are terse.", extra_body=GREEDY,
                             messages=[{"role": "user", "content": "hi"},
                                       {"role": "assistant", "content": "hello"},
                                       {"role": "user", "content": "more"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == m.content[0].text == final.content[0].text
    assert final.stop_reason == m.stop_reason and final.usage.output_tokens == m.usage.output_tokens
    n = ant.messages.count_tokens(model=server.model_id, messages=[{"role": "user", "content": "hi"}])
    assert n.input_tokens > 0
    with pytest.raises(anthropic.BadRequestError):
        ant.messages.create(model=server.model_id, max_tokens=5, messages=[])


def _stream_chat(base_url: str, model: str, prompt: str, max_tokens: int) -> str:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    out = []
    for c in client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0, stream=True):
        if c.choices and c.choices[0].delta.content:
            out.append(c.choices[0].delta.content)
    return "".join(out)


def test_eight_concurrent_streams_equal_alone(server):
    prompts = [f"Request number {i}: {'abc' * i}" for i in range(8)]
    alone = [_stream_chat(server.base_url, server.model_id, p, 10) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: _stream_chat(server.base_url, server.model_id, p, 10), prompts))
    assert together == alone


_KILLED_CLIENT = r"""
import socket, sys, json
STREAM = %s
body = json.dumps({"messages": [{"role": "user", "content": "go"}], "max_tokens": %d, "stream": STREAM,
                   "temperature": 0, "ignore_eos": True}).encode()
s = socket.create_connection(("127.0.0.1", %d))
s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
          b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
got = b""
while STREAM and got.count(b"data: ") < 3:
    got += s.recv(4096)
if not STREAM:
    import time; time.sleep(0.2)  # the generation is under way (the server answers only at the end)
print("streaming", flush=True)
import time; time.sleep(60)
"""


def _metric(text: str, name: str) -> float:
    m = re.search(r"^" + re.escape(name) + r" ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize("stream", [True, False])
def test_client_killed_mid_stream(server, stream):
    cancelled = 'mtplx_generations_total{outcome="cancelled"}'
    before = _metric(httpx.get(server.base_url + "/metrics").text, cancelled)
    # long enough that the generation cannot finish before the kill, however fast decoding is
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CLIENT % (stream, 3000, server.port)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "streaming"
        child.kill()
        child.wait(10)
        # the server keeps serving, and the abandoned generation is cancelled, not run to its end
        r = httpx.post(server.base_url + "/v1/chat/completions", timeout=60,
                       json={"messages": USER, "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200
        deadline = time.time() + 20
        while time.time() < deadline:
            text = httpx.get(server.base_url + "/metrics").text
            if _metric(text, cancelled) > before:
                break
            time.sleep(0.1)
        assert _metric(text, cancelled) == before + 1
        assert httpx.get(server.base_url + "/health").json()["active"] == 0
    finally:
        if child.poll() is None:
            child.kill()


BAD_BODIES = [
    (b"{not json", 400),
    (b"", 400),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), 400),
    (json.dumps({"messages": []}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**15, "n": 2}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "top_p": 0}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x" * (9 << 20)}]}).encode(), 413),
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_malformed_over_http(server, path):
    for body, status in BAD_BODIES:
        r = httpx.post(server.base_url + path, content=body, headers={"content-type": "application/json"},
                       timeout=30)
        assert r.status_code == status, (body[:80], r.text[:300])
        j = r.json()
        assert (j["type"] == "error" and j["error"]["message"]) if path == "/v1/messages" else j["error"]["message"]
        assert "Traceback" not in r.text


def test_metrics_exposition(server):
    text = httpx.get(server.base_url + "/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    names = {f.name for f in text_string_to_metric_families(text)}
    for n in ("mtplx_requests", "mtplx_prompt_tokens", "mtplx_generation_tokens", "mtplx_queue_depth",
              "mtplx_acceptance_rate", "mtplx_generation_tokens_per_second", "mtplx_errors"):
        assert n in names, n


def test_stop_sequences(oai, ant, server):
    base = oai.chat.completions.create(model=server.model_id, messages=USER, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].message.content
    stop = base[4:6]
    if len(base) < 6 or not stop.strip():
        pytest.skip(f"generated text too short for a stop-string check: {base!r}")
    r = oai.chat.completions.create(model=server.model_id, messages=USER, max_tokens=12, temperature=0, stop=[stop],
                                   extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == base[: base.index(stop)]
    m = ant.messages.create(model=server.model_id, max_tokens=12, stop_sequences=[stop],
                            messages=USER, extra_body={**GREEDY})
    assert m.stop_reason in ("stop_sequence", "end_turn", "max_tokens")
    if m.stop_reason == "stop_sequence":
        assert m.stop_sequence == stop and stop not in m.content[0].text
