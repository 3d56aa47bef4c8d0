"""`mtplx serve`: an OpenAI- and Anthropic-compatible HTTP server."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from mtplx.cli.options import add_drafting_args, add_quantize_arg, load_options

HELP = "serve a model over an OpenAI- and Anthropic-compatible HTTP API"


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; anything but loopback "
                                                        "requires --api-key)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--depth", type=int, default=None,
                   help="MTP draft depth (0 = plain decoding; default: the depth `mtplx tune` remembered, "
                        "else 3 with a head)")
    p.add_argument("--api-key", default=os.environ.get("MTPLX_API_KEY"),
                   help="require this key (Authorization: Bearer KEY or x-api-key: KEY); env MTPLX_API_KEY")
    p.add_argument("--backend", default=None, help="torch | mlx (default: the platform's)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the backend's choice)")
    p.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="model id reported by the API (repeatable: the first is reported, all are accepted)")
    p.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                   help="replace the checkpoint's chat template: qwen3.5 (XML tool calls), qwen3 (JSON tool "
                        "calls), either with ':nothink' for thinking off by default, or a Jinja file")
    p.add_argument("--max-queue", type=int, default=16, help="requests allowed to wait; more get 429")
    p.add_argument("--parallel", type=int, default=1,
                   help="generations interleaved per decoding cycle (each has its own cache)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="cap on generated tokens when a request gives no max_tokens (default: the context)")
    p.add_argument("--max-context", type=int, default=None,
                   help="cap the context (prompt + completion) per request (default: the model's)")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body accepted")
    p.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                   help="allow browser requests from this origin (CORS; repeatable; '*' for any)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the torch backend (default: torch's)")
    add_quantize_arg(p)
    add_drafting_args(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help=HELP, description=HELP)
    add_arguments(p)
    return p


def run(args) -> int:
    if not is_loopback(args.host) and not args.api_key:
        print(f"error: binding {args.host} exposes the server beyond this machine; pass --api-key KEY "
              f"(or set MTPLX_API_KEY), or bind 127.0.0.1", file=sys.stderr)
        return 2
    if args.max_queue < 0 or args.parallel < 1 or args.port < 0 or args.port > 65535:
        print("error: --max-queue must be >= 0, --parallel >= 1 and --port in [0, 65535]", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from mtplx.server.app import create_app
        from mtplx.server.model_adapter import load_adapter
    except ImportError as e:
        print(f"error: the server needs its extras: pip install 'mtplx[serve]' ({e})", file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        try:
            import torch

            torch.set_num_threads(max(1, args.threads))
        except ImportError:
            pass
    chat_template = None
    if args.chat_template:
        from mtplx.chat.formats import load_template

        try:
            chat_template = load_template(args.chat_template)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    names = args.served_model_name or []
    try:
        adapter, depth = load_adapter(args.model, backend=args.backend, dtype=args.dtype, depth=args.depth,
                                      max_context=args.max_context, model_id=names[0] if names else None,
                                      chat_template=chat_template,
                                      threads=args.threads or None, draft_cutoff=args.draft_cutoff,
                                      **load_options(args))
    except Exception as e:  # a clear message, no trace, for a model that cannot be loaded
        print(f"error: cannot load model {args.model or '(default)'}: {e}", file=sys.stderr)
        return 1
    app = create_app(adapter, depth=depth, max_queue=args.max_queue, parallel=args.parallel,
                     api_key=args.api_key, max_body=int(args.max_body_mb * 1024 * 1024),
                     max_tokens_cap=args.max_tokens, model_id=names or None,
                     allow_origins=args.allow_origin)
    from mtplx.chat.formats import detect_format

    fmt = detect_format(adapter.chat_template)
    tools = {"xml": "tool calls: Qwen3.5 XML", "json": "tool calls: Qwen3 JSON"}.get(
        fmt.tool_format, "no tool calls (the chat template renders none: see --chat-template)")
    print(f"mtplx serve: {app.state.mtplx.model_id} (MTP depth {depth}; {tools}"
          f"{'; thinking' if fmt.thinking else ''}) on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, server_header=False,
                access_log=args.log_level == "debug", timeout_graceful_shutdown=5)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mtplx serve", description=HELP)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
