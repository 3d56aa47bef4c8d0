"""Tools: one `Tool` whatever API declared it, the `ToolCall`s the model makes, and `tool_choice`.

Every API's tool list becomes `[Tool]` here (or a `ToolSpecError` naming the field), tool calls
are `ToolCall(id, name, arguments: dict)`, and values written as raw text by the XML call format
become the JSON types the tool's schema declares.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("mtplx.chat")

NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
EMPTY_OBJECT_SCHEMA = {"type": "object", "properties": {}}


class ToolSpecError(ValueError):
    """A request's tools / tool_choice / tool history is invalid; `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: dict(EMPTY_OBJECT_SCHEMA))  # a JSON schema of type object
    kind: str = "function"  # "function", or "custom" (Responses freeform tools: one string `input`)
    namespace: str | None = None  # Responses namespace tools: the group a function belongs to

    def template_dict(self) -> dict:
        """The OpenAI-style object the Qwen templates list inside <tools>."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description:
            fn["description"] = self.description
        fn["parameters"] = self.parameters
        return {"type": "function", "function": fn}


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def new_call_id(prefix: str = "call_") -> str:
    return prefix + secrets.token_hex(12)


# ---- declared tools ------------------------------------------------------------------------
def _check_name(name: Any, param: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ToolSpecError(f"'{param}': expected a tool name of 1-128 letters, digits, '_', '-', '.' or ':', "
                            f"found {name!r}", param)
    return name


def _check_schema(schema: Any, param: str) -> dict:
    if schema is None:
        return dict(EMPTY_OBJECT_SCHEMA)
    if not isinstance(schema, dict):
        raise ToolSpecError(f"'{param}': expected a JSON schema object, found {type(schema).__name__}", param)
    kind = schema.get("type", "object")
    if kind != "object":
        raise ToolSpecError(f"'{param}': a tool's parameters must be a JSON schema of type 'object', "
                            f"found type {kind!r}", param)
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        raise ToolSpecError(f"'{param}.properties': expected an object mapping names to schemas", param)
    return schema


def _unique(tools: list[Tool], param: str) -> list[Tool]:
    seen = set()
    for i, t in enumerate(tools):
        if t.name in seen:
            raise ToolSpecError(f"'{param}.{i}': tool name {t.name!r} is declared twice", param)
        seen.add(t.name)
    return tools


def _description(d: dict, param: str) -> str:
    desc = d.get("description") or ""
    if not isinstance(desc, str):
        raise ToolSpecError(f"'{param}.description': expected a string", param)
    return desc


def _tool_objects(raw: list | None, param: str):
    """(field path, tool object) for each declared tool; anything but an object is a 400."""
    for i, t in enumerate(raw or []):
        p = f"{param}.{i}"
        if not isinstance(t, dict):
            raise ToolSpecError(f"'{p}': expected a tool object", p)
        yield p, t


def openai_tools(raw: list | None, param: str = "tools") -> tuple[list[Tool], list[str]]:
    """Chat Completions tools ({"type": "function", "function": {...}}) -> (tools, skipped types)."""
    tools, skipped = [], []
    for p, t in _tool_objects(raw, param):
        if t.get("type", "function") != "function":
            skipped.append(str(t.get("type")))
            continue
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise ToolSpecError(f"'{p}.function': expected an object with 'name' and 'parameters'", f"{p}.function")
        tools.append(Tool(_check_name(fn.get("name"), f"{p}.function.name"), _description(fn, f"{p}.function"),
                          _check_schema(fn.get("parameters"), f"{p}.function.parameters")))
    return _unique(tools, param), skipped


def responses_tools(raw: list | None, param: str = "tools", namespace: str | None = None
                    ) -> tuple[list[Tool], list[str]]:
    """Responses API tools (flat {"type": "function", "name", "parameters"}; "custom" freeform tools;
    "namespace" groups of functions, which the model sees by their own names)."""
    tools, skipped = [], []
    for p, t in _tool_objects(raw, param):
        kind = t.get("type")
        if kind == "function":
            tools.append(Tool(_check_name(t.get("name"), f"{p}.name"), _description(t, p),
                              _check_schema(t.get("parameters"), f"{p}.parameters"), namespace=namespace))
        elif kind == "namespace" and namespace is None:
            inner, inner_skipped = responses_tools(t.get("tools"), f"{p}.tools", _check_name(t.get("name"), f"{p}.name"))
            tools += inner
            skipped += inner_skipped
        elif kind == "custom":
            desc = _description(t, p)
            schema = {"type": "object", "properties": {"input": {"type": "string", "description":
                      "the tool's whole input as free text"}}, "required": ["input"]}
            tools.append(Tool(_check_name(t.get("name"), f"{p}.name"), desc, schema, kind="custom",
                              namespace=namespace))
        else:  # hosted tools (web_search, file_search, local_shell...) run on OpenAI's side, not here
            skipped.append(str(kind))
    return (_unique(tools, param) if namespace is None else tools), skipped


def anthropic_tools(raw: list | None, param: str = "tools") -> tuple[list[Tool], list[str]]:
    """Messages API tools ({"name", "description", "input_schema"}); typed server tools are skipped."""
    tools, skipped = [], []
    for p, t in _tool_objects(raw, param):
        kind = t.get("type")
        if kind not in (None, "custom") and "input_schema" not in t:
            skipped.append(str(kind))  # Anthropic-hosted tools (web_search_..., code_execution_...)
            continue
        if "input_schema" not in t:
            raise ToolSpecError(f"'{p}.input_schema' is required (a JSON schema of type 'object')",
                                f"{p}.input_schema")
        tools.append(Tool(_check_name(t.get("name"), f"{p}.name"), _description(t, p),
                          _check_schema(t.get("input_schema"), f"{p}.input_schema")))
    return _unique(tools, param), skipped


# ---- tool_choice ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolChoice:
    mode: str = "auto"  # "auto" | "none" | "required" | "named"
    name: str | None = None
    parallel: bool = True  # several calls in one turn


def _named(name: Any, tools: list[Tool], param: str) -> ToolChoice:
    if not isinstance(name, str) or name not in {t.name for t in tools}:
        known = ", ".join(t.name for t in tools) or "none"
        raise ToolSpecError(f"'{param}': tool {name!r} is not among the request's tools ({known})", param)
    return ToolChoice("named", name)


def _with_parallel(choice: ToolChoice, parallel: bool | None) -> ToolChoice:
    return ToolChoice(choice.mode, choice.name, True if parallel is None else bool(parallel))


def openai_tool_choice(raw: Any, tools: list[Tool], parallel: bool | None = None, *,
                       flat: bool = False, param: str = "tool_choice") -> ToolChoice:
    """Chat Completions (`flat=False`: {"type": "function", "function": {"name"}}) or Responses
    (`flat=True`: {"type": "function", "name"}) tool_choice."""
    if raw is None:
        choice = ToolChoice("auto" if tools else "none")
    elif raw in ("auto", "none", "required"):
        choice = ToolChoice(raw)
    elif isinstance(raw, dict) and raw.get("type") == "function":
        name = raw.get("name") if flat else (raw.get("function") or {}).get("name")
        choice = _named(name, tools, param + (".name" if flat else ".function.name"))
    elif isinstance(raw, dict) and raw.get("type") in ("auto", "none", "required"):
        choice = ToolChoice(raw["type"])
    else:
        raise ToolSpecError(f"'{param}': expected 'auto', 'none', 'required' or a named function, found {raw!r}",
                            param)
    if choice.mode in ("required", "named") and not tools:
        raise ToolSpecError(f"'{param}': {choice.mode!r} needs at least one tool in 'tools'", param)
    return _with_parallel(choice, parallel)


def anthropic_tool_choice(raw: dict | None, tools: list[Tool], param: str = "tool_choice") -> ToolChoice:
    if raw is None:
        return ToolChoice("auto" if tools else "none")
    kind = raw.get("type")
    parallel = not raw.get("disable_parallel_tool_use", False)
    if kind == "auto":
        choice = ToolChoice("auto" if tools else "none")
    elif kind == "none":
        choice = ToolChoice("none")
    elif kind == "any":
        choice = ToolChoice("required")
    elif kind == "tool":
        choice = _named(raw.get("name"), tools, param + ".name")
    else:
        raise ToolSpecError(f"'{param}.type': expected 'auto', 'any', 'tool' or 'none', found {kind!r}", param)
    if choice.mode in ("required", "named") and not tools:
        raise ToolSpecError(f"'{param}': {kind!r} needs at least one tool in 'tools'", param)
    return _with_parallel(choice, parallel)


# ---- argument values -----------------------------------------------------------------------
def _schema_types(schema: dict | None) -> list[str]:
    if not isinstance(schema, dict):
        return []
    t = schema.get("type")
    if isinstance(t, str):
        return [t]
    if isinstance(t, list):
        return [x for x in t if isinstance(x, str)]
    out = []
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            out += [x for x in _schema_types(sub) if x not in out]
    if not out and "enum" in schema and schema["enum"]:
        out = ["string"] if all(isinstance(v, str) for v in schema["enum"]) else []
    return out


def _as_type(raw: str, kind: str) -> tuple[bool, Any]:
    s = raw.strip()
    if kind == "string":
        return True, raw
    if kind == "null":
        return (True, None) if s.lower() in ("null", "none") else (False, None)
    if kind == "boolean":
        return (True, s.lower() == "true") if s.lower() in ("true", "false") else (False, None)
    if kind == "integer":
        try:
            return True, int(s)
        except ValueError:
            try:
                f = float(s)
            except ValueError:
                return False, None
            return (True, int(f)) if f.is_integer() else (False, None)
    if kind == "number":
        try:
            return True, int(s)
        except ValueError:
            try:
                return True, float(s)
            except ValueError:
                return False, None
    if kind in ("object", "array"):
        try:
            v = json.loads(s)
        except ValueError:
            return False, None
        return (True, v) if isinstance(v, dict if kind == "object" else list) else (False, None)
    return False, None


def coerce_value(raw: str, schema: dict | None) -> Any:
    """A parameter value written as text -> the JSON type its schema declares (text when nothing fits)."""
    kinds = _schema_types(schema)
    if not kinds:
        s = raw.strip()
        if s[:1] in ("{", "["):
            ok, v = _as_type(s, "object" if s[0] == "{" else "array")
            if ok:
                return v
        return raw
    for kind in sorted(kinds, key=lambda k: k == "string"):  # a typed reading first, text last
        ok, v = _as_type(raw, kind)
        if ok:
            return v
    return raw


def coerce_arguments(values: dict[str, str], tool: Tool | None) -> dict:
    props = (tool.parameters.get("properties") or {}) if tool is not None else {}
    return {k: coerce_value(v, props.get(k)) for k, v in values.items()}


def log_skipped(skipped: list[str], api: str) -> None:
    if skipped:
        log.info("%s: ignored %d hosted tool(s) this server cannot run: %s", api, len(skipped),
                 ", ".join(sorted(set(skipped))))
