"""API-shaped errors. Never a stack trace in a response body.

OpenAI shape:    {"error": {"message", "type", "param", "code"}}
Anthropic shape: {"type": "error", "error": {"type", "message"}}
The shape is chosen by path: /v1/messages* speaks Anthropic, everything else OpenAI.
"""

from __future__ import annotations

import json
import logging

from starlette.requests import Request
from starlette.responses import JSONResponse

from mtplx.chat.tools import ToolSpecError

log = logging.getLogger("mtplx.server")

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def is_anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_body(path: str, status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    if is_anthropic_path(path):
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
    return {
        "error": {
            "message": message,
            "type": _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(path: str, status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None, request: Request | None = None) -> JSONResponse:
    if request is not None:  # the request log line says why
        request.scope.setdefault("state", {})["mtplx_error"] = message
    return JSONResponse(error_body(path, status, message, param, code), status_code=status, headers=headers)


def sse_error_payload(path: str, status: int, message: str) -> str:
    """An error event inside an already-started stream."""
    body = error_body(path, status, message)
    if is_anthropic_path(path):
        return f"event: error\ndata: {json.dumps(body)}\n\n"
    return f"data: {json.dumps(body)}\n\n"


def format_validation_errors(errors: list) -> tuple[str, str | None]:
    """Pydantic/FastAPI validation errors -> one readable message (no input echo of huge bodies)."""
    parts = []
    param = None
    for err in errors[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc) if loc else "body"
        if param is None and loc:
            param = where
        etype = err.get("type", "")
        if etype == "json_invalid":
            parts.append("the request body is not valid JSON")
            param = None
        elif etype == "missing":
            parts.append(f"'{where}' is required")
        else:
            msg = str(err.get("msg", "invalid value"))
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            parts.append(f"'{where}': {msg}")
    if len(errors) > 5:
        parts.append(f"... and {len(errors) - 5} more")
    return "; ".join(parts) or "invalid request", param


def install_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(request.url.path, exc.status, exc.message, exc.param, exc.code, exc.headers, request)

    @app.exception_handler(ToolSpecError)
    async def _tool_spec(request: Request, exc: ToolSpecError):
        return error_response(request.url.path, 400, str(exc), exc.param, request=request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = format_validation_errors(list(exc.errors()))
        return error_response(request.url.path, 400, message, param, request=request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            detail = f"no route for {request.method} {request.url.path}"
        return error_response(request.url.path, exc.status_code, detail, headers=getattr(exc, "headers", None),
                              request=request)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, 500, "internal server error")
