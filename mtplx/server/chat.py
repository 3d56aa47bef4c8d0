"""The one generation path of every chat-style API (OpenAI chat, Anthropic messages, Responses).

    conv = Conversation(messages, tools, choice, chat_kwargs)       # built by each API from its own wire format
    run = await start_chat(st, conv, requested_max_tokens, sampling)  # prompt built off the event loop, job queued
    async for ev in chat_events(run, request): ...                  # TextDelta / ReasoningDelta / ToolCall* / ChatFinish
    result = await collect_chat(run, request)                        # the same events, gathered (non-streaming)

Each API only renders these events in its own wire format.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from starlette.requests import Request

from mtplx.chat.events import ReasoningDelta, TextDelta, ToolCallEnd
from mtplx.chat.formats import CALL_CLOSE
from mtplx.chat.prompt import ChatPrompt, build_prompt
from mtplx.chat.tools import Tool, ToolCall, ToolChoice
from mtplx.server.common import DoneEvent, StepEvent, job_events, make_params, resolve_max_tokens, submit, tokenize
from mtplx.server.engine import GenStats, Job
from mtplx.server.errors import APIError

log = logging.getLogger("mtplx.server")


@dataclass
class Conversation:
    messages: list[dict]  # role, content (text), reasoning_content, tool_calls [ToolCall], tool_call_id
    tools: list[Tool] = field(default_factory=list)
    choice: ToolChoice = field(default_factory=lambda: ToolChoice("none"))
    chat_kwargs: dict = field(default_factory=dict)


@dataclass
class ChatRun:
    job: Job
    prompt: ChatPrompt
    prompt_ids: list[int]
    id_prefix: str
    api_stops: list[str]  # the request's own stop strings (the others are the chat format's)


@dataclass
class ChatFinish:
    reason: str  # "stop" | "length" | "tool_calls" | "cancelled"
    stop_sequence: str | None  # the request's own stop string that ended the text
    stats: GenStats
    completion_tokens: int
    calls: list[ToolCall]
    failures: list[str]


@dataclass
class ChatResult:
    text: str
    reasoning: str
    calls: list[ToolCall]
    finish: ChatFinish
    logprobs: list = field(default_factory=list)  # (id, logprob, top) per generated token, when asked


@dataclass
class TokenLogprobs:
    """The log-probabilities of a step's tokens (before the events of the text they make)."""

    entries: list


def _build(model, conv: Conversation) -> tuple[list[int], ChatPrompt]:
    prompt = build_prompt(model.render_chat, model.chat_template, conv.messages, conv.tools, conv.choice,
                          conv.chat_kwargs)
    return model.encode_chat(prompt.text), prompt


async def count_prompt_tokens(st, conv: Conversation) -> int:
    ids, _ = await tokenize(_build, st.engine.model, conv)
    return len(ids)


async def start_chat(st, conv: Conversation, requested: int | None, sampling: dict[str, Any],
                     *, id_prefix: str = "call_") -> ChatRun:
    prompt_ids, prompt = await tokenize(_build, st.engine.model, conv)
    max_tokens = resolve_max_tokens(requested, len(prompt_ids), st.engine.model.max_context, st.max_tokens_cap)
    stops = list(sampling.pop("stop", None) or [])
    if prompt.call_grammar and sampling.get("grammar") is None:
        sampling["grammar"] = _call_grammar(st.engine.model, prompt.call_grammar)
    params = make_params(max_tokens=max_tokens, stop=stops + [s for s in prompt.stops if s not in stops], **sampling)
    return ChatRun(submit(st.engine, prompt_ids, params), prompt, prompt_ids, id_prefix, stops)


def _call_grammar(model, lark: str):
    """A forced call's argument grammar for this model, or None (logged) when it cannot be built:
    the call is then generated unconstrained and parsed as always."""
    compile_lark = getattr(model, "compile_lark", None)
    if compile_lark is None:
        return None
    try:
        return compile_lark(lark)
    except Exception as e:  # noqa: BLE001 - a schema the grammar engine cannot express
        log.warning("forced tool call: arguments not constrained (%s: %s)", type(e).__name__, str(e)[:200])
        return None


async def chat_events(run: ChatRun, request: Request | None = None, metrics=None) -> AsyncIterator[Any]:
    """The run's chat events, then one ChatFinish. Raises APIError when the generation fails."""
    parser, first = run.prompt.parser(run.id_prefix)
    for ev in first:
        yield ev
    n = 0
    async for ev in job_events(run.job, request):
        if isinstance(ev, StepEvent):
            n += len(ev.step.token_ids)
            if ev.step.logprobs:
                yield TokenLogprobs(ev.step.logprobs)
            for out in parser.feed(ev.step.text):
                yield out
        elif isinstance(ev, DoneEvent):
            stop_seq = ev.stop_sequence
            if stop_seq == CALL_CLOSE and CALL_CLOSE in run.prompt.stops and CALL_CLOSE not in run.api_stops:
                for out in parser.feed(CALL_CLOSE):  # the one call the request wanted is complete
                    yield out
                stop_seq = None
            for out in parser.finish():
                yield out
            reason = ev.finish_reason
            if reason == "stop" and parser.calls:
                reason = "tool_calls"
            if metrics is not None:
                metrics.record_tool_calls(len(parser.calls), parser.failures)
            yield ChatFinish(reason, stop_seq if ev.finish_reason == "stop" else None, ev.stats,
                             ev.stats.generated_tokens or n, list(parser.calls), list(parser.failures))


async def collect_chat(run: ChatRun, request: Request, metrics=None) -> ChatResult:
    text, reasoning, lps = [], [], []
    async for ev in chat_events(run, request, metrics):
        if isinstance(ev, TokenLogprobs):
            lps += ev.entries
        elif isinstance(ev, TextDelta):
            text.append(ev.text)
        elif isinstance(ev, ReasoningDelta):
            reasoning.append(ev.text)
        elif isinstance(ev, ToolCallEnd) and not ev.complete:
            text.append(ev.raw)  # an unfinished call is shown as the text it is
        elif isinstance(ev, ChatFinish):
            return ChatResult("".join(text), "".join(reasoning), ev.calls, ev, lps)
    raise APIError(499, "client disconnected")
