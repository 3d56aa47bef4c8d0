"""OpenAI Responses API: POST /v1/responses (stream and not). What Codex CLI speaks.

In: `input` as a string or items (message, function_call, function_call_output, custom_tool_call,
custom_tool_call_output, reasoning), `instructions`, function and custom `tools` (hosted tools
are skipped: this server cannot run them), `tool_choice`, `max_output_tokens`, temperature /
top_p. Nothing is stored: `store` is accepted, `previous_response_id` is refused.
Out: reasoning, message (output_text) and function_call / custom_tool_call items; the stream is
the documented typed event sequence, response.created ... response.completed (or .incomplete).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mtplx.chat.events import ReasoningDelta, TextDelta, ToolCallArgs, ToolCallEnd, ToolCallStart
from mtplx.chat.tools import ToolCall, log_skipped, openai_tool_choice, responses_tools
from mtplx.server.chat import ChatFinish, Conversation, chat_events, start_chat
from mtplx.server.common import APIError, SSEResponse, new_id, note_request, sse_event, text_of_parts, timings
from mtplx.server.openai_routes import parse_arguments
from mtplx.server.schemas import ResponsesRequest

router = APIRouter()


# ---- input items -> conversation -----------------------------------------------------------
TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")


def _content_text(content: Any, where: str) -> str:
    return text_of_parts(content, where, TEXT_PARTS)


def _str_field(item: dict, key: str, where: str) -> str:
    v = item.get(key)
    if not isinstance(v, str) or not v:
        raise APIError(400, f"'{where}.{key}' is required (a non-empty string)", param=f"{where}.{key}")
    return v


class _History:
    """Folds Responses items into template messages: consecutive assistant output (reasoning, text,
    calls) becomes one assistant turn, outputs become tool results."""

    def __init__(self):
        self.messages: list[dict] = []
        self.reasoning: list[str] = []
        self.call_ids: set[str] = set()

    def _assistant(self) -> dict:
        last = self.messages[-1] if self.messages else None
        if last is None or last["role"] != "assistant" or self.reasoning:
            last = {"role": "assistant", "content": "", "tool_calls": []}
            if self.reasoning:
                last["reasoning_content"] = "\n".join(self.reasoning)
                self.reasoning = []
            self.messages.append(last)
        return last

    def add(self, item: dict, where: str) -> None:
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(400, f"'{where}.role': expected user, assistant, system or developer, found {role!r}",
                               param=f"{where}.role")
            text = _content_text(item.get("content"), f"{where}.content")
            if role == "assistant":
                msg = self._assistant()
                if msg["content"] or msg["tool_calls"]:
                    msg = {"role": "assistant", "content": "", "tool_calls": []}
                    self.messages.append(msg)
                msg["content"] = text
            else:
                self.messages.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind in ("function_call", "custom_tool_call"):
            call_id = _str_field(item, "call_id", where)
            name = _str_field(item, "name", where)
            if kind == "function_call":
                args = parse_arguments(item.get("arguments", ""), f"{where}.arguments")
            else:
                args = {"input": item.get("input") if isinstance(item.get("input"), str) else ""}
            self._assistant()["tool_calls"].append(ToolCall(call_id, name, args))
            self.call_ids.add(call_id)
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = _str_field(item, "call_id", where)
            if call_id not in self.call_ids:
                raise APIError(400, f"'{where}': an output for call_id {call_id!r}, but no earlier function_call item "
                                    f"has that call_id", param=f"{where}.call_id")
            out = item.get("output")
            self.messages.append({"role": "tool", "tool_call_id": call_id,
                                  "content": out if isinstance(out, str) else _content_text(out, f"{where}.output")})
        elif kind == "reasoning":
            text = _content_text(item.get("content"), f"{where}.content") or \
                _content_text(item.get("summary"), f"{where}.summary")
            if text:
                self.reasoning.append(text)
        else:
            raise APIError(400, f"'{where}.type': input item type {kind!r} is not supported (message, function_call, "
                                f"function_call_output, custom_tool_call, custom_tool_call_output, reasoning)",
                           param=f"{where}.type")


def conversation(body: ResponsesRequest) -> Conversation:
    if body.previous_response_id:
        raise APIError(400, "previous_response_id is not supported: this server stores no responses; send the whole "
                            "conversation in 'input' (and 'store': false)", param="previous_response_id")
    fmt = (body.text or {}).get("format") or {"type": "text"}
    if fmt.get("type") != "text":
        raise APIError(400, "only text output is supported ('text.format.type': 'text')", param="text.format")
    history = _History()
    if body.instructions:
        history.messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        history.messages.append({"role": "user", "content": body.input})
    else:
        for i, item in enumerate(body.input):
            if not isinstance(item, dict):
                raise APIError(400, f"'input.{i}': expected an item object", param=f"input.{i}")
            history.add(item, f"input.{i}")
    if not any(m["role"] != "system" for m in history.messages):
        raise APIError(400, "'input' holds no message to answer", param="input")
    tools, skipped = responses_tools(body.tools)
    log_skipped(skipped, "responses")
    choice = openai_tool_choice(body.tool_choice, tools, body.parallel_tool_calls, flat=True)
    effort = (body.reasoning or {}).get("effort")
    kwargs = {"enable_thinking": False} if effort == "none" else {}
    return Conversation(history.messages, tools, choice, kwargs)


# ---- chat events -> output items and stream events -----------------------------------------
class _Output:
    """Builds the response's output items from chat events, and the stream events that announce them."""

    def __init__(self, tools_by_name: dict):
        self.items: list[dict] = []
        self.tools = tools_by_name
        self.open: dict | None = None  # the item being written (reasoning or message)
        self.calls: dict[int, dict] = {}  # call index -> its item

    def _add(self, item: dict) -> list[tuple[str, dict]]:
        self.items.append(item)
        return [("response.output_item.added", {"output_index": len(self.items) - 1, "item": dict(item)})]

    def _done(self, item: dict) -> tuple[str, dict]:
        return "response.output_item.done", {"output_index": self.items.index(item), "item": item}

    def close(self) -> list[tuple[str, dict]]:
        item, self.open = self.open, None
        if item is None:
            return []
        idx = self.items.index(item)
        item["status"] = "completed"
        if item["type"] == "reasoning":
            text = item["content"][0]["text"]
            return [("response.reasoning_text.done", {"item_id": item["id"], "output_index": idx, "content_index": 0,
                                                      "text": text}), self._done(item)]
        part = item["content"][0]
        return [("response.output_text.done", {"item_id": item["id"], "output_index": idx, "content_index": 0,
                                               "text": part["text"], "logprobs": []}),
                ("response.content_part.done", {"item_id": item["id"], "output_index": idx, "content_index": 0,
                                                "part": part}), self._done(item)]

    def _ensure(self, kind: str) -> list[tuple[str, dict]]:
        if self.open is not None and self.open["type"] == kind:
            return []
        out = self.close()
        if kind == "reasoning":
            item = {"type": "reasoning", "id": new_id("rs_"), "summary": [],
                    "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"}
            out += self._add(item)
        else:
            item = {"type": "message", "id": new_id("msg_"), "role": "assistant", "status": "in_progress",
                    "content": []}
            out += self._add(item)
            item["content"].append({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            out.append(("response.content_part.added", {"item_id": item["id"], "output_index": len(self.items) - 1,
                                                        "content_index": 0, "part": dict(item["content"][0])}))
        self.open = item
        return out

    def feed(self, ev) -> list[tuple[str, dict]]:
        if isinstance(ev, (ReasoningDelta, TextDelta)):
            kind = "reasoning" if isinstance(ev, ReasoningDelta) else "message"
            out = self._ensure(kind)
            item = self.open
            item["content"][0]["text"] += ev.text
            name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
            body = {"item_id": item["id"], "output_index": self.items.index(item), "content_index": 0,
                    "delta": ev.text}
            if kind == "message":
                body["logprobs"] = []
            return out + [(name, body)]
        if isinstance(ev, ToolCallStart):
            out = self.close()
            tool = self.tools.get(ev.name)
            if tool is not None and tool.kind == "custom":
                item = {"type": "custom_tool_call", "id": new_id("ctc_"), "call_id": ev.id, "name": ev.name,
                        "input": "", "status": "in_progress"}
            else:
                item = {"type": "function_call", "id": new_id("fc_"), "call_id": ev.id, "name": ev.name,
                        "arguments": "", "status": "in_progress"}
            if tool is not None and tool.namespace:
                item["namespace"] = tool.namespace
            self.calls[ev.index] = item
            return out + self._add(item)
        if isinstance(ev, ToolCallArgs):
            item = self.calls[ev.index]
            if item["type"] != "function_call":
                return []  # a custom tool's input is sent whole when the call ends
            item["arguments"] += ev.fragment
            return [("response.function_call_arguments.delta", {"item_id": item["id"],
                     "output_index": self.items.index(item), "delta": ev.fragment})]
        if isinstance(ev, ToolCallEnd):
            item = self.calls[ev.index]
            idx = self.items.index(item)
            item["status"] = "completed" if ev.complete else "incomplete"
            if item["type"] == "custom_tool_call":
                item["input"] = str(ev.call.arguments.get("input", ""))
                return [("response.custom_tool_call_input.delta", {"item_id": item["id"], "output_index": idx,
                                                                    "delta": item["input"]}),
                        ("response.custom_tool_call_input.done", {"item_id": item["id"], "output_index": idx,
                                                                   "input": item["input"]}), self._done(item)]
            if ev.complete:
                item["arguments"] = ev.call.arguments_json
            return [("response.function_call_arguments.done", {"item_id": item["id"], "output_index": idx,
                                                                "name": item["name"], "arguments": item["arguments"]}),
                    self._done(item)]
        return []


def _response(rid: str, created: int, st, body: ResponsesRequest, output: list, status: str,
              finish: ChatFinish | None, prompt_tokens: int) -> dict:
    usage = None
    if finish is not None:
        cache = {"cached_tokens": finish.stats.cached_tokens, "cache_write_tokens": finish.stats.cache_write_tokens}
        usage = {"input_tokens": prompt_tokens, "input_tokens_details": cache,
                 "output_tokens": finish.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": prompt_tokens + finish.completion_tokens}
    resp = {
        "id": rid, "object": "response", "created_at": created, "status": status, "model": st.model_id,
        "output": output, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "parallel_tool_calls": body.parallel_tool_calls is not False, "previous_response_id": None,
        "reasoning": body.reasoning, "store": bool(body.store), "temperature": body.temperature,
        "text": {"format": {"type": "text"}}, "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
        "top_p": body.top_p, "truncation": "disabled", "metadata": body.metadata or {}, "usage": usage,
    }
    if finish is not None:
        resp["timings"] = timings(finish.stats)
    return resp


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, request: Request):
    st = request.app.state.mtplx
    conv = conversation(body)
    sampling = dict(temperature=body.temperature, top_p=body.top_p, top_k=None, min_p=None, seed=None, stop=[])
    run = await start_chat(st, conv, body.max_output_tokens, sampling)
    rid, created = new_id("resp_"), int(time.time())
    output = _Output({t.name: t for t in conv.tools})
    if body.stream:
        return SSEResponse(_stream(run, rid, created, st, body, output, request), on_close=run.job.cancel)
    finish = None
    async for ev in chat_events(run, request, st.metrics):
        if isinstance(ev, ChatFinish):
            finish = ev
        else:
            output.feed(ev)
    if finish is None:
        raise APIError(499, "client disconnected")
    output.close()
    note_request(request, finish.stats)
    status = "incomplete" if finish.reason == "length" else "completed"
    return JSONResponse(_response(rid, created, st, body, output.items, status, finish, len(run.prompt_ids)))


async def _stream(run, rid: str, created: int, st, body: ResponsesRequest, output: _Output, request: Request):
    seq = 0

    def event(name: str, data: dict) -> str:
        nonlocal seq
        seq += 1
        return sse_event(name, {"type": name, "sequence_number": seq - 1, **data})

    start = _response(rid, created, st, body, [], "in_progress", None, len(run.prompt_ids))
    yield event("response.created", {"response": start})
    yield event("response.in_progress", {"response": start})
    try:
        async for ev in chat_events(run, metrics=st.metrics):
            if isinstance(ev, ChatFinish):
                for name, data in output.close():
                    yield event(name, data)
                note_request(request, ev.stats)
                status = "incomplete" if ev.reason == "length" else "completed"
                final = _response(rid, created, st, body, output.items, status, ev, len(run.prompt_ids))
                yield event("response.incomplete" if status == "incomplete" else "response.completed",
                            {"response": final})
                continue
            for name, data in output.feed(ev):
                yield event(name, data)
    except APIError as e:
        failed = _response(rid, created, st, body, output.items, "failed", None, len(run.prompt_ids))
        failed["error"] = {"code": "server_error", "message": e.message}
        yield event("error", {"code": "server_error", "message": e.message, "param": None})
        yield event("response.failed", {"response": failed})
