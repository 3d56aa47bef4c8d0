#!/usr/bin/env python3
"""Tiny request-capture server for agent CLIs (stdlib only).

Logs every request (method, path, query, headers minus auth, JSON body) as a
numbered JSON file into a folder, and answers with minimal protocol-valid
responses so that Claude Code (Anthropic Messages API) and Codex (OpenAI
Responses API) complete one turn:

* ``POST /v1/messages``               -> Anthropic Messages (JSON or SSE)
* ``POST /v1/messages/count_tokens``  -> ``{"input_tokens": N}``
* ``POST /v1/responses``              -> Responses API (SSE or JSON)
* ``POST /v1/chat/completions``       -> Chat Completions (JSON or SSE)
* ``GET  /v1/models``                 -> model list
* anything else                       -> 404 JSON

With ``--tool-call`` the first generation request of a conversation (one
that carries no tool result yet) is answered with a tool call instead of
text (Anthropic: ``Bash`` ``echo hi``; Responses: ``exec_command``), so that
the follow-up request shows how the client sends tool results back.

Usage::

    python capture_server.py --port 18080 --out /tmp/capture [--text "hi"]

It is not part of mtplx; it exists to record what real clients send, see
tests/fixtures/agent_requests/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

SECRET_HEADERS = {"authorization", "x-api-key", "api-key", "cookie", "proxy-authorization"}


class State:
    out_dir = "."
    text = "Hi! (capture server)"
    model = "mtplx-default"
    tool_call = False
    anthropic_tool = ("Bash", {"command": "echo hi", "description": "Print hi"})
    responses_tool = ("exec_command", {"cmd": "echo hi"})
    counter = itertools.count(1)
    lock = threading.Lock()


def _log(handler: "Handler", body_raw: bytes) -> None:
    parts = urlsplit(handler.path)
    headers = {}
    for k, v in handler.headers.items():
        headers[k] = "<redacted>" if k.lower() in SECRET_HEADERS else v
    try:
        body = json.loads(body_raw) if body_raw else None
    except ValueError:
        body = {"_raw": body_raw.decode("utf-8", "replace")}
    with State.lock:
        n = next(State.counter)
    slug = parts.path.strip("/").replace("/", "_") or "root"
    record = {
        "seq": n,
        "time": time.time(),
        "method": handler.command,
        "path": parts.path,
        "query": parse_qs(parts.query),
        "headers": headers,
        "body": body,
    }
    fname = os.path.join(State.out_dir, f"{n:04d}_{handler.command}_{slug}.json")
    with open(fname, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
    sys.stderr.write(f"[capture] {n:04d} {handler.command} {handler.path} -> {fname}\n")
    sys.stderr.flush()


def _sse(event: str | None, data: dict) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + "data: " + json.dumps(data) + "\n\n").encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet default logging
        pass

    # ---- helpers -------------------------------------------------------
    def _read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            return self.rfile.read(n)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return b""

    def _json(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, events: list[bytes]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        for e in events:
            self.wfile.write(e)
            self.wfile.flush()
        self.close_connection = True

    # ---- verbs ---------------------------------------------------------
    def do_GET(self):
        _log(self, b"")
        path = urlsplit(self.path).path.rstrip("/")
        if path in ("/v1/models", "/models"):
            self._json(200, {
                "object": "list",
                "data": [{"id": State.model, "object": "model", "created": 0,
                          "owned_by": "mtplx", "type": "model",
                          "display_name": State.model,
                          "created_at": "2026-01-01T00:00:00Z"}],
                "has_more": False, "first_id": State.model, "last_id": State.model,
            })
        elif path == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._json(404, {"error": {"type": "not_found", "message": f"no route {self.path}"}})

    def do_HEAD(self):
        _log(self, b"")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        raw = self._read_body()
        _log(self, raw)
        try:
            req = json.loads(raw) if raw else {}
        except ValueError:
            req = {}
        path = urlsplit(self.path).path.rstrip("/")
        if path in ("/v1/messages/count_tokens",):
            self._json(200, {"input_tokens": max(1, len(raw) // 4)})
        elif path in ("/v1/messages",):
            self._messages(req)
        elif path in ("/v1/responses", "/responses"):
            self._responses(req)
        elif path in ("/v1/chat/completions", "/chat/completions"):
            self._chat(req)
        else:
            self._json(404, {"error": {"type": "not_found", "message": f"no route {self.path}"}})

    # ---- Anthropic Messages -------------------------------------------
    def _messages(self, req: dict) -> None:
        model = req.get("model") or State.model
        mid = "msg_" + uuid.uuid4().hex[:24]
        text = State.text
        usage = {"input_tokens": 10, "output_tokens": 5,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        has_result = any(
            isinstance(m.get("content"), list)
            and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in m["content"])
            for m in req.get("messages") or [] if isinstance(m, dict))
        if State.tool_call and not has_result and req.get("tools"):
            name, args = State.anthropic_tool
            block = {"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:24],
                     "name": name, "input": args}
            if not req.get("stream"):
                self._json(200, {
                    "id": mid, "type": "message", "role": "assistant", "model": model,
                    "content": [block], "stop_reason": "tool_use", "stop_sequence": None,
                    "usage": usage})
                return
            self._stream([
                _sse("message_start", {"type": "message_start", "message": {
                    "id": mid, "type": "message", "role": "assistant", "model": model,
                    "content": [], "stop_reason": None, "stop_sequence": None,
                    "usage": {**usage, "output_tokens": 1}}}),
                _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {**block, "input": {}}}),
                _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "input_json_delta",
                                                       "partial_json": json.dumps(args)}}),
                _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
                _sse("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                                       "usage": {"output_tokens": 5}}),
                _sse("message_stop", {"type": "message_stop"}),
            ])
            return
        if not req.get("stream"):
            self._json(200, {
                "id": mid, "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn", "stop_sequence": None, "usage": usage,
            })
            return
        ev = [
            _sse("message_start", {"type": "message_start", "message": {
                "id": mid, "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {**usage, "output_tokens": 1}}}),
            _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}}),
            _sse("ping", {"type": "ping"}),
            _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": text}}),
            _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _sse("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                   "usage": {"output_tokens": 5}}),
            _sse("message_stop", {"type": "message_stop"}),
        ]
        self._stream(ev)

    # ---- OpenAI Responses ---------------------------------------------
    def _responses(self, req: dict) -> None:
        model = req.get("model") or State.model
        rid = "resp_" + uuid.uuid4().hex[:24]
        iid = "msg_" + uuid.uuid4().hex[:24]
        text = State.text
        now = int(time.time())
        usage = {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": 15}
        part = {"type": "output_text", "text": text, "annotations": []}
        item_done = {"id": iid, "type": "message", "status": "completed",
                     "role": "assistant", "content": [part]}
        base = {"id": rid, "object": "response", "created_at": now, "model": model,
                "status": "in_progress", "output": [], "usage": None,
                "parallel_tool_calls": req.get("parallel_tool_calls", True),
                "tool_choice": req.get("tool_choice", "auto"), "tools": [],
                "error": None, "incomplete_details": None}
        seq = itertools.count(0)

        def e(kind: str, **kw) -> bytes:
            return _sse(kind, {"type": kind, "sequence_number": next(seq), **kw})

        items = req.get("input") if isinstance(req.get("input"), list) else []
        has_result = any(isinstance(i, dict) and str(i.get("type", "")).endswith("_call_output")
                         for i in items)
        if State.tool_call and not has_result and req.get("tools"):
            name, args = State.responses_tool
            fid = "fc_" + uuid.uuid4().hex[:24]
            call = {"id": fid, "type": "function_call", "status": "completed",
                    "call_id": "call_" + uuid.uuid4().hex[:24], "name": name,
                    "arguments": json.dumps(args)}
            final = {**base, "status": "completed", "output": [call], "usage": usage}
            if not req.get("stream"):
                self._json(200, final)
                return
            self._stream([
                e("response.created", response=base),
                e("response.in_progress", response=base),
                e("response.output_item.added", output_index=0,
                  item={**call, "status": "in_progress", "arguments": ""}),
                e("response.function_call_arguments.delta", item_id=fid, output_index=0,
                  delta=call["arguments"]),
                e("response.function_call_arguments.done", item_id=fid, output_index=0,
                  arguments=call["arguments"]),
                e("response.output_item.done", output_index=0, item=call),
                e("response.completed", response=final),
            ])
            return
        final = {**base, "status": "completed", "output": [item_done], "usage": usage}
        if not req.get("stream"):
            self._json(200, final)
            return

        ev = [
            e("response.created", response=base),
            e("response.in_progress", response=base),
            e("response.output_item.added", output_index=0,
              item={"id": iid, "type": "message", "status": "in_progress",
                    "role": "assistant", "content": []}),
            e("response.content_part.added", item_id=iid, output_index=0, content_index=0,
              part={"type": "output_text", "text": "", "annotations": []}),
            e("response.output_text.delta", item_id=iid, output_index=0, content_index=0,
              delta=text),
            e("response.output_text.done", item_id=iid, output_index=0, content_index=0,
              text=text),
            e("response.content_part.done", item_id=iid, output_index=0, content_index=0,
              part=part),
            e("response.output_item.done", output_index=0, item=item_done),
            e("response.completed", response=final),
        ]
        self._stream(ev)

    # ---- OpenAI Chat Completions (for completeness) -------------------
    def _chat(self, req: dict) -> None:
        model = req.get("model") or State.model
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        now = int(time.time())
        if not req.get("stream"):
            self._json(200, {"id": cid, "object": "chat.completion", "created": now,
                             "model": model, "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": State.text}}],
                             "usage": {"prompt_tokens": 10, "completion_tokens": 5,
                                       "total_tokens": 15}})
            return
        chunk = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model}
        ev = [
            _sse(None, {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant",
                                              "content": State.text}, "finish_reason": None}]}),
            _sse(None, {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            b"data: [DONE]\n\n",
        ]
        self._stream(ev)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--out", required=True, help="folder for captured requests")
    ap.add_argument("--text", default=State.text, help="assistant text to answer with")
    ap.add_argument("--model", default=State.model)
    ap.add_argument("--tool-call", action="store_true",
                    help="answer the first turn with a tool call (see module doc)")
    args = ap.parse_args(argv)
    State.tool_call = args.tool_call
    os.makedirs(args.out, exist_ok=True)
    State.out_dir, State.text, State.model = args.out, args.text, args.model
    srv = ThreadingHTTPServer((args.host, args.port), Handler)
    sys.stderr.write(f"[capture] listening on http://{args.host}:{args.port} -> {args.out}\n")
    sys.stderr.flush()
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
