"""Which tool-call format a checkpoint's chat template speaks, and mtplx's built-in templates.

    xml    Qwen3.5 / Qwen3.6: <tool_call>\n<function=NAME>\n<parameter=P>\nvalue\n</parameter>...
    json   Qwen3 / Qwen3-Next: <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>
    None   the template renders no tools (a request with tools gets a 400 saying what to do)

The format is read off the template text itself, so a checkpoint's own template decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
BUILTIN_TEMPLATES = {"qwen3.5": "qwen3_5.jinja", "qwen3": "qwen3.jinja"}

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class ChatFormat:
    tool_format: str | None  # "xml" | "json" | None
    thinking: bool  # the template knows <think> blocks

    def call_prefix(self, name: str | None) -> str:
        """The text that opens a call (to `name`, or to a function the model names itself)."""
        if self.tool_format == "xml":
            return f"{CALL_OPEN}\n<function={name}>\n" if name else f"{CALL_OPEN}\n<function="
        if self.tool_format == "json":
            return f'{CALL_OPEN}\n{{"name": "{name}", "arguments": ' if name else f'{CALL_OPEN}\n{{"name": "'
        raise ValueError("this chat template has no tool-call format")


def detect_format(template: str | None) -> ChatFormat:
    t = template or ""
    if "<function=" in t and CALL_OPEN in t:
        fmt = "xml"
    elif CALL_OPEN in t and ('"name"' in t or "tool_call.name" in t or "arguments" in t):
        fmt = "json"
    else:
        fmt = None
    return ChatFormat(fmt, THINK_OPEN in t or THINK_CLOSE in t)


def builtin_template(name: str, thinking_default: bool = True) -> str:
    """One of mtplx's own templates ('qwen3.5' or 'qwen3'), with its enable_thinking default."""
    if name not in BUILTIN_TEMPLATES:
        raise ValueError(f"unknown built-in chat template {name!r}: expected one of {sorted(BUILTIN_TEMPLATES)} "
                         f"or a path to a .jinja file")
    text = (TEMPLATE_DIR / BUILTIN_TEMPLATES[name]).read_text(encoding="utf-8")
    return text.replace("THINKING_DEFAULT", "true" if thinking_default else "false")


def load_template(spec: str) -> str:
    """--chat-template: a built-in name ('qwen3.5', 'qwen3', with ':nothink' for thinking off by
    default) or a path to a Jinja file."""
    name, _, flag = spec.partition(":")
    if name in BUILTIN_TEMPLATES:
        if flag not in ("", "nothink", "think"):
            raise ValueError(f"--chat-template {spec!r}: the suffix may be ':think' or ':nothink'")
        return builtin_template(name, thinking_default=flag != "nothink")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"--chat-template {spec!r}: expected {' / '.join(BUILTIN_TEMPLATES)} or a Jinja file, "
                         f"and no such file exists")
    return path.read_text(encoding="utf-8")
