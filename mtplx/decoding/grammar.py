"""Structured output through llguidance: JSON schemas (and any JSON object) as token masks.

    g = compile_json(tokenizer, vocab_size, eos_ids, schema)   # schema None: any JSON object
    Generation(..., grammar=g.matcher())                       # a fresh matcher per request

The matcher is driven by mtplx.decoding.processors.GrammarMask at every drafted prefix. Errors
in the schema (invalid, or features the engine does not support) are `GrammarError`s with the
engine's message: the server turns them into a 400.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class GrammarError(ValueError):
    pass


def _llg():
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - a dependency of the serve extra
        raise GrammarError(f"structured output needs llguidance: pip install llguidance ({e})") from None
    return llguidance


def llg_tokenizer(tokenizer, vocab_size: int, eos_ids: list[int]):
    """llguidance's view of a mtplx Tokenizer (built once per tokenizer, ~1 s on big vocabularies)."""
    cached = getattr(tokenizer, "_llg_tokenizer", None)
    if cached is not None:
        return cached
    llg = _llg()
    backend = getattr(tokenizer, "_tk", None)
    if backend is None:
        raise GrammarError("structured output needs the checkpoint's tokenizer.json")
    tok = llg.LLTokenizer(backend.to_str(), n_vocab=int(vocab_size), eos_token=int(eos_ids[0]) if eos_ids else None)
    tokenizer._llg_tokenizer = tok
    return tok


@dataclass
class CompiledGrammar:
    tokenizer: Any  # llguidance.LLTokenizer
    grammar: str

    def matcher(self):
        llg = _llg()
        m = llg.LLMatcher(self.tokenizer, self.grammar, log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error())
        return m


def compile_json(tokenizer, vocab_size: int, eos_ids: list[int], schema: dict | None) -> CompiledGrammar:
    """A JSON schema (dict) or None (any JSON object) -> a grammar checked against the tokenizer."""
    llg = _llg()
    if schema is not None and not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema if schema is not None else {"type": "object"}),
                                                         defaults={"whitespace_flexible": False})
    except (ValueError, TypeError) as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None
    tok = llg_tokenizer(tokenizer, vocab_size, eos_ids)
    bad, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, tok)
    if bad:
        raise GrammarError(f"unsupported or invalid JSON schema: {messages[0] if messages else 'rejected'}")
    return CompiledGrammar(tok, grammar)


def compile_lark(tokenizer, vocab_size: int, eos_ids: list[int], lark: str) -> CompiledGrammar:
    """An llguidance Lark grammar (e.g. a forced tool call's, mtplx/chat/call_grammar.py)."""
    llg = _llg()
    grammar = llg.LLMatcher.grammar_from_lark(lark)
    tok = llg_tokenizer(tokenizer, vocab_size, eos_ids)
    bad, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, tok)
    if bad:
        raise GrammarError(messages[0] if messages else "grammar rejected")
    return CompiledGrammar(tok, grammar)


__all__ = ["GrammarError", "CompiledGrammar", "compile_json", "compile_lark", "llg_tokenizer"]
