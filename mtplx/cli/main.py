"""The `mtplx` command (console script `mtplx.cli.main:main`, and `python -m mtplx`).

Adding a subcommand: write `mtplx/cli/<name>_cmd.py` with
    HELP = "one line for `mtplx --help`"            (optional)
    def add_parser(subparsers) -> argparse.ArgumentParser   # subparsers.add_parser(...)
    def run(args) -> int                                   # the exit code
and add "<name>" to COMMANDS below (one line). Modules are imported when the parser is built,
so keep heavy imports (torch, mlx) inside `run`. A module that fails to import still shows up:
running it prints why, instead of breaking every other command.

User errors (CheckpointError, ValueError, FileNotFoundError, ...) raised by `run` print one
line `error: ...` on stderr and exit 1, never a traceback (set MTPLX_DEBUG=1 to see it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# one line per subcommand: module mtplx.cli.<name>_cmd
COMMANDS = [
    "inspect",
    "graft",
    "generate",
    "bench",
    "tune",
    "serve",
    "forge",
]


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("mtplx")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "0+unknown"


def _user_error_types() -> tuple[type[BaseException], ...]:
    from mtplx.backends import RankLost
    from mtplx.checkpoint.errors import CheckpointError
    return (CheckpointError, RankLost, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    return msg.splitlines()[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtplx",
        description="Lossless multi-token-prediction speculative decoding for Qwen3.5 / Qwen3.6 / Qwen3-Next.",
    )
    parser.add_argument("--version", action="version", version=f"mtplx {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        modname = f"mtplx.cli.{name}_cmd"
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                continue  # not written yet
            _add_broken(sub, name, e)
            continue
        except Exception as e:  # noqa: BLE001 - a broken module must not break the other commands
            _add_broken(sub, name, e)
            continue
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def _add_broken(sub, name: str, exc: BaseException) -> None:
    p = sub.add_parser(name, help=f"(unavailable: {_one_line(exc)})", add_help=True)
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def run(args, _exc=exc, _name=name) -> int:
        print(f"error: mtplx {_name} is unavailable: {_one_line(_exc)}", file=sys.stderr)
        return 1

    p.set_defaults(_run=run)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        code = run(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except _user_error_types() as e:
        if os.environ.get("MTPLX_DEBUG"):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    return int(code or 0)


def entry() -> int:
    """The `mtplx` command: main(), then a process that ran a tensor-parallel group ends
    through tp_launch.end_process (without the interpreter teardown that gloo can abort)."""
    code = main()
    tp_launch = sys.modules.get("mtplx.backends.torch.tp_launch")
    if tp_launch is not None and tp_launch.opened_here():
        tp_launch.end_process(code)
    return code


if __name__ == "__main__":
    raise SystemExit(entry())
