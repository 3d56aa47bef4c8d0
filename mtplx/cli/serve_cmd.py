"""`mtplx serve`: an OpenAI- and Anthropic-compatible HTTP server."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from mtplx.cli.options import add_drafting_args, add_torch_args, load_options, settle_heap

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
    p.add_argument("--max-batch", "--parallel", dest="max_batch", type=int, default=8, metavar="N",
                   help="requests generated at once (default 8): their MTP cycles share one target forward, "
                        "each output the same as alone; more wait in the queue")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="cap on generated tokens when a request gives no max_tokens (default: the context)")
    p.add_argument("--max-context", type=int, default=None,
                   help="cap the context (prompt + completion) per request (default: the model's)")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body accepted")
    p.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                   help="allow browser requests from this origin (CORS; repeatable; '*' for any)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the torch backend (default: torch's)")
    p.add_argument("--batch-threads", type=int, default=None, metavar="N",
                   help="CPU threads of a verify forward shared by several requests (default: the cores "
                        "less one, when a startup check shows the same bits as on --threads; 0: as --threads)")
    g = p.add_argument_group("prefix cache", "reuse what earlier prompts computed (exact: docs/prefix-cache.md)")
    g.add_argument("--cache-gb", type=float, default=None, metavar="GB",
                   help="memory for the prefix cache; 0 turns it off (default: 4, or a fifth of the "
                        "memory when that is less)")
    g.add_argument("--cache-block", type=int, default=None, metavar="N",
                   help="prefill block in tokens: the cache's granularity (default 256)")
    g.add_argument("--cache-ttl", type=float, default=None, metavar="SECONDS",
                   help="drop cached blocks unused for this long (default: only when memory is needed)")
    g.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="also keep blocks on disk in DIR (safetensors; survives restarts; one model per DIR)")
    g.add_argument("--cache-disk-gb", type=float, default=None, metavar="GB",
                   help="disk budget of --cache-dir (default: 4x --cache-gb)")
    add_torch_args(p)
    add_drafting_args(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def prefix_cache_options(args) -> dict | str:
    """--cache-* -> Model.enable_prefix_cache arguments, or an error message."""
    if args.cache_block is not None and args.cache_block < 1:
        return f"--cache-block must be >= 1 token, got {args.cache_block}"
    if args.cache_ttl is not None and args.cache_ttl <= 0:
        return f"--cache-ttl must be > 0 seconds, got {args.cache_ttl}"
    gb = args.cache_gb
    if gb is None:
        from mtplx.prefix import default_cache_gb

        gb = default_cache_gb("cuda" if _cuda_available() else "cpu")
    if gb < 0:
        return f"--cache-gb must be >= 0 (0 turns the cache off), got {gb}"
    if args.cache_dir and gb == 0:
        return "--cache-dir needs the cache on: drop --cache-gb 0"
    if args.cache_disk_gb is not None and args.cache_disk_gb <= 0:
        return f"--cache-disk-gb must be > 0, got {args.cache_disk_gb}"
    return dict(gb=gb, block=args.cache_block, ttl_s=args.cache_ttl, cache_dir=args.cache_dir,
                disk_gb=args.cache_disk_gb)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help=HELP, description=HELP)
    add_arguments(p)
    return p


def run(args) -> int:
    if not is_loopback(args.host) and not args.api_key:
        print(f"error: binding {args.host} exposes the server beyond this machine; pass --api-key KEY "
              f"(or set MTPLX_API_KEY), or bind 127.0.0.1", file=sys.stderr)
        return 2
    if args.max_queue < 0 or args.max_batch < 1 or args.port < 0 or args.port > 65535:
        print("error: --max-queue must be >= 0, --max-batch >= 1 and --port in [0, 65535]", file=sys.stderr)
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
    cache = prefix_cache_options(args)
    if isinstance(cache, str):
        print(f"error: {cache}", file=sys.stderr)
        return 2
    try:
        adapter, depth = load_adapter(args.model, backend=args.backend, dtype=args.dtype, depth=args.depth,
                                      max_context=args.max_context, model_id=names[0] if names else None,
                                      chat_template=chat_template,
                                      threads=args.threads or None, draft_cutoff=args.draft_cutoff,
                                      prefix_cache=cache, batch_threads=args.batch_threads,
                                      **load_options(args))
    except Exception as e:  # a clear message, no trace, for a model that cannot be loaded
        print(f"error: cannot load model {args.model or '(default)'}: {e}", file=sys.stderr)
        return 1
    settle_heap()
    app = create_app(adapter, depth=depth, max_queue=args.max_queue, parallel=args.max_batch,
                     api_key=args.api_key, max_body=int(args.max_body_mb * 1024 * 1024),
                     max_tokens_cap=args.max_tokens, model_id=names or None,
                     allow_origins=args.allow_origin)
    from mtplx.chat.formats import detect_format

    fmt = detect_format(adapter.chat_template)
    tools = {"xml": "tool calls: Qwen3.5 XML", "json": "tool calls: Qwen3 JSON"}.get(
        fmt.tool_format, "no tool calls (the chat template renders none: see --chat-template)")
    bt = getattr(adapter.model.model, "batch_threads", None)
    pc = adapter.prefix_cache
    tp = adapter.model.load_options.get("tp", 1)
    cache_note = "prefix cache off" if pc is None else (
        f"prefix cache {pc.max_bytes / (1 << 30):.1f} GB in blocks of {pc.block_size}"
        f"{f', disk {pc.disk.folder}' if pc.disk is not None else ''}")
    print(f"mtplx serve: {app.state.mtplx.model_id} (MTP depth {depth}; {tools}"
          f"{'; thinking' if fmt.thinking else ''}; {cache_note}; batches of up to {args.max_batch}"
          f"{f' on {bt} threads' if bt else ''}{f'; tensor parallel over {tp} ranks' if tp > 1 else ''}) on http://{args.host}:{args.port}/v1",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, server_header=False,
                access_log=args.log_level == "debug", timeout_graceful_shutdown=5)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mtplx serve", description=HELP)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
