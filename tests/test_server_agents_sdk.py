"""Tool calling, reasoning and the Responses API through the OFFICIAL SDKs (strict response
validation) against a real server process around the fake model, plus a replay of requests
captured from real agent CLIs (Claude Code, Codex) in tests/fixtures/agent_requests/.

The fake model "generates" the text of the last `[[reply:TEXT]]` in its prompt, byte by byte in
varied cycle sizes, so each test scripts the exact markup (Qwen3.5 XML tool calls, </think>).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

from mtplx.server.testing import ServerProcess, sdk_clients  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "agent_requests"

# ---- a tool with typed parameters, in each API's shape ---------------------------------------
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "city name"},
        "days": {"type": "integer", "description": "how many days"},
        "metric": {"type": "boolean"},
        "options": {"type": "object", "properties": {"wind": {"type": "boolean"}}},
        "fields": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["city"],
}
TIME_SCHEMA = {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}

OAI_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                      "parameters": WEATHER_SCHEMA}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time",
                                      "parameters": TIME_SCHEMA}},
]
ANT_TOOLS = [
    {"name": "get_weather", "description": "Weather forecast", "input_schema": WEATHER_SCHEMA},
    {"name": "get_time", "description": "Current time", "input_schema": TIME_SCHEMA},
]
RESP_TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Weather forecast", "parameters": WEATHER_SCHEMA},
    {"type": "function", "name": "get_time", "description": "Current time", "parameters": TIME_SCHEMA},
]

# ---- scripted replies -------------------------------------------------------------------------
WEATHER_PARAMS = ("<parameter=city>\nParis\n</parameter>\n"
                  "<parameter=days>\n3\n</parameter>\n"
                  "<parameter=metric>\ntrue\n</parameter>\n"
                  '<parameter=options>\n{"wind": true}\n</parameter>\n'
                  '<parameter=fields>\n["temp", "rain"]\n</parameter>\n')
WEATHER_ARGS = {"city": "Paris", "days": 3, "metric": True, "options": {"wind": True}, "fields": ["temp", "rain"]}
WEATHER_CALL = "<tool_call>\n<function=get_weather>\n" + WEATHER_PARAMS + "</function>\n</tool_call>"
TIME_CALL = "<tool_call>\n<function=get_time>\n<parameter=tz>\nUTC\n</parameter>\n</function>\n</tool_call>"
TEXT_THEN_CALL = "Let me look.\n\n" + WEATHER_CALL
TWO_CALLS = "Checking both.\n\n" + WEATHER_CALL + "\n" + TIME_CALL
NAMED_REST = WEATHER_PARAMS + "</function>\n</tool_call>"  # after the prompt-side `<tool_call>\n<function=get_weather>\n`
REQUIRED_REST = "get_weather>\n" + NAMED_REST  # after the prompt-side `<tool_call>\n<function=`


def ask(reply: str, question: str = "Weather in Paris?") -> str:
    assert "]]" not in reply
    return f"{question} [[reply:{reply}]]"


def user(reply: str, question: str = "Weather in Paris?") -> list[dict]:
    return [{"role": "user", "content": ask(reply, question)}]


# ---- servers and clients ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    with ServerProcess(["mtplx.server.fake", "--depth", "2", "--max-context", "8192"], startup_timeout=60,
                       env={"OMP_NUM_THREADS": "1"}) as srv:
        srv.model_id = httpx.get(srv.base_url + "/v1/models").json()["data"][0]["id"]
        yield srv


@pytest.fixture(scope="module")
def big_server():
    with ServerProcess(["mtplx.server.fake", "--depth", "2", "--max-context", "200000", "--max-body", str(8 << 20)],
                       startup_timeout=60, env={"OMP_NUM_THREADS": "1"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server):
    return sdk_clients(server.base_url, timeout=30)[0]


@pytest.fixture(scope="module")
def ant(server):
    return sdk_clients(server.base_url, timeout=30)[1]


@pytest.fixture(scope="module")
def roai(server):
    """The strict OpenAI client for the Responses API."""
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=30,
                         _strict_response_validation=True)


@pytest.fixture
def M(server):
    return server.model_id


def _join_stream_calls(chunks) -> dict[int, dict]:
    """OpenAI chat chunks -> {index: {"id", "type", "name", "arguments", "deltas"}}; checks the delta shape."""
    calls: dict[int, dict] = {}
    for c in chunks:
        if not c.choices:
            continue
        for tc in c.choices[0].delta.tool_calls or []:
            if tc.index not in calls:  # the first delta of a call announces it whole
                assert tc.id and tc.type == "function" and tc.function and tc.function.name, tc
                calls[tc.index] = {"id": tc.id, "type": tc.type, "name": tc.function.name,
                                   "arguments": tc.function.arguments or "", "deltas": 1}
            else:  # later ones carry only argument fragments
                assert tc.id is None and tc.type is None and tc.function.name is None, tc
                assert tc.function.arguments
                calls[tc.index]["arguments"] += tc.function.arguments
                calls[tc.index]["deltas"] += 1
    return calls


# =============================================================================== 1. OpenAI tools
def test_openai_tool_call_non_stream(oai, M):
    r = oai.chat.completions.create(model=M, messages=user(TEXT_THEN_CALL), tools=OAI_TOOLS)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert ch.message.content == "Let me look."  # the blank lines before the call are markup
    assert len(ch.message.tool_calls) == 1
    tc = ch.message.tool_calls[0]
    assert tc.type == "function" and tc.id.startswith("call_") and tc.function.name == "get_weather"
    assert isinstance(tc.function.arguments, str)
    args = json.loads(tc.function.arguments)
    assert args == WEATHER_ARGS
    assert type(args["days"]) is int and type(args["metric"]) is bool and type(args["city"]) is str


def test_openai_tool_call_stream(oai, M):
    ref = oai.chat.completions.create(model=M, messages=user(TEXT_THEN_CALL), tools=OAI_TOOLS)
    chunks = list(oai.chat.completions.create(model=M, messages=user(TEXT_THEN_CALL), tools=OAI_TOOLS, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Let me look." == ref.choices[0].message.content
    calls = _join_stream_calls(chunks)
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["deltas"] >= 2
    assert calls[0]["arguments"] == ref.choices[0].message.tool_calls[0].function.arguments  # same JSON text
    assert json.loads(calls[0]["arguments"]) == WEATHER_ARGS
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == ref.usage.completion_tokens


def test_openai_stream_helper_final_completion(oai, M):
    events = []
    with oai.chat.completions.stream(model=M, messages=user(TEXT_THEN_CALL), tools=OAI_TOOLS) as stream:
        for ev in stream:
            events.append(ev.type)
        final = stream.get_final_completion()
    assert "content.delta" in events and "tool_calls.function.arguments.delta" in events
    assert "tool_calls.function.arguments.done" in events
    msg = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls" and msg.content == "Let me look."
    assert len(msg.tool_calls) == 1 and msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == WEATHER_ARGS


def test_openai_parse_helper_with_tools(oai, M):
    # .parse() auto-parses only `strict` function tools (a closed schema, every property required)
    strict = [{"type": "function", "function": {"name": "get_time", "strict": True, "parameters": {
        **TIME_SCHEMA, "additionalProperties": False}}}]
    r = oai.chat.completions.parse(model=M, messages=user("Checking.\n\n" + TIME_CALL), tools=strict)
    tc = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content == "Checking."
    assert tc.function.name == "get_time" and tc.function.parsed_arguments == {"tz": "UTC"}


# =============================================================================== 2. tool_choice
def test_openai_two_calls_one_turn(oai, M):
    r = oai.chat.completions.create(model=M, messages=user(TWO_CALLS), tools=OAI_TOOLS)
    tcs = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content == "Checking both."
    assert [t.function.name for t in tcs] == ["get_weather", "get_time"]
    assert len({t.id for t in tcs}) == 2
    assert json.loads(tcs[0].function.arguments) == WEATHER_ARGS and json.loads(tcs[1].function.arguments) == {"tz": "UTC"}
    chunks = list(oai.chat.completions.create(model=M, messages=user(TWO_CALLS), tools=OAI_TOOLS, stream=True))
    calls = _join_stream_calls(chunks)
    assert sorted(calls) == [0, 1]
    assert [calls[i]["name"] for i in (0, 1)] == ["get_weather", "get_time"]
    assert [json.loads(calls[i]["arguments"]) for i in (0, 1)] == [WEATHER_ARGS, {"tz": "UTC"}]


def test_openai_parallel_tool_calls_false(oai, M):
    r = oai.chat.completions.create(model=M, messages=user(TWO_CALLS), tools=OAI_TOOLS, parallel_tool_calls=False)
    tcs = r.choices[0].message.tool_calls
    assert [t.function.name for t in tcs] == ["get_weather"]
    assert r.choices[0].finish_reason == "tool_calls"
    assert "get_time" not in (r.choices[0].message.content or "")


def test_openai_parallel_tool_calls_false_stream(oai, M):
    chunks = list(oai.chat.completions.create(model=M, messages=user(TWO_CALLS), tools=OAI_TOOLS,
                                              parallel_tool_calls=False, stream=True))
    calls = _join_stream_calls(chunks)
    assert list(calls) == [0] and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == WEATHER_ARGS
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Checking both."


def test_openai_tool_choice_none(oai, M):
    r = oai.chat.completions.create(model=M, messages=user(TEXT_THEN_CALL), tools=OAI_TOOLS, tool_choice="none")
    msg = r.choices[0].message
    assert not msg.tool_calls and r.choices[0].finish_reason == "stop"
    assert msg.content == TEXT_THEN_CALL  # the markup, as plain text


def test_openai_tool_choice_named(oai, M):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = oai.chat.completions.create(model=M, messages=user(NAMED_REST), tools=OAI_TOOLS, tool_choice=choice)
    tcs = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(tcs) == 1
    assert tcs[0].function.name == "get_weather" and json.loads(tcs[0].function.arguments) == WEATHER_ARGS
    assert not r.choices[0].message.content
    chunks = list(oai.chat.completions.create(model=M, messages=user(NAMED_REST), tools=OAI_TOOLS, tool_choice=choice,
                                              stream=True))
    calls = _join_stream_calls(chunks)
    assert list(calls) == [0] and json.loads(calls[0]["arguments"]) == WEATHER_ARGS


def test_openai_tool_choice_required(oai, M):
    r = oai.chat.completions.create(model=M, messages=user(REQUIRED_REST), tools=OAI_TOOLS, tool_choice="required")
    tcs = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(tcs) == 1
    assert tcs[0].function.name == "get_weather" and json.loads(tcs[0].function.arguments) == WEATHER_ARGS


# =============================================================================== 3. OpenAI history
def test_openai_tool_result_history(oai, M):
    first = oai.chat.completions.create(model=M, messages=user(TEXT_THEN_CALL), tools=OAI_TOOLS)
    tc = first.choices[0].message.tool_calls[0]
    history = user(TEXT_THEN_CALL) + [
        {"role": "assistant", "content": "Let me look.",
         "tool_calls": [{"id": tc.id, "type": "function",
                         "function": {"name": tc.function.name, "arguments": tc.function.arguments}}]},
        {"role": "tool", "tool_call_id": tc.id, "content": '{"forecast": "sunny"}'},
        {"role": "user", "content": ask("It will be sunny in Paris.", "So?")},
    ]
    r = oai.chat.completions.create(model=M, messages=history, tools=OAI_TOOLS)
    assert r.choices[0].message.content == "It will be sunny in Paris." and r.choices[0].finish_reason == "stop"
    # the result as the last message (the usual agent loop), the reply scripted earlier in the prompt
    r = oai.chat.completions.create(model=M, messages=history[:3], tools=OAI_TOOLS)
    assert r.choices[0].finish_reason in ("stop", "tool_calls")


def test_openai_tool_result_unknown_id(oai, M):
    msgs = user("x") + [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_a", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]},
        {"role": "tool", "tool_call_id": "call_zzz", "content": "12:00"},
    ]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=M, messages=msgs, tools=OAI_TOOLS)
    assert e.value.status_code == 400
    assert "messages.2" in e.value.message and "call_zzz" in e.value.message and "call id" in e.value.message
    assert e.value.param == "messages.2.tool_call_id"


def test_openai_bad_tool_schema(oai, M):
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=M, messages=user("x"), tools=bad)
    assert e.value.status_code == 400 and "parameters" in e.value.message
    assert e.value.param == "tools.0.function.parameters"


# =============================================================================== 4. OpenAI reasoning
THINK_REPLY = "I should call the tool.\n</think>\n\nAnswer text"
THINK_ON = {"chat_template_kwargs": {"enable_thinking": True}}


def test_openai_reasoning_non_stream(oai, M):
    r = oai.chat.completions.create(model=M, messages=user(THINK_REPLY), extra_body=THINK_ON)
    msg = r.choices[0].message
    assert msg.content == "Answer text"
    assert (msg.model_extra or {}).get("reasoning_content") == "I should call the tool."
    assert getattr(msg, "reasoning_content", None) == "I should call the tool."
    # thinking off (the default): the same text is all content
    r = oai.chat.completions.create(model=M, messages=user("plain answer"))
    assert r.choices[0].message.content == "plain answer"
    assert "reasoning_content" not in (r.choices[0].message.model_extra or {})


def test_openai_reasoning_stream(oai, M):
    chunks = list(oai.chat.completions.create(model=M, messages=user(THINK_REPLY), extra_body=THINK_ON, stream=True))
    reasoning, content = [], []
    for c in chunks:
        if not c.choices:
            continue
        d = c.choices[0].delta
        rc = (d.model_extra or {}).get("reasoning_content")
        assert not (rc and d.content), "a delta carries reasoning or content, not both"
        if rc:
            assert not content, "reasoning after content"
            reasoning.append(rc)
        if d.content:
            content.append(d.content)
    assert "".join(reasoning) == "I should call the tool." and "".join(content) == "Answer text"


def test_openai_reasoning_then_tool_call(oai, M):
    reply = "Need weather.\n</think>\n\n" + WEATHER_CALL
    r = oai.chat.completions.create(model=M, messages=user(reply), tools=OAI_TOOLS, extra_body=THINK_ON)
    msg = r.choices[0].message
    assert msg.model_extra.get("reasoning_content") == "Need weather."
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert json.loads(msg.tool_calls[0].function.arguments) == WEATHER_ARGS


# =============================================================================== 5. Anthropic
def _check_tool_use(blocks):
    tus = [b for b in blocks if b.type == "tool_use"]
    assert len(tus) == 1
    tu = tus[0]
    assert tu.id.startswith("toolu_") and tu.name == "get_weather"
    assert tu.input == WEATHER_ARGS and type(tu.input["days"]) is int
    return tu


def test_anthropic_tool_use(ant, M):
    m = ant.messages.create(model=M, max_tokens=512, messages=user(TEXT_THEN_CALL), tools=ANT_TOOLS)
    assert m.stop_reason == "tool_use"
    assert [b.type for b in m.content] == ["text", "tool_use"] and m.content[0].text == "Let me look."
    _check_tool_use(m.content)


def test_anthropic_stream_helper(ant, M):
    with ant.messages.stream(model=M, max_tokens=512, messages=user(TEXT_THEN_CALL), tools=ANT_TOOLS) as stream:
        kinds = [ev.type for ev in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds and "text" in kinds
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use"] and final.content[0].text == "Let me look."
    _check_tool_use(final.content)


def test_anthropic_raw_stream_events(ant, M):
    events = list(ant.messages.create(model=M, max_tokens=512, messages=user(TEXT_THEN_CALL), tools=ANT_TOOLS,
                                      stream=True))
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-1] == "message_stop" and types[-2] == "message_delta"
    starts = [e for e in events if e.type == "content_block_start"]
    assert [s.content_block.type for s in starts] == ["text", "tool_use"]
    tu_start = starts[1]
    assert tu_start.content_block.id.startswith("toolu_") and tu_start.content_block.name == "get_weather"
    deltas = [e.delta for e in events if e.type == "content_block_delta" and e.index == tu_start.index]
    assert deltas and all(d.type == "input_json_delta" for d in deltas)
    assert json.loads("".join(d.partial_json for d in deltas)) == WEATHER_ARGS
    assert types.count("content_block_stop") == 2
    assert events[-2].delta.stop_reason == "tool_use"


def test_anthropic_tool_result_turn(ant, M):
    def convo(result_content, is_error=False):
        tr = {"type": "tool_result", "tool_use_id": "toolu_1", "content": result_content}
        if is_error:
            tr["is_error"] = True
        return [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "days": 3}}]},
            {"role": "user", "content": [tr, {"type": "text", "text": ask("Sunny.", "So?")}]},
        ]

    m = ant.messages.create(model=M, max_tokens=64, messages=convo('{"forecast": "sunny"}'), tools=ANT_TOOLS)
    assert m.stop_reason == "end_turn" and m.content[0].text == "Sunny."
    m = ant.messages.create(model=M, max_tokens=64, tools=ANT_TOOLS,
                            messages=convo([{"type": "text", "text": "sunny"}, {"type": "text", "text": "20C"}]))
    assert m.content[0].text == "Sunny."
    m = ant.messages.create(model=M, max_tokens=64, messages=convo("timeout", is_error=True), tools=ANT_TOOLS)
    assert m.content[0].text == "Sunny."


def test_anthropic_tool_result_unknown_id(ant, M):
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_nope", "content": "x"}]}]
    with pytest.raises(anthropic.BadRequestError) as e:
        ant.messages.create(model=M, max_tokens=16, messages=msgs, tools=ANT_TOOLS)
    assert "toolu_nope" in e.value.message and "tool_use" in e.value.message


def test_anthropic_tool_choice_named_and_any(ant, M):
    m = ant.messages.create(model=M, max_tokens=512, messages=user(NAMED_REST), tools=ANT_TOOLS,
                            tool_choice={"type": "tool", "name": "get_weather"})
    assert m.stop_reason == "tool_use" and [b.type for b in m.content] == ["tool_use"]
    _check_tool_use(m.content)
    m = ant.messages.create(model=M, max_tokens=512, messages=user(REQUIRED_REST), tools=ANT_TOOLS,
                            tool_choice={"type": "any"})
    assert m.stop_reason == "tool_use"
    _check_tool_use(m.content)


def test_anthropic_thinking(ant, M):
    thinking = {"type": "enabled", "budget_tokens": 1024}
    m = ant.messages.create(model=M, max_tokens=2048, messages=user(THINK_REPLY), thinking=thinking)
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == "I should call the tool." and m.content[1].text == "Answer text"
    assert isinstance(m.content[0].signature, str)
    with ant.messages.stream(model=M, max_tokens=2048, messages=user(THINK_REPLY), thinking=thinking) as stream:
        kinds = [ev.type for ev in stream]
        final = stream.get_final_message()
    assert "thinking" in kinds and "text" in kinds and kinds.index("thinking") < kinds.index("text")
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "I should call the tool." and final.content[1].text == "Answer text"
    raw = list(ant.messages.create(model=M, max_tokens=2048, messages=user(THINK_REPLY), thinking=thinking,
                                   stream=True))
    deltas = [e.delta.type for e in raw if e.type == "content_block_delta"]
    assert "thinking_delta" in deltas and deltas.index("thinking_delta") < deltas.index("text_delta")


def test_anthropic_system_message_inside_messages(ant, server, M):
    body = {"model": M, "max_tokens": 32, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": ask("ok")}]}]}
    r = httpx.post(server.base_url + "/v1/messages", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["content"][0]["text"] == "ok"
    # the same through the SDK (its types do not list role "system": cast)
    m = ant.messages.create(model=M, max_tokens=32, messages=body["messages"])  # type: ignore[arg-type]
    assert m.content[0].text == "ok"


def test_anthropic_disable_parallel_and_count_tokens(ant, M):
    m = ant.messages.create(model=M, max_tokens=512, messages=user(TWO_CALLS), tools=ANT_TOOLS,
                            tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert [b.type for b in m.content] == ["text", "tool_use"] and m.stop_reason == "tool_use"
    m = ant.messages.create(model=M, max_tokens=512, messages=user(TWO_CALLS), tools=ANT_TOOLS)
    assert [b.type for b in m.content] == ["text", "tool_use", "tool_use"]
    assert [b.name for b in m.content[1:]] == ["get_weather", "get_time"] and m.content[2].input == {"tz": "UTC"}
    plain = ant.messages.count_tokens(model=M, messages=user("x")).input_tokens
    with_tools = ant.messages.count_tokens(model=M, messages=user("x"), tools=ANT_TOOLS).input_tokens
    assert with_tools > plain > 0


def test_anthropic_max_tokens_larger_than_context(ant, M):
    m = ant.messages.create(model=M, max_tokens=32000, messages=user("short"))
    assert m.stop_reason in ("end_turn", "max_tokens") and m.content[0].text == "short"
    m = ant.messages.create(model=M, max_tokens=32000, messages=[{"role": "user", "content": "no script"}])
    assert m.stop_reason in ("end_turn", "max_tokens")


# =============================================================================== 6. Responses API
def test_responses_strict_usage_validation(oai, M):
    oai.responses.create(model=M, input=ask("Hello."))


def _items(resp, kind):
    return [o for o in resp.output if o.type == kind]


def test_responses_function_call(roai, M):
    r = roai.responses.create(model=M, input=ask(TEXT_THEN_CALL), tools=RESP_TOOLS)
    assert r.status == "completed"
    assert [o.type for o in r.output] == ["message", "function_call"]
    assert r.output_text == "Let me look."
    fc = _items(r, "function_call")[0]
    assert fc.name == "get_weather" and fc.call_id and fc.status == "completed"
    assert isinstance(fc.arguments, str) and json.loads(fc.arguments) == WEATHER_ARGS


def test_responses_text(roai, M):
    r = roai.responses.create(model=M, input=ask("Hello there."), instructions="You are terse.")
    assert r.status == "completed" and r.output_text == "Hello there."
    assert r.instructions == "You are terse." and r.usage.output_tokens > 0


def test_responses_stream_events(roai, M):
    events = list(roai.responses.create(model=M, input=ask(TEXT_THEN_CALL), tools=RESP_TOOLS, stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    for t in ("response.output_item.added", "response.output_text.delta", "response.function_call_arguments.delta",
              "response.function_call_arguments.done", "response.output_item.done", "response.content_part.added",
              "response.output_text.done", "response.content_part.done"):
        assert t in types, t
    seq = [e.sequence_number for e in events]
    assert all(b > a for a, b in zip(seq, seq[1:])) and seq[0] == 0
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"][0]
    assert args == done.arguments and json.loads(args) == WEATHER_ARGS
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Let me look."
    final = events[-1].response
    assert [o.type for o in final.output] == ["message", "function_call"]
    assert final.output[1].arguments == args


def test_responses_stream_helper(roai, M):
    with roai.responses.stream(model=M, input=ask(TEXT_THEN_CALL), tools=RESP_TOOLS) as stream:
        types = [ev.type for ev in stream]
        final = stream.get_final_response()
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert final.output_text == "Let me look."
    fc = _items(final, "function_call")[0]
    assert fc.name == "get_weather" and json.loads(fc.arguments) == WEATHER_ARGS


def test_responses_function_call_output_followup(roai, M):
    first = roai.responses.create(model=M, input=ask(TEXT_THEN_CALL), tools=RESP_TOOLS)
    fc = _items(first, "function_call")[0]
    inp = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
           fc.model_dump(exclude_none=True),
           {"type": "function_call_output", "call_id": fc.call_id, "output": '{"forecast": "sunny"}'},
           {"type": "message", "role": "user", "content": [{"type": "input_text", "text": ask("Sunny.", "So?")}]}]
    r = roai.responses.create(model=M, input=inp, tools=RESP_TOOLS)
    assert r.status == "completed" and r.output_text == "Sunny."
    # a function_call_output that answers no call
    bad = [inp[0], {"type": "function_call_output", "call_id": "call_nope", "output": "x"}]
    with pytest.raises(openai.BadRequestError) as e:
        roai.responses.create(model=M, input=bad, tools=RESP_TOOLS)
    assert "call_nope" in e.value.message


def test_responses_tool_choice(roai, M):
    r = roai.responses.create(model=M, input=ask(NAMED_REST), tools=RESP_TOOLS,
                              tool_choice={"type": "function", "name": "get_weather"})
    assert [o.type for o in r.output] == ["function_call"] and json.loads(r.output[0].arguments) == WEATHER_ARGS
    r = roai.responses.create(model=M, input=ask(REQUIRED_REST), tools=RESP_TOOLS, tool_choice="required")
    assert [o.type for o in r.output] == ["function_call"] and r.output[0].name == "get_weather"
    r = roai.responses.create(model=M, input=ask(TWO_CALLS), tools=RESP_TOOLS)
    assert [o.type for o in r.output] == ["message", "function_call", "function_call"]
    assert [o.name for o in r.output[1:]] == ["get_weather", "get_time"]
    r = roai.responses.create(model=M, input=ask(TWO_CALLS), tools=RESP_TOOLS, parallel_tool_calls=False)
    assert [o.type for o in r.output] == ["message", "function_call"] and r.parallel_tool_calls is False
    r = roai.responses.create(model=M, input=ask(TEXT_THEN_CALL), tools=RESP_TOOLS, tool_choice="none")
    assert [o.type for o in r.output] == ["message"] and r.output_text == TEXT_THEN_CALL


def test_responses_previous_response_id_refused(roai, M):
    with pytest.raises(openai.BadRequestError) as e:
        roai.responses.create(model=M, input="hi", previous_response_id="resp_x")
    assert e.value.status_code == 400 and e.value.param == "previous_response_id"


def test_responses_max_output_tokens_incomplete(roai, M):
    r = roai.responses.create(model=M, input=ask("This reply is much longer than five tokens."), max_output_tokens=5)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "This "
    events = list(roai.responses.create(model=M, input=ask("This reply is much longer than five tokens."),
                                       max_output_tokens=5, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


def test_responses_reasoning_item(roai, M):
    reply = "<think>\nthoughts here\n</think>\n\nthe answer"
    r = roai.responses.create(model=M, input=ask(reply), reasoning={"effort": "medium"})
    assert [o.type for o in r.output] == ["reasoning", "message"]
    rs = r.output[0]
    assert "".join(c.text for c in rs.content or []) == "thoughts here"
    assert r.output_text == "the answer"
    events = list(roai.responses.create(model=M, input=ask(reply), reasoning={"effort": "medium"}, stream=True))
    types = [e.type for e in events]
    assert "response.reasoning_text.delta" in types and "response.reasoning_text.done" in types
    assert types.index("response.reasoning_text.delta") < types.index("response.output_text.delta")
    assert [o.type for o in events[-1].response.output] == ["reasoning", "message"]
    assert events[-1].response.output_text == "the answer"


MODEL_THINKS = "<think>\nthoughts here\n</think>\n\nthe answer"


def test_model_opened_think_newline(roai, oai, M):
    got = set()
    for q in ("Why?", "Why so?", "Really why?", "And why not?"):  # varied cycle splits of the same reply
        r = roai.responses.create(model=M, input=ask(MODEL_THINKS, q))
        got.add(("responses", r.output[0].content[0].text))
        c = oai.chat.completions.create(model=M, messages=user(MODEL_THINKS, q))
        got.add(("chat", c.choices[0].message.model_extra.get("reasoning_content")))
    assert got == {("responses", "thoughts here"), ("chat", "thoughts here")}


# =============================================================================== 7. real clients
def _sse(text: str) -> list[tuple[str | None, dict]]:
    out = []
    for block in text.split("\n\n"):
        name, data = None, []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            out.append((name, json.loads("\n".join(data))))
    return out


CLAUDE_FIXTURES = sorted(p.name for p in FIXTURES.glob("claude_code_messages_*.json"))
CODEX_FIXTURES = sorted(p.name for p in FIXTURES.glob("codex_responses_*.json"))
BASH_CALL = ("Running it.\n\n<tool_call>\n<function=Bash>\n<parameter=command>\necho hi\n</parameter>\n"
             "<parameter=timeout>\n5000\n</parameter>\n</function>\n</tool_call>")
EXEC_CALL = ("<tool_call>\n<function=exec_command>\n<parameter=cmd>\necho hi\n</parameter>\n"
             "<parameter=yield_time_ms>\n1000\n</parameter>\n</function>\n</tool_call>")


def _fixture(name: str) -> dict:
    body = json.loads((FIXTURES / name).read_text())
    assert body["stream"] is True and "[[reply:" not in json.dumps(body)
    return body


def _script_claude(body: dict, reply: str) -> dict:
    """The captured body with `[[reply:...]]` added to the last user text (the rest verbatim)."""
    for m in reversed(body["messages"]):
        if m["role"] == "user" and isinstance(m["content"], list):
            texts = [b for b in m["content"] if b["type"] == "text"]
            if texts:
                texts[-1]["text"] += f" [[reply:{reply}]]"
                return body
    raise AssertionError("no user text to script")


def _script_codex(body: dict, reply: str) -> dict:
    for item in reversed(body["input"]):
        if item.get("type") == "message" and item.get("role") == "user":
            item["content"][-1]["text"] += f" [[reply:{reply}]]"
            return body
    raise AssertionError("no user message to script")


def _claude_events(big_server, body) -> list[tuple[str | None, dict]]:
    r = httpx.post(big_server.base_url + "/v1/messages?beta=true", json=body, timeout=60,
                   headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 200, r.text[:500]
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r.text)
    names = [n for n, _ in events]
    assert all(n == d["type"] for n, d in events)
    assert names[0] == "message_start" and names[-1] == "message_stop" and names[-2] == "message_delta"
    assert "error" not in names
    opened = [d["index"] for n, d in events if n == "content_block_start"]
    closed = [d["index"] for n, d in events if n == "content_block_stop"]
    assert opened and opened == closed == list(range(len(opened)))
    return events


def _codex_events(big_server, body) -> list[tuple[str | None, dict]]:
    r = httpx.post(big_server.base_url + "/v1/responses", json=body, timeout=60)
    assert r.status_code == 200, r.text[:500]
    events = _sse(r.text)
    names = [n for n, _ in events]
    assert all(n == d["type"] for n, d in events)
    assert names[:2] == ["response.created", "response.in_progress"]
    assert names[-1] in ("response.completed", "response.incomplete") and "error" not in names
    seq = [d["sequence_number"] for _, d in events]
    assert seq == list(range(len(seq)))
    final = events[-1][1]["response"]
    assert final["output"]
    added = [d["item"]["type"] for n, d in events if n == "response.output_item.added"]
    done = [d["item"]["type"] for n, d in events if n == "response.output_item.done"]
    assert added == done == [o["type"] for o in final["output"]]
    return events


@pytest.mark.parametrize("name", CLAUDE_FIXTURES)
def test_replay_claude_code(big_server, name):
    """Verbatim: the fake's default text runs to max_tokens (64000 / 32000 / 256)."""
    events = _claude_events(big_server, _fixture(name))
    assert events[-2][1]["delta"]["stop_reason"] in ("end_turn", "max_tokens")


