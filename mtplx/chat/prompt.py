"""A conversation -> the prompt text to generate from, and how to read what comes back.

    prompt = build_prompt(render, template, messages, tools, choice, chat_kwargs)
    prompt.text                # the rendered conversation, assistant turn opened (+ a forced call's prefix)
    parser = prompt.parser()   # a ChatParser in the state the prompt leaves the model in
    prompt.stops               # stop strings the request needs besides its own ("</tool_call>" for one call)

`messages` are the template's dicts (role, content text, reasoning_content, tool_calls as
ToolCall, tool_call_id), produced by each API's own conversion. Here they are checked (tool
results answer earlier calls, calls name declared tools) and put in the shape the Qwen
templates read. A forced tool choice opens the assistant turn with the call's own prefix, on
the prompt side, so sampling stays exactly the model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from mtplx.chat.call_grammar import forced_call_grammar
from mtplx.chat.formats import CALL_CLOSE, THINK_CLOSE, THINK_OPEN, ChatFormat, detect_format
from mtplx.chat.parser import ChatParser
from mtplx.chat.tools import Tool, ToolCall, ToolChoice, ToolSpecError

Render = Callable[..., str]  # render(messages, tools=..., **template_kwargs) -> text


@dataclass
class ChatPrompt:
    text: str
    fmt: ChatFormat
    tools: list[Tool]
    choice: ToolChoice
    start_in_reasoning: bool
    prefill: str = ""  # appended to the rendered prompt; the parser reads it first
    stops: list[str] = field(default_factory=list)
    call_grammar: str | None = None  # a forced single call: Lark grammar of its rest (mtplx/chat/call_grammar.py)

    def parser(self, id_prefix: str = "call_") -> tuple[ChatParser, list]:
        """A fresh parser and the events of the prefilled text (a forced call's announcement)."""
        p = ChatParser(self.fmt, self.tools, parse_tools=self.choice.mode != "none",
                       start_in_reasoning=self.start_in_reasoning, id_prefix=id_prefix)
        return p, p.feed(self.prefill) if self.prefill else []


def _fold_system(messages: list[dict]) -> list[dict]:
    """The Qwen templates take one system turn, first. System messages before the first assistant
    turn (Claude Code sends one there) join it, in order; a later one stays where it was, as a user
    turn wrapped in <system-reminder> tags: moving it to the top would change the start of the
    prompt, and with it every cached block of the conversation (mtplx/prefix)."""
    first_answer = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    system = [m["content"] for m in messages[:first_answer] if m["role"] == "system" and m.get("content")]
    out = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    for i, m in enumerate(messages):
        if m["role"] != "system":
            out.append(m)
        elif i > first_answer and m.get("content"):
            out.append({"role": "user", "content": f"<system-reminder>\n{m['content']}\n</system-reminder>"})
    return out


def _check_history(messages: list[dict], tools: list[Tool]) -> None:
    names = {t.name for t in tools}
    open_ids: set[str] = set()
    for i, m in enumerate(messages):
        for j, call in enumerate(m.get("tool_calls") or []):
            if names and call.name not in names:
                raise ToolSpecError(f"'messages.{i}.tool_calls.{j}': the call names tool {call.name!r}, which is not "
                                    f"among the request's tools ({', '.join(sorted(names))})",
                                    f"messages.{i}.tool_calls.{j}")
            open_ids.add(call.id)
        if m["role"] == "tool":
            cid = m.get("tool_call_id")
            if cid not in open_ids:
                raise ToolSpecError(f"'messages.{i}': a tool result for call id {cid!r}, but no earlier assistant "
                                    f"turn made a call with that id", f"messages.{i}.tool_call_id")


def _template_message(m: dict) -> dict:
    out = {"role": m["role"], "content": m.get("content") or ""}
    if m.get("reasoning_content"):
        out["reasoning_content"] = m["reasoning_content"]
    if m.get("tool_calls"):
        out["tool_calls"] = [{"type": "function", "id": c.id, "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m["tool_calls"]]
    if m["role"] == "tool":
        out["tool_call_id"] = m.get("tool_call_id")
    return out


def build_prompt(render: Render, template: str | None, messages: list[dict], tools: list[Tool],
                 choice: ToolChoice, chat_kwargs: dict | None = None) -> ChatPrompt:
    fmt = detect_format(template)
    if tools and fmt.tool_format is None:
        raise ToolSpecError("this model's chat template does not render tools (it has no <tool_call> format): "
                            "start the server with --chat-template qwen3.5 (XML calls) or --chat-template qwen3 "
                            "(JSON calls), or send the request without 'tools'", "tools")
    messages = _fold_system(messages)
    _check_history(messages, tools)
    text = render([_template_message(m) for m in messages],
                  tools=[t.template_dict() for t in tools] or None, **(chat_kwargs or {}))
    in_reasoning = fmt.thinking and text.endswith((THINK_OPEN + "\n", THINK_OPEN))
    prefill, stops = "", []
    if tools and choice.mode in ("required", "named"):
        prefill = (THINK_CLOSE + "\n\n" if in_reasoning else "") + fmt.call_prefix(choice.name)
    if tools and choice.mode != "none" and (not choice.parallel or choice.mode == "named"):
        stops.append(CALL_CLOSE)  # one call: generation ends as it closes (the parser is told)
    grammar = None
    if prefill and CALL_CLOSE in stops:  # one forced call: its arguments follow the tool's schema
        grammar = forced_call_grammar(fmt.tool_format, tools, choice.name if choice.mode == "named" else None)
    return ChatPrompt(text + prefill, fmt, tools, choice, in_reasoning, prefill, stops, grammar)

