"""Anthropic-compatible routes: /v1/messages (stream and not), /v1/messages/count_tokens.

Content blocks in: text, tool_use (assistant), tool_result (user; string or block content,
is_error), thinking / redacted_thinking (assistant). Out: thinking, text and tool_use blocks,
`stop_reason: "tool_use"`; streams send content_block_start/delta/stop per block
(thinking_delta + signature_delta, text_delta, input_json_delta).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mtplx.chat.events import ReasoningDelta, TextDelta, ToolCallArgs, ToolCallEnd, ToolCallStart
from mtplx.chat.tools import ToolCall, anthropic_tool_choice, anthropic_tools, log_skipped
from mtplx.server.chat import ChatFinish, Conversation, chat_events, collect_chat, count_prompt_tokens, start_chat
from mtplx.server.common import APIError, SSEResponse, new_id, note_request, sse_event, text_of_parts, timings
from mtplx.server.errors import error_body
from mtplx.server.schemas import AMessage, ATextBlock, CountTokensRequest, MessagesRequest

router = APIRouter()
SIGNATURE = ""  # thinking blocks carry a signature field; a local model has nothing to sign


def _extra(block) -> dict:
    return dict(block.model_extra or {})


def _system_text(system) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    return "".join(b.text for b in system)


def _other_blocks(m: AMessage, i: int, text: list[str]):
    """Message i's text blocks into `text`; yields (where, block, its fields) for the others."""
    for j, b in enumerate(m.content):
        if isinstance(b, ATextBlock):
            text.append(b.text)
        else:
            yield f"messages.{i}.content.{j}", b, _extra(b)


def _user_blocks(m: AMessage, i: int, open_ids: set[str]) -> list[dict]:
    out, text = [], []
    for where, b, x in _other_blocks(m, i, text):
        if b.type != "tool_result":
            raise APIError(400, f"'{where}': content block type '{b.type}' is not supported in a user turn "
                                f"(text and tool_result only)", param=where)
        tid = x.get("tool_use_id")
        if tid not in open_ids:
            raise APIError(400, f"'{where}': a tool_result for tool_use_id {tid!r}, but no earlier assistant "
                                f"message has a tool_use with that id", param=f"{where}.tool_use_id")
        body = text_of_parts(x.get("content"), f"{where}.content", ("text",), name_others=True)
        out.append({"role": "tool", "tool_call_id": tid, "content": ("[error] " + body) if x.get("is_error") else body})
    if text:
        out.append({"role": "user", "content": "".join(text)})
    return out


def _assistant_blocks(m: AMessage, i: int, open_ids: set[str]) -> dict:
    text, reasoning, calls = [], [], []
    for where, b, x in _other_blocks(m, i, text):
        if b.type == "thinking":
            reasoning.append(str(x.get("thinking") or ""))
        elif b.type == "redacted_thinking":
            continue
        elif b.type == "tool_use":
            tid, name, args = x.get("id"), x.get("name"), x.get("input", {})
            if not isinstance(tid, str) or not tid or not isinstance(name, str) or not isinstance(args, dict):
                raise APIError(400, f"'{where}': a tool_use block needs 'id' (string), 'name' (string) and 'input' "
                                    f"(object)", param=where)
            calls.append(ToolCall(tid, name, args))
            open_ids.add(tid)
        else:
            raise APIError(400, f"'{where}': content block type '{b.type}' is not supported in an assistant turn "
                                f"(text, thinking, tool_use)", param=where)
    msg = {"role": "assistant", "content": "".join(text), "tool_calls": calls}
    if reasoning:
        msg["reasoning_content"] = "\n".join(reasoning)
    return msg


