"""`mtplx serve`: an OpenAI- and Anthropic-compatible HTTP server (FastAPI + uvicorn).

    mtplx serve --model DIR [--depth D] [--port 8080] [--max-batch 8] [--api-key KEY]

Endpoints
    POST /v1/chat/completions, /v1/completions      OpenAI (stream or not; n=1)
    GET  /v1/models, /v1/models/{id}
    POST /v1/messages, /v1/messages/count_tokens    Anthropic (stream or not)
    POST /v1/responses                              OpenAI Responses API (stream or not; nothing stored)
    GET  /health                                    always open, even with --api-key
    GET  /metrics                                   Prometheus text format
Tools and reasoning: see docs/agents.md. Every generation response carries `usage` and a llama.cpp-style `timings` object (prompt_n,
predicted_n, *_per_second, draft_n, draft_n_accepted) plus MTP detail: mtp_depth, verify_passes,
tokens_per_verify, draft_n_by_depth, draft_n_accepted_by_depth, acceptance_by_depth. Streams
put it in the chunk with finish_reason (OpenAI; also the usage chunk) or in message_delta
(Anthropic).

Modules
    app.py              create_app(): routes, error handlers, GuardMiddleware (API key, body
                        limit, request metrics), OpenAPI document, engine lifecycle
    engine.py           Engine: one model, a bounded FIFO, one worker thread; up to `parallel`
                        (--max-batch) generations batched in one verify forward per step
                        (mtplx.decoding.batch), each with its own session
    openai_routes.py    OpenAI routes        anthropic_routes.py   Anthropic routes
    responses_routes.py the Responses API (Codex)
    chat.py             the one generation path of every chat API: Conversation -> prompt (mtplx.chat)
                        -> job -> chat events (text, reasoning, tool calls) -> finish
    schemas.py          pydantic request models (strict types, unknown fields ignored)
    common.py           params, context clamp, job -> events, SSE, timings, request-log notes
    errors.py           API-shaped errors (OpenAI or Anthropic by path), never a trace
    metrics.py          prometheus_client registry per app
    model_adapter.py    the real model: mtplx.load + mtplx.stream_generate
    fake.py, testing.py deterministic stand-in model and server-process helpers for tests
"""
