"""In-process server tests of the agent paths: metrics and log lines of tool calls, the one shared
generation path, and greedy MTP with tools equal to depth 0 on a real (tiny) model."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from mtplx.server.app import create_app  # noqa: E402
from mtplx.server.fake import FakeModel  # noqa: E402

CHAT = "/v1/chat/completions"
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}
CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n" \
       "</function>\n</tool_call>"


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(FakeModel(max_context=4096), depth=2), raise_server_exceptions=False) as c:
        yield c


def ask(reply: str) -> list[dict]:
    return [{"role": "user", "content": f"weather? [[reply:{reply}]]"}]


def metric(client, name: str) -> float:
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_calls_and_parse_failures_are_counted(client):
    calls0, bad0 = metric(client, "mtplx_tool_calls_total"), metric(client, "mtplx_tool_call_parse_failures_total")
    r = client.post(CHAT, json={"messages": ask("ok\n\n" + CALL + "\n" + CALL), "tools": [TOOL]}).json()
    assert [c["function"]["arguments"] for c in r["choices"][0]["message"]["tool_calls"]] == ['{"city": "Paris", "days": 2}'] * 2
    r = client.post(CHAT, json={"messages": ask("<tool_call>\n<function=get_weather>\n<parameter=city>\nPar"),
                                "tools": [TOOL]}).json()
    # non-streaming: an unfinished call comes back as the text it is
    msg = r["choices"][0]["message"]
    assert "tool_calls" not in msg and msg["content"].startswith("<tool_call>\n<function=get_weather>")
    assert metric(client, "mtplx_tool_calls_total") == calls0 + 2
    assert metric(client, "mtplx_tool_call_parse_failures_total") == bad0 + 1


def test_one_log_line_per_request_says_why_a_4xx(client, caplog):
    with caplog.at_level(logging.INFO, logger="mtplx.server"):
        client.post(CHAT, json={"messages": ask("hi"), "max_tokens": 3})
        client.post(CHAT, json={"messages": [{"role": "tool", "content": "x"}], "tools": [TOOL]})
        client.get("/health")
    lines = [r.getMessage() for r in caplog.records if r.name == "mtplx.server"]
    assert any(line.startswith("POST /v1/chat/completions 200") and "prompt=" in line and "generated=" in line
               and "tok/s" in line for line in lines), lines
    assert any(line.startswith("POST /v1/chat/completions 400") and "tool_call_id" in line for line in lines), lines
    assert not any("/health" in line for line in lines)


def test_served_model_aliases():
    with TestClient(create_app(FakeModel(), model_id=["main", "gpt-4o", "claude-x"])) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["main", "gpt-4o", "claude-x"]
        assert c.get("/v1/models/claude-x").status_code == 200 and c.get("/v1/models/other").status_code == 404


def test_a_template_without_tools_refuses_them_clearly():
    fake = FakeModel()
    fake.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with TestClient(create_app(fake)) as c:
        r = c.post(CHAT, json={"messages": ask("x"), "tools": [TOOL]})
        assert r.status_code == 400 and "--chat-template" in r.json()["error"]["message"]
        assert c.post(CHAT, json={"messages": ask("x")}).status_code == 200


@pytest.fixture(scope="module")
def real_apps(tmp_path_factory):
    pytest.importorskip("torch")
    from mtplx.server.model_adapter import load_adapter, write_test_checkpoint

    path = write_test_checkpoint(tmp_path_factory.mktemp("ckpt"))
    adapter, _ = load_adapter(str(path), depth=0)
    return adapter


@pytest.mark.parametrize("depth", [1, 3])
def test_greedy_mtp_with_tools_equals_depth_0(real_apps, depth):
    """Tools only change the prompt; the tokens must still be depth 0's at every depth."""
    body = {"messages": [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"}],
            "tools": [TOOL], "temperature": 0, "max_tokens": 24, "chat_template_kwargs": {"enable_thinking": True}}
    outs = []
    for d in (0, depth):
        with TestClient(create_app(real_apps, depth=d)) as c:
            r = c.post(CHAT, json=body).json()
            a = c.post("/v1/messages", json={"model": "m", "max_tokens": 24, "temperature": 0,
                                             "system": "Use tools.", "thinking": {"type": "enabled", "budget_tokens": 64},
                                             "messages": [{"role": "user", "content": "Weather in Paris?"}],
                                             "tools": [{"name": "get_weather", "input_schema": TOOL["function"]["parameters"]}]}).json()
            outs.append((r["choices"][0]["message"], r["usage"], a["content"], a["usage"]))
            assert r["timings"]["mtp_depth"] == d
    assert outs[0][1]["prompt_tokens"] > 200  # the tools block is in the prompt
    assert outs[0] == outs[1]
