"""What the OpenAI and Anthropic routes share: params, context checks, running a job, SSE, timings."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import StreamingResponse

from mtplx.chat.tools import ToolSpecError
from mtplx.decoding.params import SamplingParams
from mtplx.server.engine import DoneEvent, EngineClosed, ErrorEvent, GenStats, Job, QueueFull, StepEvent
from mtplx.server.errors import APIError

DISCONNECT_POLL_S = 0.25


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def make_params(*, temperature: float | None, top_p: float | None, top_k: int | None, min_p: float | None,
                seed: int | None, max_tokens: int, stop: list[str], ignore_eos: bool = False,
                presence_penalty: float | None = None, frequency_penalty: float | None = None,
                repetition_penalty: float | None = None, logprobs: int | None = None,
                grammar: Any = None) -> SamplingParams:
    if seed is not None:
        seed = None if seed == -1 else seed % (2**63)  # -1 = random (llama.cpp convention)
    params = SamplingParams(
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        top_k=top_k or 0,
        min_p=min_p or 0.0,
        seed=seed,
        max_tokens=max_tokens,
        stop=list(stop),
        ignore_eos=ignore_eos,
        presence_penalty=presence_penalty or 0.0,
        frequency_penalty=frequency_penalty or 0.0,
        repetition_penalty=1.0 if repetition_penalty is None else float(repetition_penalty),
        logprobs=logprobs,
        grammar=grammar,
    )
    try:
        params.validate()
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return params


def resolve_max_tokens(requested: int | None, prompt_len: int, max_context: int, cap: int | None) -> int:
    """What may be generated: the request's max_tokens (or the server's cap) clamped to the room the
    context leaves (the generation then ends with `length`); 400 only when the prompt alone does not fit."""
    if prompt_len >= max_context:
        raise APIError(400, f"This model's maximum context length is {max_context} tokens, but the prompt has "
                            f"{prompt_len} tokens. Shorten the prompt.", param="messages",
                       code="context_length_exceeded")
    room = max_context - prompt_len
    if requested is None:
        return room if cap is None else min(room, cap)
    return min(requested, room)


def text_of_parts(content: Any, where: str, text_types: tuple[str, ...], name_others: bool = False) -> str:
    """Content given as a string or a list of typed parts -> its text. Parts of other types are a 400,
    or (`name_others`: tool results, where a refusal would end an agent's session) named in the text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"'{where}': expected a string or a list of content parts", param=where)
    parts = []
    for k, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in text_types:
            if not isinstance(p.get("text"), str):
                raise APIError(400, f"'{where}.{k}.text': expected a string", param=f"{where}.{k}.text")
            parts.append(p["text"])
        elif name_others and isinstance(kind, str):
            parts.append(f"[{kind} content: not readable by this text model]")
        else:
            raise APIError(400, f"'{where}.{k}': content part type {kind!r} is not supported (text only)",
                           param=f"{where}.{k}")
    return ("\n" if name_others else "").join(parts)


async def run_blocking(fn: Callable, *args):
    return await to_thread.run_sync(fn, *args)


async def tokenize(fn: Callable, *args) -> list[int]:
    """Build a prompt off the event loop; a prompt that cannot be built is the client's 400."""
    try:
        return await to_thread.run_sync(fn, *args)
    except ToolSpecError as e:  # tools / tool_choice / tool history: the message names the field
        raise APIError(400, str(e), param=e.param) from None
    except ValueError as e:  # includes model_adapter.PromptError
        raise APIError(400, f"cannot build the prompt: {e}") from None


def submit(engine, prompt_ids: list[int], params: SamplingParams) -> Job:
    try:
        return engine.submit(prompt_ids, params)
    except QueueFull as e:
        raise APIError(429, f"The server is busy: {e}. Retry shortly.", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    except EngineClosed as e:
        raise APIError(503, str(e)) from None


@dataclass
class Outcome:
    text: str
    finish_reason: str
    stop_sequence: str | None
    stats: GenStats
    completion_tokens: int
    logprobs: list = None  # per token (id, logprob, top), when asked
    prompt_logprobs: list | None = None  # per prompt token after the first (echo)


async def job_events(job: Job, request: Request | None = None) -> AsyncIterator[Any]:
    """Yield StepEvent... then one DoneEvent; raises APIError on ErrorEvent. Cancels the job on exit
    (client gone, task cancelled) unless it finished; polls for disconnect when `request` is given."""
    done = False
    last_check = time.monotonic()
    try:
        while True:
            if request is None:
                ev = await job.events.get()
            else:
                try:
                    ev = await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    ev = None
                if time.monotonic() - last_check >= DISCONNECT_POLL_S:
                    last_check = time.monotonic()
                    if await request.is_disconnected():
                        return
                if ev is None:
                    continue
            if isinstance(ev, ErrorEvent):
                done = True
                raise APIError(500, ev.message)
            yield ev
            if isinstance(ev, DoneEvent):
                done = True
                return
    finally:
        if not done:
            job.cancel()


async def collect(job: Job, request: Request) -> Outcome:
    parts: list[str] = []
    lps: list = []
    prompt_lps = None
    n = 0
    async for ev in job_events(job, request):
        if isinstance(ev, StepEvent):
            parts.append(ev.step.text)
            n += len(ev.step.token_ids)
            lps += ev.step.logprobs or []
            prompt_lps = prompt_lps if ev.step.prompt_logprobs is None else ev.step.prompt_logprobs
        elif isinstance(ev, DoneEvent):
            return Outcome("".join(parts), ev.finish_reason, ev.stop_sequence, ev.stats,
                           ev.stats.generated_tokens or n, lps, prompt_lps)
    raise APIError(499, "client disconnected")  # the response goes nowhere


def note_request(request: Request, stats: GenStats) -> None:
    """Hand a finished generation's stats to the request log line (GuardMiddleware writes it)."""
    request.scope.setdefault("state", {})["mtplx_stats"] = stats


def timings(stats: GenStats) -> dict:
    """llama.cpp-style `timings`, plus MTP acceptance by depth."""
    pn, gn = stats.prompt_tokens - stats.cached_tokens, stats.generated_tokens  # prompt_n: prefilled
    p_ms, g_ms = stats.prompt_s * 1000.0, stats.decode_s * 1000.0
    decoded = max(gn - 1, 0)  # the first token is produced by the prefill
    drafted = list(stats.drafted_by_depth)
    accepted = list(stats.accepted_by_depth)
    return {
        "cache_n": stats.cached_tokens,
        "prompt_n": pn,
        "prompt_ms": round(p_ms, 3),
        "prompt_per_token_ms": round(p_ms / pn, 3) if pn else 0.0,
        "prompt_per_second": round(pn / stats.prompt_s, 3) if stats.prompt_s > 0 else 0.0,
        "predicted_n": gn,
        "predicted_ms": round(g_ms, 3),
        "predicted_per_token_ms": round(g_ms / decoded, 3) if decoded else 0.0,
        "predicted_per_second": round(decoded / stats.decode_s, 3) if stats.decode_s > 0 and decoded else 0.0,
        "draft_n": stats.draft_n,
        "draft_n_accepted": stats.draft_n_accepted,
        "mtp_depth": stats.depth,
        "verify_passes": stats.cycles,
        "tokens_per_verify": round(1.0 + stats.draft_n_accepted / stats.cycles, 4) if stats.cycles else 0.0,
        "draft_n_by_depth": drafted,
        "draft_n_accepted_by_depth": accepted,
        "acceptance_by_depth": [round(a / d, 4) if d else 0.0 for d, a in zip(drafted, accepted)],
        "depth_mean": round(stats.draft_n / stats.cycles, 4) if stats.cycles else 0.0,  # drafts per cycle
        "batch_size_mean": round(stats.batch_size_sum / stats.cycles, 3) if stats.cycles else 1.0,
    }


class SSEResponse(StreamingResponse):
    """StreamingResponse that always runs `on_close` (cancels the generation) however it ends."""

    def __init__(self, content, on_close: Callable[[], None], **kw):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    pass


def sse_data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def sse_event(name: str, obj: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n"


def now() -> int:
    return int(time.time())
