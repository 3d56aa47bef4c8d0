"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mtplx.chat.events import ReasoningDelta, TextDelta, ToolCallArgs, ToolCallStart
from mtplx.chat.tools import ToolCall, log_skipped, openai_tool_choice, openai_tools
from mtplx.server.chat import ChatFinish, Conversation, TokenLogprobs, chat_events, collect_chat, start_chat
from mtplx.server.common import (
    APIError, DoneEvent, SSEResponse, StepEvent, collect, job_events, make_params, new_id, note_request, now,
    resolve_max_tokens, tokenize, sse_data, submit, timings,
)
from mtplx.server.engine import GenStats
from mtplx.server.errors import error_body
from mtplx.server.logprobs import chat_entries, completion_logprobs
from mtplx.server.structured import grammar_for
from mtplx.server.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, TextPart

router = APIRouter()


def _state(request: Request):
    return request.app.state.mtplx


def _unsupported(req, chat: bool) -> None:
    if req.n not in (None, 1):
        raise APIError(400, "n > 1 is not supported: this server returns exactly one choice (n=1)", param="n")
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if not chat:
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of not in (None, 1):
            raise APIError(400, "best_of > 1 is not supported", param="best_of")


def _text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    chunks = []
    for j, part in enumerate(content):
        if not isinstance(part, TextPart):
            raise APIError(400, f"content part type '{part.type}' is not supported (text only)",
                           param=f"{where}.{j}")
        chunks.append(part.text)
    return "".join(chunks)


def parse_arguments(raw: str | dict, where: str) -> dict:
    """A call's `arguments` JSON string (from the history) -> an object; "" means no arguments."""
    if isinstance(raw, dict):
        return raw
    if not raw.strip():
        return {}
    try:
        args = json.loads(raw)
    except ValueError:
        raise APIError(400, f"'{where}': expected the arguments as a JSON object in a string, found invalid JSON",
                       param=where) from None
    if not isinstance(args, dict):
        raise APIError(400, f"'{where}': expected a JSON object, found {type(args).__name__}", param=where)
    return args


def _messages(messages: list[ChatMessage]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        msg = {"role": "system" if m.role == "developer" else m.role, "content": _text(m.content, f"messages.{i}.content")}
        if m.role == "assistant":
            reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
            if reasoning:
                msg["reasoning_content"] = reasoning
            msg["tool_calls"] = [
                ToolCall(c.id or f"call_{i}_{j}", c.function.name,
                         parse_arguments(c.function.arguments, f"messages.{i}.tool_calls.{j}.function.arguments"))
                for j, c in enumerate(m.tool_calls or [])]
        elif m.tool_calls:
            raise APIError(400, f"'messages.{i}.tool_calls': only assistant messages carry tool calls",
                           param=f"messages.{i}.tool_calls")
        if m.role == "tool":
            if not m.tool_call_id:
                raise APIError(400, f"'messages.{i}.tool_call_id' is required: the id of the call this result answers",
                               param=f"messages.{i}.tool_call_id")
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _chat_kwargs(body: ChatCompletionRequest) -> dict:
    kwargs = dict(body.chat_template_kwargs or {})
    if body.reasoning_effort == "none" and "enable_thinking" not in kwargs:
        kwargs["enable_thinking"] = False
    return kwargs


def conversation(body: ChatCompletionRequest) -> Conversation:
    tools, skipped = openai_tools(body.tools)
    log_skipped(skipped, "chat.completions")
    choice = openai_tool_choice(body.tool_choice, tools, body.parallel_tool_calls)
    return Conversation(_messages(body.messages), tools, choice, _chat_kwargs(body))


def _stops(stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _usage(prompt_tokens: int, completion_tokens: int, stats: GenStats | None) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens if stats else 0}}


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


