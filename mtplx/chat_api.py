"""One chat turn through the Python API: messages (+ tools) in, text, reasoning and tool calls out.

    reply = mtplx.chat(model, [{"role": "user", "content": "Weather in Oslo?"}], tools=[...])
    reply.content, reply.reasoning, reply.tool_calls  # [ToolCall(id, name, arguments)]

The same prompt building (chat template, tools block, thinking) and the same incremental
parser as the server's chat routes, over `mtplx.generate`: the tokens are what the server
would generate for the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtplx.chat.events import ReasoningDelta, TextDelta, ToolCallEnd
from mtplx.chat.prompt import build_prompt
from mtplx.chat.tools import ToolCall, ToolChoice, openai_tools
from mtplx.decoding.params import SamplingParams


@dataclass
class ChatReply:
    content: str
    reasoning: str
    tool_calls: list[ToolCall]
    finish_reason: str  # "stop", "length" or "tool_calls"
    result: object  # the GenerationResult (token ids, stats)
    failures: list[str] = field(default_factory=list)  # malformed calls the parser gave back as text


def chat(model, messages: list[dict], tools: list[dict] | None = None, params: SamplingParams | None = None,
         depth: int | None = None, **template_kwargs) -> ChatReply:
    """One assistant turn. `tools` in the Chat Completions form; template_kwargs reach the
    chat template (e.g. enable_thinking=True)."""
    from mtplx.api import generate

    tok = model._tok("mtplx.chat")
    parsed, _ = openai_tools(tools)
    prompt = build_prompt(
        lambda msgs, tools=None, **kw: tok.apply_chat_template(msgs, add_generation_prompt=True, tools=tools, **kw),
        tok.chat_template, messages, parsed, ToolChoice("auto" if parsed else "none"), template_kwargs)
    result = generate(model, tok.encode(prompt.text, add_special_tokens=False), params, depth)
    parser, events = prompt.parser()
    events += parser.feed(result.text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, TextDelta))
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    calls = [e.call for e in events if isinstance(e, ToolCallEnd) and e.complete]
    finish = "tool_calls" if calls and result.finish_reason == "stop" else result.finish_reason
    return ChatReply(content.strip(), reasoning.strip(), calls, finish, result, list(parser.failures))
