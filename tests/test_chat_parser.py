"""The chat format layer: templates render tools / calls / results / thinking, and the incremental
parser reads generated text back into the same calls, whatever the split into deltas."""

from __future__ import annotations

import json
import random

import pytest

from mtplx.chat.events import ReasoningDelta, TextDelta, ToolCallArgs, ToolCallEnd, ToolCallStart
from mtplx.chat.formats import builtin_template, detect_format, load_template
from mtplx.chat.parser import ChatParser
from mtplx.chat.prompt import build_prompt
from mtplx.chat.tools import (Tool, ToolCall, ToolChoice, ToolSpecError, anthropic_tool_choice, coerce_value,
                              openai_tool_choice, openai_tools, responses_tools)
from mtplx.tokenizer import Tokenizer

WEATHER = Tool("get_weather", "Weather for a city", {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "ratio": {"type": "number"}, "opts": {"type": "object"}, "tags": {"type": "array"},
    "note": {"type": ["string", "null"]}}, "required": ["city"]})
SHELL = Tool("run_shell", "Run a command", {"type": "object", "properties": {"command": {"type": "string"}}})
TOOLS = [WEATHER, SHELL]

CALLS = [
    ToolCall("c1", "get_weather", {"city": "Paris", "days": 3, "metric": True, "ratio": 0.5}),
    ToolCall("c2", "run_shell", {"command": "cat <<EOF\nline one\n</parameter> inside a value\nEOF"}),
    ToolCall("c3", "get_weather", {"city": "Zürich ☃ 東京", "opts": {"a": [1, 2]}, "tags": ["x", "y"]}),
    ToolCall("c4", "run_shell", {}),
]


def render(template: str, messages: list[dict], tools=TOOLS, **kw) -> str:
    return Tokenizer(None, chat_template=template).apply_chat_template(
        messages, tools=[t.template_dict() for t in tools] if tools else None, **kw)


def assistant_turn(template: str, content: str, calls: list[ToolCall]) -> str:
    """What the template writes for an assistant turn: the text a model trained on it generates."""
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": content, "tool_calls": [
        {"type": "function", "id": c.id, "function": {"name": c.name, "arguments": c.arguments}} for c in calls]}]
    text = render(template, msgs, add_generation_prompt=False)
    body = text.split("<|im_start|>assistant\n")[-1]
    return body[: body.index("<|im_end|>")]


def run(parser: ChatParser, pieces: list[str]) -> list:
    events = []
    for p in pieces:
        events += parser.feed(p)
    return events + parser.finish()


def summarize(events: list) -> tuple[str, str, list[tuple[str, dict]]]:
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    calls = [(e.call.name, e.call.arguments) for e in events if isinstance(e, ToolCallEnd)]
    return text, reasoning, calls


def check_stream_invariants(events: list) -> None:
    started, args = {}, {}
    for e in events:
        if isinstance(e, TextDelta):
            assert "<tool_call" not in e.text and "<function" not in e.text and "</tool_call" not in e.text
        elif isinstance(e, ToolCallStart):
            assert e.index not in started and e.index == len(started)
            started[e.index] = e
            args[e.index] = ""
        elif isinstance(e, ToolCallArgs):
            assert e.index in started
            args[e.index] += e.fragment
        elif isinstance(e, ToolCallEnd):
            assert e.call.id == started[e.index].id
            if e.complete:
                assert json.loads(args[e.index]) == e.call.arguments
                assert args[e.index] == e.call.arguments_json


def splits(text: str, rng: random.Random, n: int = 40):
    yield [text]
    yield list(text)  # one character at a time
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]  # every two-piece split
    for _ in range(n):
        cuts = sorted(rng.sample(range(1, len(text)), min(5, len(text) - 1)))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("name", ["qwen3.5", "qwen3"])