@router.get("/v1/models")
async def list_models(request: Request):
    st = _state(request)
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": st.created, "owned_by": "mtplx",
         "max_model_len": st.engine.model.max_context, "mtp_depth": st.engine.depth} for name in st.aliases]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    st = _state(request)
    if model_id not in st.aliases:
        raise APIError(404, f"The model '{model_id}' does not exist; this server serves {', '.join(map(repr, st.aliases))}",
                       param="model", code="model_not_found")
    return {"id": model_id, "object": "model", "created": st.created, "owned_by": "mtplx"}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    st = _state(request)
    _unsupported(body, chat=True)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    sampling = dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                    seed=body.seed, stop=_stops(body.stop), ignore_eos=body.ignore_eos, **_extras(st, body),
                    logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                    grammar=grammar_for(st.engine.model, body.response_format))
    run = await start_chat(st, conversation(body), requested, sampling)
    cid, created = new_id("chatcmpl-"), now()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSEResponse(_chat_stream(run, cid, created, st, include_usage, request), on_close=run.job.cancel)
    out = await collect_chat(run, request, st.metrics)
    note_request(request, out.finish.stats)
    lp = {"content": chat_entries(st.engine.model, out.logprobs)} if body.logprobs else None
    message: dict[str, Any] = {"role": "assistant", "content": out.text if out.text or not out.calls else None}
    if out.reasoning:
        message["reasoning_content"] = out.reasoning
    if out.calls:
        message["tool_calls"] = [_call_json(c) for c in out.calls]
    return JSONResponse({
        "id": cid, "object": "chat.completion", "created": created, "model": st.model_id,
        "system_fingerprint": st.fingerprint,
        "choices": [{"index": 0, "message": message, "logprobs": lp, "finish_reason": out.finish.reason}],
        "usage": _usage(len(run.prompt_ids), out.finish.completion_tokens, out.finish.stats),
        "timings": timings(out.finish.stats),
    })


def _extras(st, body) -> dict:
    """Penalties (OpenAI presence / frequency; vLLM's repetition_penalty)."""
    return dict(presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty)


def _call_json(c: ToolCall) -> dict:
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}


def _chunk(cid: str, created: int, model_id: str, obj: str, include_usage: bool, choice: dict | None, **extra) -> dict:
    c: dict[str, Any] = {"id": cid, "object": obj, "created": created, "model": model_id,
                         "system_fingerprint": None, "choices": [{"index": 0, **choice}] if choice else []}
    if include_usage:
        c["usage"] = None
    c.update(extra)
    return c


