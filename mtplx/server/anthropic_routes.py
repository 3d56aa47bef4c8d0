"""Anthropic-compatible routes: /v1/messages (stream and not), /v1/messages/count_tokens."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mtplx.server.common import (
    APIError, DoneEvent, SSEResponse, StepEvent, collect, job_events, make_params, new_id,
    resolve_max_tokens, tokenize, sse_event, submit, timings,
)
from mtplx.server.errors import error_body
from mtplx.server.schemas import AMessage, ATextBlock, CountTokensRequest, MessagesRequest

router = APIRouter()


def _text_of(content, where: str) -> str:
    if isinstance(content, str):
        return content
    chunks = []
    for j, block in enumerate(content):
        if not isinstance(block, ATextBlock):
            raise APIError(400, f"content block type '{block.type}' is not supported (text only)",
                           param=f"{where}.{j}")
        chunks.append(block.text)
    return "".join(chunks)


def _to_template(system, messages: list[AMessage], tools) -> list[dict]:
    if tools:
        raise APIError(400, "tools are not supported by this server yet")
    out = []
    if system:
        out.append({"role": "system", "content": _text_of(system, "system")})
    for i, m in enumerate(messages):
        out.append({"role": m.role, "content": _text_of(m.content, f"messages.{i}.content")})
    return out


def _stop_reason(finish: str, stop_sequence: str | None) -> str:
    if finish == "length":
        return "max_tokens"
    if stop_sequence:
        return "stop_sequence"
    return "end_turn"


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request):
    st = request.app.state.mtplx
    ids = await tokenize(st.engine.model.chat_ids, _to_template(body.system, body.messages, body.tools))
    return {"input_tokens": len(ids)}


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request):
    st = request.app.state.mtplx
    prompt_ids = await tokenize(st.engine.model.chat_ids, _to_template(body.system, body.messages, body.tools))
    max_tokens = resolve_max_tokens(body.max_tokens, len(prompt_ids), st.engine.model.max_context, None)
    params = make_params(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=None,
                         seed=None, max_tokens=max_tokens, stop=body.stop_sequences or [])
    job = submit(st.engine, prompt_ids, params)
    mid = new_id("msg_")
    if body.stream:
        return SSEResponse(_stream(job, mid, st.model_id, request.url.path), on_close=job.cancel)
    out = await collect(job, request)
    stop_seq = out.stop_sequence if out.finish_reason != "length" else None
    return JSONResponse({
        "id": mid, "type": "message", "role": "assistant", "model": st.model_id,
        "content": [{"type": "text", "text": out.text}],
        "stop_reason": _stop_reason(out.finish_reason, stop_seq),
        "stop_sequence": stop_seq,
        "usage": {"input_tokens": len(prompt_ids), "output_tokens": out.completion_tokens},
        "timings": timings(out.stats),
    })


async def _stream(job, mid: str, model_id: str, path: str):
    yield sse_event("message_start", {"type": "message_start", "message": {
        "id": mid, "type": "message", "role": "assistant", "model": model_id, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": len(job.prompt_ids), "output_tokens": 0}}})
    yield sse_event("content_block_start", {"type": "content_block_start", "index": 0,
                                            "content_block": {"type": "text", "text": ""}})
    yield sse_event("ping", {"type": "ping"})
    n = 0
    try:
        async for ev in job_events(job):
            if isinstance(ev, StepEvent):
                n += len(ev.step.token_ids)
                if ev.step.text:
                    yield sse_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                            "delta": {"type": "text_delta", "text": ev.step.text}})
            elif isinstance(ev, DoneEvent):
                stop_seq = ev.stop_sequence if ev.finish_reason != "length" else None
                yield sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
                yield sse_event("message_delta", {
                    "type": "message_delta",
                    "delta": {"stop_reason": _stop_reason(ev.finish_reason, stop_seq), "stop_sequence": stop_seq},
                    "usage": {"output_tokens": ev.stats.generated_tokens or n},
                    "timings": timings(ev.stats)})
                yield sse_event("message_stop", {"type": "message_stop"})
    except APIError as e:
        body = error_body(path, e.status, e.message)
        yield sse_event("error", body)