@pytest.mark.parametrize("content,calls", [
    ("Let me check the weather.", CALLS[:1]),
    ("", CALLS[:2]),
    ("Two things first:\n- a\n- b", CALLS[1:3]),
    ("", CALLS[3:]),
    ("No tool needed, the answer is 42.", []),
])
def test_rendered_calls_parse_back_at_every_split(name, content, calls):
    template = builtin_template(name)
    generated = assistant_turn(template, content, calls)
    rng = random.Random(0)
    expected = (content, "", [(c.name, c.arguments) for c in calls])
    for pieces in splits(generated, rng):
        events = run(ChatParser(detect_format(template), TOOLS), pieces)
        check_stream_invariants(events)
        assert summarize(events) == expected, pieces


def test_xml_values_take_the_schema_types():
    assert coerce_value("3", {"type": "integer"}) == 3 and coerce_value("3.0", {"type": "integer"}) == 3
    assert coerce_value("0.25", {"type": "number"}) == 0.25 and coerce_value("True", {"type": "boolean"}) is True
    assert coerce_value('{"a": 1}', {"type": "object"}) == {"a": 1}
    assert coerce_value("null", {"type": ["string", "null"]}) is None
    assert coerce_value("007", {"type": "string"}) == "007"  # a string stays text, leading zeros and all
    assert coerce_value("three", {"type": "integer"}) == "three"  # nothing fits: the text, not a crash
    assert coerce_value("[1, 2]", None) == [1, 2] and coerce_value("plain", None) == "plain"
    assert coerce_value("5", {"anyOf": [{"type": "integer"}, {"type": "string"}]}) == 5


def test_call_ids_are_unique_and_prefixed():
    generated = assistant_turn(builtin_template("qwen3.5"), "", CALLS[:2])
    ids = [e.id for e in run(ChatParser(detect_format(builtin_template("qwen3.5")), TOOLS, id_prefix="toolu_"),
                             [generated]) if isinstance(e, ToolCallStart)]
    assert len(set(ids)) == 2 and all(i.startswith("toolu_") for i in ids)


def xml_parser(**kw) -> ChatParser:
    return ChatParser(detect_format(builtin_template("qwen3.5")), TOOLS, **kw)


def test_the_name_is_announced_before_the_arguments_are_done():
    p = xml_parser()
    assert p.feed("Checking.\n\n<tool_call>\n<function=get_wea") == [TextDelta("Checking.")]
    start = p.feed("ther>\n<parameter=city>\nPar")
    assert len(start) == 1 and isinstance(start[0], ToolCallStart) and start[0].name == "get_weather"
    assert p.feed("is\n</parameter>") == []  # the value may go on ('</parameter>' inside a value)
    frag = p.feed("\n<parameter=days>")
    assert frag == [ToolCallArgs(0, '{"city": "Paris"')]


@pytest.mark.parametrize("text,reason", [
    ("<tool_call>\n<func garbage", "malformed"),
    ("<tool_call>\n{\"name\": 1}", "malformed"),
    ("<tool_call>\n<function=delete_everything>\n</function>\n</tool_call>", "unknown_tool"),
    ("<tool_call>\n<function=get_wea", "unfinished"),
])
def test_a_call_that_never_got_a_name_comes_back_as_text(text, reason):
    p = xml_parser()
    events = run(p, ["Before. ", text])
    assert summarize(events) == ("Before. " + text, "", [])
    assert p.failures == [reason] and p.calls == []


def test_an_unfinished_announced_call_is_closed_incomplete():
    p = xml_parser()
    raw = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n4"
    events = run(p, [raw])
    end = [e for e in events if isinstance(e, ToolCallEnd)]
    assert len(end) == 1 and not end[0].complete and end[0].raw == raw
    assert end[0].call.arguments == {"city": "Paris", "days": 4} and p.failures == ["unfinished"] and p.calls == []


def test_tool_choice_none_leaves_markup_as_text():
    text = assistant_turn(builtin_template("qwen3.5"), "", CALLS[:1])
    events = run(xml_parser(parse_tools=False), [text])
    assert summarize(events) == (text, "", [])


