"""`response_format` -> a grammar for structured output (mtplx/decoding/grammar.py, llguidance)."""

from __future__ import annotations

from typing import Any

from mtplx.server.errors import APIError


def grammar_for(model, response_format: dict[str, Any] | None):
    """None / text -> None; json_object -> any JSON object; json_schema -> that schema. A 400 for
    anything else, an invalid schema, or a schema the engine does not support."""
    if not response_format or response_format.get("type") in (None, "text"):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        schema = None
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise APIError(400, "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                           param="response_format")
        schema = spec.get("schema", {})
    else:
        raise APIError(400, f"response_format type {kind!r} is not supported: use text, json_object or json_schema",
                       param="response_format")
    compile_for = getattr(model, "compile_json", None)
    if compile_for is None:
        raise APIError(400, "structured output needs a model with a tokenizer", param="response_format")
    from mtplx.decoding.grammar import GrammarError

    try:
        return compile_for(schema)
    except GrammarError as e:
        raise APIError(400, str(e), param="response_format") from None


__all__ = ["grammar_for"]