def _chat_delta(ev) -> dict | None:
    if isinstance(ev, TextDelta):
        return {"content": ev.text}
    if isinstance(ev, ReasoningDelta):
        return {"reasoning_content": ev.text}
    if isinstance(ev, ToolCallStart):
        return {"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                "function": {"name": ev.name, "arguments": ""}}]}
    if isinstance(ev, ToolCallArgs):
        return {"tool_calls": [{"index": ev.index, "function": {"arguments": ev.fragment}}]}
    return None  # ToolCallEnd: its pieces were already sent


async def _chat_stream(run, cid, created, st, include_usage, request):
    def chunk(choice, **extra):
        return _chunk(cid, created, st.model_id, "chat.completion.chunk", include_usage, choice, **extra)

    yield sse_data(chunk({"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}))
    try:
        async for ev in chat_events(run, metrics=st.metrics):
            if isinstance(ev, ChatFinish):
                note_request(request, ev.stats)
                yield sse_data(chunk({"delta": {}, "logprobs": None, "finish_reason": ev.reason},
                                     timings=timings(ev.stats)))
                if include_usage:
                    yield sse_data(chunk(None, usage=_usage(len(run.prompt_ids), ev.completion_tokens, ev.stats),
                                         timings=timings(ev.stats)))
                continue
            if isinstance(ev, TokenLogprobs):  # the step's tokens, before the text they make
                yield sse_data(chunk({"delta": {}, "logprobs": {"content": chat_entries(st.engine.model, ev.entries)},
                                      "finish_reason": None}))
                continue
            delta = _chat_delta(ev)
            if delta is not None:
                yield sse_data(chunk({"delta": delta, "logprobs": None, "finish_reason": None}))
    except APIError as e:
        yield sse_data(error_body(request.url.path, e.status, e.message))
    yield "data: [DONE]\n\n"


async def _completion_stream(job, cid, created, model_id, include_usage, request, model=None, echo: str = ""):
    def chunk(choice, **extra):
        return _chunk(cid, created, model_id, "text_completion", include_usage, choice, **extra)

    n, offset = 0, len(echo)
    if echo:
        yield sse_data(chunk({"text": echo, "logprobs": None, "finish_reason": None}))
    try:
        async for ev in job_events(job):
            if isinstance(ev, StepEvent):
                n += len(ev.step.token_ids)
                lp = None
                if ev.step.logprobs is not None:
                    lp = completion_logprobs(model, ev.step.logprobs, offset)
                offset += len(ev.step.text)
                if ev.step.text or lp is not None:
                    yield sse_data(chunk({"text": ev.step.text, "logprobs": lp, "finish_reason": None}))
            elif isinstance(ev, DoneEvent):
                note_request(request, ev.stats)
                yield sse_data(chunk({"text": "", "logprobs": None, "finish_reason": _finish(ev.finish_reason)},
                                     timings=timings(ev.stats)))
                if include_usage:
                    yield sse_data(chunk(None, usage=_usage(len(job.prompt_ids), ev.stats.generated_tokens or n, ev.stats),
                                         timings=timings(ev.stats)))
    except APIError as e:
        yield sse_data(error_body(request.url.path, e.status, e.message))
    yield "data: [DONE]\n\n"


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    st = _state(request)
    _unsupported(body, chat=False)
    model = st.engine.model
    if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], int):
        vocab = getattr(model, "vocab_size", None)
        if vocab is not None and any(not 0 <= t < vocab for t in body.prompt):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        prompt_ids = list(body.prompt)
    else:
        text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        prompt_ids = await tokenize(model.encode, text)
    if not prompt_ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    max_tokens = resolve_max_tokens(body.max_tokens, len(prompt_ids), model.max_context, st.max_tokens_cap)
    if body.max_tokens is None and st.max_tokens_cap is None:
        max_tokens = min(max_tokens, 16)  # OpenAI's legacy default for /v1/completions
    params = make_params(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                         seed=body.seed, max_tokens=max_tokens, stop=_stops(body.stop), ignore_eos=body.ignore_eos,
                         logprobs=body.logprobs, **_extras(st, body))
    if body.echo and body.logprobs is not None:
        params.prompt_logprobs = body.logprobs
    job = submit(st.engine, prompt_ids, params)
    cid, created = new_id("cmpl-"), now()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        echo = model.tokenizer.decode(prompt_ids, skip_special_tokens=False) if body.echo and hasattr(
            model, "tokenizer") else ""
        return SSEResponse(_completion_stream(job, cid, created, st.model_id, include_usage, request, model, echo),
                           on_close=job.cancel)
    out = await collect(job, request)
    note_request(request, out.stats)
    text, lp = out.text, None
    if body.echo:
        echoed = model.tokenizer.decode(prompt_ids, skip_special_tokens=False) if hasattr(model, "tokenizer") else ""
        text = echoed + text
    if body.logprobs is not None:
        prompt_lp = ([(prompt_ids[0], None, [])] + (out.prompt_logprobs or [])) if body.echo else None
        lp = completion_logprobs(model, out.logprobs, 0, prompt_lp)
    return JSONResponse({
        "id": cid, "object": "text_completion", "created": created, "model": st.model_id,
        "system_fingerprint": st.fingerprint,
        "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": _finish(out.finish_reason)}],
        "usage": _usage(len(prompt_ids), out.completion_tokens, out.stats),
        "timings": timings(out.stats),
    })

