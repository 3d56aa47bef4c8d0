"""The FastAPI app factory: routes, errors, auth, body limit, metrics, engine lifecycle."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import Response

from mtplx import __version__
from mtplx.server import anthropic_routes, openai_routes, responses_routes
from mtplx.server.engine import Engine, ModelAdapter
from mtplx.server.errors import error_body, install_handlers
from mtplx.server.metrics import CONTENT_TYPE_LATEST, Metrics

DEFAULT_MAX_BODY = 8 * 1024 * 1024  # bytes
PUBLIC_PATHS = {"/health"}
KNOWN_ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/messages",
                   "/v1/messages/count_tokens", "/v1/responses", "/health", "/metrics"}
QUIET_PATHS = {"/health", "/metrics"}  # polled: not logged
log = logging.getLogger("mtplx.server")


@dataclass
class ServerState:
    engine: Engine
    metrics: Metrics
    model_id: str
    aliases: list[str]  # every name the server answers to (--served-model-name, repeatable)
    created: int
    fingerprint: str
    max_tokens_cap: int | None


def _as_json(scope):
    """Bodies are always JSON here: a missing or form content type (curl -d) is read as JSON."""
    headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
    ctype = next((v for k, v in scope.get("headers", ()) if k == b"content-type"), b"")
    if b"json" not in ctype.lower():
        ctype = b"application/json"
    return {**scope, "headers": headers + [(b"content-type", ctype)]}


class GuardMiddleware:
    """Pure ASGI (streaming-safe): request counting, API-key check, bounded request bodies."""

    def __init__(self, app, *, api_key: str | None, max_body: int, metrics: Metrics):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body
        self.metrics = metrics

    async def _reply(self, send, path: str, status: int, message: str, headers: list | None = None,
                     state: dict | None = None):
        if state is not None:
            state["mtplx_error"] = message
        body = json.dumps(error_body(path, status, message)).encode()
        hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": hdrs + (headers or [])})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key):
                    return True
            elif name == b"x-api-key":
                if hmac.compare_digest(value.strip(), self.api_key):
                    return True
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in KNOWN_ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        status_box = [500]
        state = scope.setdefault("state", {})
        started = time.perf_counter()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and path not in PUBLIC_PATHS and scope.get("method") != "OPTIONS" \
                    and not self._authorized(scope):
                return await self._reply(send_wrapper, path, 401,
                                         "invalid or missing API key (send 'Authorization: Bearer KEY' or "
                                         "'x-api-key: KEY')", [(b"www-authenticate", b"Bearer")], state)
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                for name, value in scope.get("headers", ()):
                    if name == b"content-length":
                        try:
                            declared = int(value)
                        except ValueError:
                            return await self._reply(send_wrapper, path, 400, "invalid Content-Length header",
                                                     state=state)
                        if declared > self.max_body:
                            return await self._reply(send_wrapper, path, 413,
                                                     f"request body too large ({declared} bytes, "
                                                     f"limit {self.max_body})", state=state)
                chunks, size = [], 0
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    chunk = msg.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body:
                        return await self._reply(send_wrapper, path, 413,
                                                 f"request body too large (limit {self.max_body} bytes)", state=state)
                    chunks.append(chunk)
                    if not msg.get("more_body", False):
                        break
                body = b"".join(chunks)
                delivered = False

                async def replay():
                    nonlocal delivered
                    if not delivered:
                        delivered = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                return await self.app(_as_json(scope), replay, send_wrapper)
            return await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status_box[0])).inc()
            if status_box[0] >= 400:
                self.metrics.errors.labels(kind=str(status_box[0])).inc()
            if path not in QUIET_PATHS:
                log.info("%s", request_log_line(scope.get("method", ""), path, status_box[0], state,
                                                time.perf_counter() - started))


def request_log_line(method: str, path: str, status: int, state: dict, wall_s: float) -> str:
    """One line per request: endpoint, status, tokens and speed, or why it was refused."""
    line = f"{method} {path} {status} {wall_s:.2f}s"
    stats = state.get("mtplx_stats")
    if stats is not None:
        tps = (stats.generated_tokens - 1) / stats.decode_s if stats.decode_s > 0 and stats.generated_tokens > 1 else 0.0
        cached = f" cached={stats.cached_tokens}" if stats.cached_tokens else ""
        line += f" prompt={stats.prompt_tokens}{cached} generated={stats.generated_tokens} ({tps:.1f} tok/s)"
    if status >= 400 and state.get("mtplx_error"):
        line += f" - {state['mtplx_error'][:300]}"
    return line


_ERROR_SCHEMA = {"type": "object", "description": "OpenAI {'error': {...}} or Anthropic {'type': 'error', "
                 "'error': {...}} error body"}
_ERROR_CODES = {"400": "invalid request", "404": "no such model", "401": "missing or wrong API key", "413": "request body too large",
                "429": "queue full, retry later", "500": "internal error (no details)"}


def _document_errors(app: FastAPI) -> None:
    """The OpenAPI document says what the server does: 400 (not FastAPI's 422) for bad input."""
    original = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = original()
            for item in schema.get("paths", {}).values():
                for op in item.values():
                    responses = op.setdefault("responses", {})
                    responses.pop("422", None)
                    if "requestBody" in op and "200" in responses:  # generation routes also stream
                        responses["200"].setdefault("content", {})["text/event-stream"] = {
                            "schema": {"type": "string", "description": "server-sent events (stream: true)"}}
                    for code, desc in _ERROR_CODES.items():
                        if code in ("400", "404") and not op.get("requestBody") and not op.get("parameters"):
                            continue
                        if code in ("413", "429") and not op.get("requestBody"):
                            continue
                        responses.setdefault(code, {"description": desc, "content": {
                            "application/json": {"schema": _ERROR_SCHEMA}}})
            schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
            schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def create_app(model: ModelAdapter, *, depth: int = 0, max_queue: int = 16, parallel: int = 1,
               api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY,
               max_tokens_cap: int | None = None, model_id: str | list[str] | None = None,
               allow_origins: list[str] | None = None) -> FastAPI:
    """Build the app. The engine worker starts with the app (lifespan) and stops with it."""
    engine = Engine(model, depth=depth, max_queue=max_queue, parallel=parallel)
    metrics = Metrics(engine)
    engine.on_step = metrics.record_step
    engine.on_finish = lambda job, outcome: metrics.record_generation(
        job.stats, outcome, time.perf_counter() - job.enqueued_at)
    aliases = ([model_id] if isinstance(model_id, str) else list(model_id or [])) or [model.model_id]
    mid = aliases[0]
    state = ServerState(engine=engine, metrics=metrics, model_id=mid, aliases=aliases, created=int(time.time()),
                        fingerprint="mtplx-" + hashlib.sha1(f"{mid}:{depth}:{__version__}".encode()).hexdigest()[:12],
                        max_tokens_cap=max_tokens_cap)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()
            cache = getattr(model, "prefix_cache", None)
            if cache is not None:
                cache.close()  # the disk tier's pending writes

    app = FastAPI(title="mtplx", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  debug=False)
    app.state.mtplx = state
    install_handlers(app)
    app.include_router(openai_routes.router)
    app.include_router(anthropic_routes.router)
    app.include_router(responses_routes.router)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": mid, "mtp_depth": engine.depth, "queue_depth": engine.queue_depth,
                "active": engine.active_count, "max_context": model.max_context}

    @app.get("/metrics")
    async def prom_metrics(request: Request):
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    _document_errors(app)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body=max_body, metrics=metrics)
    if allow_origins:  # browser clients on other origins (outermost: errors get CORS headers too)
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "x-api-key", "content-type", "anthropic-version"])
    return app
