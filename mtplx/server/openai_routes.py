"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mtplx.server.common import (
    APIError, DoneEvent, SSEResponse, StepEvent, collect, job_events, make_params, new_id, now,
    resolve_max_tokens, tokenize, sse_data, submit, timings,
)
from mtplx.server.errors import error_body
from mtplx.server.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, TextPart

router = APIRouter()


def _state(request: Request):
    return request.app.state.mtplx


def _unsupported(req, chat: bool) -> None:
    if req.n not in (None, 1):
        raise APIError(400, "n > 1 is not supported: this server returns exactly one choice (n=1)", param="n")
    if req.presence_penalty not in (None, 0, 0.0):
        raise APIError(400, "presence_penalty is not supported (use 0 or leave it out)", param="presence_penalty")
    if req.frequency_penalty not in (None, 0, 0.0):
        raise APIError(400, "frequency_penalty is not supported (use 0 or leave it out)", param="frequency_penalty")
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if chat:
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if req.top_logprobs:
            raise APIError(400, "top_logprobs is not supported", param="top_logprobs")
        if req.tools:
            raise APIError(400, "tools / function calling are not supported by this server yet", param="tools")
        if req.tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice is not supported by this server yet", param="tool_choice")
        rf = req.response_format
        if rf is not None and rf.get("type") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
    else:
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of not in (None, 1):
            raise APIError(400, "best_of > 1 is not supported", param="best_of")
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")


def _to_template(messages: list[ChatMessage]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if m.role == "tool" or m.tool_calls:
            raise APIError(400, "tool messages and tool_calls are not supported by this server yet",
                           param=f"messages.{i}")
        if m.content is None:
            text = ""
        elif isinstance(m.content, str):
            text = m.content
        else:
            chunks = []
            for j, part in enumerate(m.content):
                if not isinstance(part, TextPart):
                    raise APIError(400, f"content part type '{part.type}' is not supported (text only)",
                                   param=f"messages.{i}.content.{j}")
                chunks.append(part.text)
            text = "".join(chunks)
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": text})
    return out


def _stops(stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


@router.get("/v1/models")
async def list_models(request: Request):
    st = _state(request)
    return {"object": "list", "data": [
        {"id": st.model_id, "object": "model", "created": st.created, "owned_by": "mtplx",
         "max_model_len": st.engine.model.max_context, "mtp_depth": st.engine.depth}]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    st = _state(request)
    if model_id != st.model_id:
        raise APIError(404, f"The model '{model_id}' does not exist; this server serves '{st.model_id}'",
                       param="model", code="model_not_found")
    return {"id": st.model_id, "object": "model", "created": st.created, "owned_by": "mtplx"}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    st = _state(request)
    _unsupported(body, chat=True)
    messages = _to_template(body.messages)
    prompt_ids = await tokenize(st.engine.model.chat_ids, messages, None, body.chat_template_kwargs)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = resolve_max_tokens(requested, len(prompt_ids), st.engine.model.max_context, st.max_tokens_cap,
                                    "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens")
    params = make_params(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                         seed=body.seed, max_tokens=max_tokens, stop=_stops(body.stop), ignore_eos=body.ignore_eos)
    job = submit(st.engine, prompt_ids, params)
    cid, created = new_id("chatcmpl-"), now()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSEResponse(_chat_stream(job, cid, created, st.model_id, include_usage, request.url.path),
                           on_close=job.cancel)
    out = await collect(job, request)
    return JSONResponse({
        "id": cid, "object": "chat.completion", "created": created, "model": st.model_id,
        "system_fingerprint": st.fingerprint,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                     "logprobs": None, "finish_reason": _finish(out.finish_reason)}],
        "usage": _usage(len(prompt_ids), out.completion_tokens),
        "timings": timings(out.stats),
    })


async def _openai_stream(job, cid, created, model_id, include_usage, path, obj: str, choice, first=None):
    """SSE for both OpenAI endpoints: `obj` is the chunk object name, `choice(text, finish)` the
    endpoint's choice body; `first` an optional opening choice (chat sends the role first)."""
    def chunk(choice_body: dict, **extra) -> dict:
        c: dict[str, Any] = {"id": cid, "object": obj, "created": created, "model": model_id,
                             "system_fingerprint": None, "choices": [{"index": 0, **choice_body}]}
        if include_usage:
            c["usage"] = None
        c.update(extra)
        return c

    if first is not None:
        yield sse_data(chunk(first))
    n = 0
    try:
        async for ev in job_events(job):
            if isinstance(ev, StepEvent):
                n += len(ev.step.token_ids)
                if ev.step.text:
                    yield sse_data(chunk(choice(ev.step.text, None)))
            elif isinstance(ev, DoneEvent):
                yield sse_data(chunk(choice("", _finish(ev.finish_reason)), timings=timings(ev.stats)))
                if include_usage:
                    yield sse_data({"id": cid, "object": obj, "created": created, "model": model_id,
                                    "system_fingerprint": None, "choices": [],
                                    "usage": _usage(len(job.prompt_ids), ev.stats.generated_tokens or n),
                                    "timings": timings(ev.stats)})
    except APIError as e:
        yield sse_data(error_body(path, e.status, e.message))
    yield "data: [DONE]\n\n"


def _chat_stream(job, cid, created, model_id, include_usage, path):
    def choice(text, finish):
        return {"delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish}

    first = {"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    return _openai_stream(job, cid, created, model_id, include_usage, path, "chat.completion.chunk", choice, first)


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
                         seed=body.seed, max_tokens=max_tokens, stop=_stops(body.stop), ignore_eos=body.ignore_eos)
    job = submit(st.engine, prompt_ids, params)
    cid, created = new_id("cmpl-"), now()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSEResponse(_completion_stream(job, cid, created, st.model_id, include_usage, request.url.path),
                           on_close=job.cancel)
    out = await collect(job, request)
    return JSONResponse({
        "id": cid, "object": "text_completion", "created": created, "model": st.model_id,
        "system_fingerprint": st.fingerprint,
        "choices": [{"index": 0, "text": out.text, "logprobs": None, "finish_reason": _finish(out.finish_reason)}],
        "usage": _usage(len(prompt_ids), out.completion_tokens),
        "timings": timings(out.stats),
    })


def _completion_stream(job, cid, created, model_id, include_usage, path):
    def choice(text, finish):
        return {"text": text, "logprobs": None, "finish_reason": finish}

    return _openai_stream(job, cid, created, model_id, include_usage, path, "text_completion", choice)