def _messages(system, messages: list[AMessage]) -> list[dict]:
    out = [{"role": "system", "content": _system_text(system)}] if system else []
    open_ids: set[str] = set()
    for i, m in enumerate(messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
        elif m.role == "assistant":
            out.append(_assistant_blocks(m, i, open_ids))
        elif m.role == "system":
            out.append({"role": "system", "content": "".join(b.text for b in m.content if isinstance(b, ATextBlock))})
        else:
            out.extend(_user_blocks(m, i, open_ids))
    if all(m["role"] == "system" for m in out):
        raise APIError(400, "'messages' holds no user or assistant message to answer", param="messages")
    return out


def _thinking_kwargs(thinking: dict | None) -> dict:
    kind = (thinking or {}).get("type")
    if kind == "enabled":
        return {"enable_thinking": True}
    if kind == "disabled":
        return {"enable_thinking": False}
    return {}  # absent / adaptive: the template's own default


def conversation(body) -> Conversation:
    tools, skipped = anthropic_tools(body.tools)
    log_skipped(skipped, "messages")
    choice = anthropic_tool_choice(body.tool_choice, tools)
    return Conversation(_messages(body.system, body.messages), tools, choice, _thinking_kwargs(body.thinking))


def _stop_reason(finish: ChatFinish) -> str:
    if finish.reason == "length":
        return "max_tokens"
    if finish.reason == "tool_calls":
        return "tool_use"
    return "stop_sequence" if finish.stop_sequence else "end_turn"


def _usage(prompt_tokens: int, output_tokens: int, stats=None) -> dict:
    """Anthropic's split of the prompt: input_tokens + cache_read + cache_creation = the prompt."""
    read = stats.cached_tokens if stats else 0
    wrote = stats.cache_write_tokens if stats else 0
    return {"input_tokens": prompt_tokens - read - wrote, "output_tokens": output_tokens,
            "cache_creation_input_tokens": wrote, "cache_read_input_tokens": read}


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request):
    return {"input_tokens": await count_prompt_tokens(request.app.state.mtplx, conversation(body))}


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request):
    st = request.app.state.mtplx
    sampling = dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=None, seed=None,
                    stop=body.stop_sequences or [])
    run = await start_chat(st, conversation(body), body.max_tokens, sampling, id_prefix="toolu_")
    mid = new_id("msg_")
    if body.stream:
        return SSEResponse(_stream(run, mid, st, request), on_close=run.job.cancel)
    out = await collect_chat(run, request, st.metrics)
    note_request(request, out.finish.stats)
    content: list[dict] = []
    if out.reasoning:
        content.append({"type": "thinking", "thinking": out.reasoning, "signature": SIGNATURE})
    if out.text or not out.calls:
        content.append({"type": "text", "text": out.text})
    content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments} for c in out.calls]
    return JSONResponse({
        "id": mid, "type": "message", "role": "assistant", "model": st.model_id, "content": content,
        "stop_reason": _stop_reason(out.finish), "stop_sequence": out.finish.stop_sequence,
        "usage": _usage(len(run.prompt_ids), out.finish.completion_tokens, out.finish.stats),
        "timings": timings(out.finish.stats),
    })


class _Blocks:
    """Opens and closes the stream's content blocks as the events change kind."""

    def __init__(self):
        self.index = -1
        self.kind: str | None = None

    def close(self) -> list[str]:
        if self.kind is None:
            return []
        out = []
        if self.kind == "thinking":
            out.append(self._delta({"type": "signature_delta", "signature": SIGNATURE}))
        out.append(sse_event("content_block_stop", {"type": "content_block_stop", "index": self.index}))
        self.kind = None
        return out

    def open(self, kind: str, block: dict) -> list[str]:
        out = self.close()
        self.index += 1
        self.kind = kind
        out.append(sse_event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                     "content_block": block}))
        return out

    def _delta(self, delta: dict) -> str:
        return sse_event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def render(self, ev) -> list[str]:
        if isinstance(ev, ReasoningDelta):
            out = [] if self.kind == "thinking" else self.open("thinking", {"type": "thinking", "thinking": "",
                                                                             "signature": ""})
            return out + [self._delta({"type": "thinking_delta", "thinking": ev.text})]
        if isinstance(ev, TextDelta):
            out = [] if self.kind == "text" else self.open("text", {"type": "text", "text": ""})
            return out + [self._delta({"type": "text_delta", "text": ev.text})]
        if isinstance(ev, ToolCallStart):
            return self.open("tool_use", {"type": "tool_use", "id": ev.id, "name": ev.name, "input": {}})
        if isinstance(ev, ToolCallArgs):
            return [self._delta({"type": "input_json_delta", "partial_json": ev.fragment})]
        if isinstance(ev, ToolCallEnd):
            return self.close()
        return []


async def _stream(run, mid: str, st, request: Request):
    yield sse_event("message_start", {"type": "message_start", "message": {
        "id": mid, "type": "message", "role": "assistant", "model": st.model_id, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": _usage(len(run.prompt_ids), 0)}})
    blocks = _Blocks()
    ping = sse_event("ping", {"type": "ping"})  # after the first content_block_start, as the API does
    try:
        async for ev in chat_events(run, metrics=st.metrics):
            if isinstance(ev, ChatFinish):
                note_request(request, ev.stats)
                if blocks.index < 0:
                    for line in blocks.open("text", {"type": "text", "text": ""}):
                        yield line + ping
                for line in blocks.close():
                    yield line
                yield sse_event("message_delta", {
                    "type": "message_delta",
                    "delta": {"stop_reason": _stop_reason(ev), "stop_sequence": ev.stop_sequence},
                    "usage": _usage(len(run.prompt_ids), ev.completion_tokens, ev.stats),
                    "timings": timings(ev.stats)})
                yield sse_event("message_stop", {"type": "message_stop"})
                continue
            first = blocks.index < 0
            for line in blocks.render(ev):
                yield line + (ping if first and line.startswith("event: content_block_start") else "")
    except APIError as e:
        yield sse_event("error", error_body(request.url.path, e.status, e.message))