def test_reasoning_then_answer_then_call():
    p = xml_parser(start_in_reasoning=True)
    generated = "I need the weather.\nThen answer.\n</think>\n\nSure.\n\n" + assistant_turn(
        builtin_template("qwen3.5"), "", CALLS[:1])
    for pieces in splits(generated, random.Random(1), n=10):
        events = run(xml_parser(start_in_reasoning=True), pieces)
        check_stream_invariants(events)
        assert summarize(events) == ("Sure.", "I need the weather.\nThen answer.",
                                     [("get_weather", CALLS[0].arguments)])
    # a model that opens its own block, when the prompt did not
    for pieces in (["\n<thi", "nk>\nhmm\n</think>\n\nok"], ["<think>", "\nhmm\n</think>\n\nok"],
                   ["<think>\n", "\nhmm\n", "</think>", "\n\nok"]):
        assert summarize(run(p := xml_parser(), pieces))[:2] == ("ok", "hmm"), pieces
        assert p.failures == []
    # never closed: everything is reasoning
    assert summarize(run(xml_parser(start_in_reasoning=True), ["still thinking"])) == ("", "still thinking", [])


def test_template_renders_the_reference_structure():
    t = builtin_template("qwen3.5")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Let me check.", "reasoning_content": "need a tool",
             "tool_calls": [{"type": "function", "id": "c1", "function": {"name": "get_weather",
                                                                           "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "c2", "content": "22C"}]
    text = render(t, msgs, tools=[WEATHER])
    assert text.startswith("<|im_start|>system\n# Tools\n\n")
    assert "<tools>\n" + json.dumps(WEATHER.template_dict(), ensure_ascii=False) + "\n</tools>" in text
    assert "</IMPORTANT>\n\nBe brief.<|im_end|>\n" in text
    assert ("<|im_start|>assistant\n<think>\nneed a tool\n</think>\n\nLet me check.\n\n<tool_call>\n"
            "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call><|im_end|>\n") in text
    assert ("<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n22C\n"
            "</tool_response><|im_end|>\n") in text
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    assert render(t, msgs[:2], tools=None, enable_thinking=False).endswith(
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # reasoning of turns before the last real user query is dropped
    later = msgs + [{"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Thanks"}]
    assert "need a tool" not in render(t, later, tools=[WEATHER])
    j = render(builtin_template("qwen3"), msgs, tools=[WEATHER])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in j


def test_build_prompt_forced_calls_and_history_checks():
    t = builtin_template("qwen3.5")
    r = Tokenizer(None, chat_template=t).apply_chat_template
    user = [{"role": "user", "content": "hi"}]
    p = build_prompt(r, t, user, TOOLS, ToolChoice("named", "run_shell"))
    assert p.text.endswith("<think>\n</think>\n\n<tool_call>\n<function=run_shell>\n") and p.stops == ["</tool_call>"]
    parser, first = p.parser()
    assert [type(e) for e in first] == [ToolCallStart] and first[0].name == "run_shell"
    assert summarize(run(parser, ["<parameter=command>\nls\n</parameter>\n</function>\n</tool_call>"]))[2] == [
        ("run_shell", {"command": "ls"})]
    p = build_prompt(r, t, user, TOOLS, ToolChoice("required"), {"enable_thinking": False})
    assert p.text.endswith("</think>\n\n<tool_call>\n<function=") and p.stops == [] and not p.start_in_reasoning
    p = build_prompt(r, t, user, TOOLS, ToolChoice("auto", parallel=False))
    assert p.stops == ["</tool_call>"] and p.start_in_reasoning
    # system messages before the first answer join the first turn; later ones stay in place
    p = build_prompt(r, t, user + [{"role": "system", "content": "late"}], [], ToolChoice("none"))
    assert p.text.startswith("<|im_start|>system\nlate<|im_end|>")
    turn2 = user + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    p1 = build_prompt(r, t, turn2, [], ToolChoice("none"))
    p2 = build_prompt(r, t, turn2 + [{"role": "system", "content": "plan mode"}], [], ToolChoice("none"))
    assert p2.text.startswith(p1.text[:p1.text.rindex("<|im_start|>assistant")])  # the prefix stays
    assert "<|im_start|>user\n<system-reminder>\nplan mode\n</system-reminder><|im_end|>" in p2.text
    with pytest.raises(ToolSpecError, match="no earlier assistant"):
        build_prompt(r, t, user + [{"role": "tool", "tool_call_id": "x", "content": "r"}], TOOLS, ToolChoice())
    with pytest.raises(ToolSpecError, match="not among the request's tools"):
        build_prompt(r, t, user + [{"role": "assistant", "content": "", "tool_calls": [ToolCall("a", "nope", {})]}],
                     TOOLS, ToolChoice())
    plain = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(ToolSpecError, match="--chat-template"):
        build_prompt(Tokenizer(None, chat_template=plain).apply_chat_template, plain, user, TOOLS, ToolChoice())


def test_tool_declarations_from_each_api():
    tools, skipped = openai_tools([{"type": "function", "function": {"name": "f", "description": "d"}},
                                   {"type": "web_search_preview"}])
    assert tools[0].parameters == {"type": "object", "properties": {}} and skipped == ["web_search_preview"]
    for bad, match in [([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "type 'object'"),
                       ([{"type": "function", "function": {"name": "bad name!"}}], "tool name"),
                       ([{"type": "function", "function": {"name": "f"}}] * 2, "declared twice")]:
        with pytest.raises(ToolSpecError, match=match):
            openai_tools(bad)
    flat, skipped = responses_tools([{"type": "function", "name": "f"}, {"type": "custom", "name": "apply_patch"},
                                     {"type": "namespace", "name": "ns", "tools": [{"type": "function", "name": "g"}]},
                                     {"type": "web_search"}])
    assert [(t.name, t.kind, t.namespace) for t in flat] == [("f", "function", None), ("apply_patch", "custom", None),
                                                             ("g", "function", "ns")]
    assert skipped == ["web_search"]
    assert openai_tool_choice({"type": "function", "function": {"name": "f"}}, tools).mode == "named"
    assert openai_tool_choice(None, []).mode == "none" and openai_tool_choice(None, tools).mode == "auto"
    assert not openai_tool_choice("auto", tools, parallel=False).parallel
    with pytest.raises(ToolSpecError, match="not among"):
        openai_tool_choice({"type": "function", "function": {"name": "zzz"}}, tools)
    assert anthropic_tool_choice({"type": "any", "disable_parallel_tool_use": True}, tools) == ToolChoice(
        "required", None, False)
    with pytest.raises(ToolSpecError, match="needs at least one tool"):
        anthropic_tool_choice({"type": "any"}, [])


def test_load_template_names_and_errors(tmp_path):
    assert "THINKING_DEFAULT" not in load_template("qwen3.5")
    assert "else false" in load_template("qwen3.5:nothink")
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages }}")
    assert load_template(str(f)) == "{{ messages }}"
    with pytest.raises(ValueError, match="no such file"):
        load_template("qwen9")


def test_forced_calls_in_the_json_format():
    t = builtin_template("qwen3")
    r = Tokenizer(None, chat_template=t).apply_chat_template
    user = [{"role": "user", "content": "hi"}]
    p = build_prompt(r, t, user, TOOLS, ToolChoice("named", "get_weather"), {"enable_thinking": False})
    assert p.text.endswith('<tool_call>\n{"name": "get_weather", "arguments": ')
    parser, first = p.parser()
    assert [e.name for e in first if isinstance(e, ToolCallStart)] == ["get_weather"]
    assert summarize(run(parser, ['{"city": "Oslo", "days": 1}}', "\n</tool_call>"]))[2] == [
        ("get_weather", {"city": "Oslo", "days": 1})]
    p = build_prompt(r, t, user, TOOLS, ToolChoice("required"), {"enable_thinking": False})
    parser, first = p.parser()
    assert first == [] and p.text.endswith('<tool_call>\n{"name": "')
    assert summarize(run(parser, ['run_shell", "arguments": {"command": "ls"}}\n</tool_call>']))[2] == [
        ("run_shell", {"command": "ls"})]
