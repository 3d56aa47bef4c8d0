"""Tokenizer of a checkpoint: `tokenizers`-backed encode/decode, the chat template (jinja2, as
transformers renders it), EOS ids, and an incremental detokenizer for streaming.

    tok = Tokenizer.from_dir(model_dir)
    ids = tok.encode("hello")                       # list[int]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    detok = tok.detokenizer(); detok.add(id) -> str; detok.flush() -> str
    tok.eos_token_ids                               # list[int]

Files read (whichever exist): tokenizer.json (required), tokenizer_config.json (chat_template,
eos/bos/pad tokens), chat_template.jinja / chat_template.json, generation_config.json and
config.json (eos_token_id).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any


LONG_TEXT = 1 << 15  # characters


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or used; the message says what to do."""


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e


def _token_str(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):  # AddedToken serialisation
        return v["content"]
    return None


def _as_id_list(v: Any) -> list[int]:
    if v is None:
        return []
    if isinstance(v, int):
        return [v]
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v if isinstance(x, int)]
    return []


class IncrementalDetokenizer:
    """Streams text as tokens are decided, never splitting a UTF-8 character.

    Keeps a small window of already-released tokens as context (prefix_offset..read_offset)
    so decoders that depend on neighbours decode consistently; text is released only when
    the decoded window does not end in an incomplete character (U+FFFD). The concatenation of
    every `add` plus `flush` equals `decode(all ids)` for byte-level tokenizers.
    """

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self._prefix : self._read])
        new = self._decode(self.ids[self._prefix :])
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return new[len(prefix) :]
        return ""

    def flush(self) -> str:
        prefix = self._decode(self.ids[self._prefix : self._read])
        new = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return new[len(prefix) :] if len(new) > len(prefix) else ""

    @property
    def text(self) -> str:
        return self._decode(self.ids)


class Tokenizer:
    def __init__(
        self,
        backend: Any,  # tokenizers.Tokenizer
        chat_template: str | None = None,
        eos_token_ids: list[int] | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ):
        self._tk = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.eos_token_ids = list(eos_token_ids or [])
        self._template = None

    # ---- loading -----------------------------------------------------------------------
    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as _HFTokenizer

        d = Path(model_dir)
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(
                f"no tokenizer.json in {d}: this checkpoint has no tokenizer; pass token ids "
                f"(Python API) or copy the tokenizer files of the base model into the folder"
            )
        try:
            tk = _HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise TokenizerError(f"cannot load {tj}: {e}") from e
        cfg = _read_json(d / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        elif (d / "chat_template.json").is_file():
            template = _read_json(d / "chat_template.json").get("chat_template", template)
        eos_tok = _token_str(cfg.get("eos_token"))
        eos: list[int] = []
        gen = _read_json(d / "generation_config.json")
        mcfg = _read_json(d / "config.json")
        for src in (
            gen.get("eos_token_id"),
            mcfg.get("eos_token_id"),
            (mcfg.get("text_config") or {}).get("eos_token_id"),
        ):
            for i in _as_id_list(src):
                if i not in eos:
                    eos.append(i)
        if eos_tok is not None:
            i = tk.token_to_id(eos_tok)
            if i is not None and i not in eos:
                eos.append(i)
        return cls(
            tk,
            chat_template=template if isinstance(template, str) else None,
            eos_token_ids=eos,
            bos_token=_token_str(cfg.get("bos_token")),
            eos_token=eos_tok,
            pad_token=_token_str(cfg.get("pad_token")),
        )

    # ---- encode / decode ---------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > LONG_TEXT:  # encode_batch releases the GIL: a server's event loop keeps running
            return list(self._tk.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
        return list(self._tk.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens)

    # ---- chat template -----------------------------------------------------------------
    def _compiled_template(self):
        if self._template is None:
            import jinja2
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TokenizerError(f"chat template: {message}")

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

            def strftime_now(fmt):
                return datetime.now().strftime(fmt)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = strftime_now
            try:
                self._template = env.from_string(self.chat_template)
            except jinja2.TemplateError as e:
                raise TokenizerError(f"the checkpoint's chat template does not parse: {e}") from e
        return self._template

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render messages with the checkpoint's template (as transformers does) -> text."""
        if not self.chat_template:
            raise TokenizerError(
                "this checkpoint has no chat template (tokenizer_config.json 'chat_template' or "
                "chat_template.jinja): run without --chat, or add a template to the checkpoint"
            )
        return self._compiled_template().render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            **kwargs,
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)
