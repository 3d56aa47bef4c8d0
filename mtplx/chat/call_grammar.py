"""Grammars for a forced tool call's arguments: the rest of the call after the prompt-side prefix
(mtplx/chat/prompt.py), as llguidance Lark text, so that a forced call's arguments follow the
tool's input schema.

XML format (Qwen3.5): one terminal per parameter, `<parameter=NAME>\\nVALUE\\n</parameter>\\n`,
in schema order, required ones mandatory; VALUE typed by the schema (an integer, a number, true /
false, an enum's values, JSON for objects and arrays, else text without "</"). JSON format
(Qwen3): the arguments object by its schema, then `}` and the closing tag.
"""

from __future__ import annotations

import json
import re

from mtplx.chat.formats import CALL_CLOSE
from mtplx.chat.tools import Tool

_NUMBER = r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?"
_TEXT = r"([^<]|<[^\/])*"


def _escape(s: str) -> str:
    return re.sub(r"([\\/.^$|?*+()\[\]{}\-])", r"\\\1", s).replace("\n", r"\n")


def _value_regex(schema: dict) -> str | None:
    """A regex for a scalar parameter's text, or None when the value is JSON (objects, arrays)."""
    if "enum" in schema and all(isinstance(v, (str, int, float, bool)) for v in schema["enum"]):
        return "(" + "|".join(_escape(v if isinstance(v, str) else json.dumps(v)) for v in schema["enum"]) + ")"
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "integer":
        return r"-?(0|[1-9][0-9]*)"
    if kind == "number":
        return _NUMBER
    if kind == "boolean":
        return "(true|false)"
    if kind in ("object", "array"):
        return None
    return _TEXT


def _xml_params(tool: Tool, prefix: str) -> tuple[str, list[str]]:
    """-> (rule body, rule / terminal definitions) for one tool's parameters."""
    props = (tool.parameters or {}).get("properties") or {}
    required = set((tool.parameters or {}).get("required") or [])
    parts, defs = [], []
    for i, (name, schema) in enumerate(props.items()):
        schema = schema if isinstance(schema, dict) else {}
        rx = _value_regex(schema)
        head = f"<parameter={name}>\\n"
        if rx is not None:
            term = f"P_{prefix}_{i}".upper()
            regex = _escape(f"<parameter={name}>") + r"\n" + rx + r"\n<\/parameter>\n"
            defs.append(f"{term}: /{regex}/")
            item = term
        else:
            rule = f"p_{prefix}_{i}"
            defs.append(f'{rule}: "{head}" %json{json.dumps(schema)} "\\n</parameter>\\n"')
            item = rule
        parts.append(item if name in required else f"{item}?")
    return " ".join(parts), defs


def forced_call_grammar(fmt: str, tools: list[Tool], name: str | None) -> str | None:
    """The Lark grammar of the call text after the prompt-side prefix (`call_prefix(name)`), or
    None when a tool's schema cannot be expressed (the call is then parsed, not constrained)."""
    chosen = [t for t in tools if t.kind == "function" and (name is None or t.name == name)]
    if not chosen or any(not isinstance(t.parameters, dict) for t in chosen):
        return None
    close = json.dumps("\n" + CALL_CLOSE)
    if fmt == "xml":
        defs, alts = [], []
        for j, tool in enumerate(chosen):
            body, d = _xml_params(tool, f"t{j}")
            defs += d
            end = f' "</function>\\n" {json.dumps(CALL_CLOSE)}'
            alts.append(f"{body}{end}" if name else f'"{tool.name}>\\n" {body}{end}')
        return "\n".join([f"start: {' | '.join(f'( {a} )' for a in alts)}"] + defs)
    if fmt == "json":
        if name:
            return f'start: %json{json.dumps(chosen[0].parameters)} "}}" {close}'
        alts = [f'"{t.name}\\", \\"arguments\\": " %json{json.dumps(t.parameters)} "}}" {close}' for t in chosen]
        return "start: " + " | ".join(f"( {a} )" for a in alts)
    return None


__all__ = ["forced_call_grammar"]