@pytest.mark.parametrize("name", CLAUDE_FIXTURES)
def test_replay_claude_code_tool_call(big_server, name):
    """The captured body, the model scripted to call Claude Code's own Bash tool."""
    events = _claude_events(big_server, _script_claude(_fixture(name), BASH_CALL))
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["text", "tool_use"]
    assert starts[1]["name"] == "Bash" and starts[1]["id"].startswith("toolu_")
    args = "".join(d["delta"]["partial_json"] for n, d in events
                   if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta")
    assert json.loads(args) == {"command": "echo hi", "timeout": 5000}
    text = "".join(d["delta"]["text"] for n, d in events
                   if n == "content_block_delta" and d["delta"]["type"] == "text_delta")
    assert text == "Running it." and events[-2][1]["delta"]["stop_reason"] == "tool_use"


@pytest.mark.parametrize("name", [n for n in CODEX_FIXTURES if "slim" in n])
def test_replay_codex(big_server, name):
    """Verbatim (the slim ones: the fake's default text never ends, so it fills the whole context,
    ~190k tokens, and the response is incomplete for max_output_tokens)."""
    events = _codex_events(big_server, _fixture(name))
    final = events[-1][1]["response"]
    assert final["status"] in ("completed", "incomplete")
    if final["status"] == "incomplete":
        assert events[-1][0] == "response.incomplete"
        assert final["incomplete_details"] == {"reason": "max_output_tokens"}


@pytest.mark.parametrize("name", CODEX_FIXTURES)
def test_replay_codex_scripted(big_server, name):
    """The captured body, the model scripted to answer (text) or call Codex's own exec_command."""
    events = _codex_events(big_server, _script_codex(_fixture(name), "hi"))
    assert events[-1][0] == "response.completed"
    final = events[-1][1]["response"]
    assert [o["type"] for o in final["output"]] == ["message"] and final["output"][0]["content"][0]["text"] == "hi"

    events = _codex_events(big_server, _script_codex(_fixture(name), EXEC_CALL))
    assert events[-1][0] == "response.completed"
    out = events[-1][1]["response"]["output"]
    assert [o["type"] for o in out] == ["function_call"] and out[0]["name"] == "exec_command"
    assert json.loads(out[0]["arguments"]) == {"cmd": "echo hi", "yield_time_ms": 1000}
    assert "namespace" not in out[0]
