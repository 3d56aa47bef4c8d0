"""Tokenizer: encode/decode, chat template, EOS ids, streaming detokenization across UTF-8 splits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mtplx.tokenizer import Tokenizer, TokenizerError


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from mtplx.checkpoint.synthetic import write_tokenizer

    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d, 300)  # tiny byte-level BPE: multi-byte characters split across tokens
    (d / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    return d


TEXTS = [
    "Hello, world! The quick brown fox.",
    "naïve café — 日本語のテキスト 🙂🚀 done",
    "emoji run: 👩‍👩‍👧‍👦🏳️‍🌈 and \u00e9\u0301 combining",
    "   leading spaces\n\ttabs\r\nnewlines  ",
]


def test_roundtrip_and_eos(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    assert tok.vocab_size == 300
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == t
    im_end = tok.token_to_id("<|im_end|>")
    eot = tok.token_to_id("<|endoftext|>")
    # generation_config first, then config.json, then tokenizer_config's eos_token
    assert tok.eos_token_ids[:2] == [im_end, eot] and 7 in tok.eos_token_ids


def test_streaming_detokenizer_never_splits_characters(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    for t in TEXTS:
        ids = tok.encode(t)
        assert len(ids) > len(t.encode("utf-8")) // 4  # really split into small pieces
        d = tok.detokenizer()
        pieces = [d.add(i) for i in ids] + [d.flush()]
        assert "".join(pieces) == t
        assert not any("\ufffd" in p for p in pieces)


def test_streaming_random_ids_match_full_decode(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    g = np.random.default_rng(0)
    for _ in range(20):
        ids = [int(x) for x in g.integers(0, 290, 40)]
        d = tok.detokenizer()
        out = "".join(d.add(i) for i in ids) + d.flush()
        assert out == tok.decode(ids)


def test_special_tokens_skipped_in_stream(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    ids = tok.encode("hi") + [tok.token_to_id("<|im_end|>")] + tok.encode(" there")
    d = tok.detokenizer()
    assert "".join(d.add(i) for i in ids) + d.flush() == "hi there"


def test_chat_template(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs)
    assert "<|im_start|>user" in text and "Hi" in text and "Be brief." in text
    assert text.rstrip().endswith("<|im_start|>assistant")
    ids = tok.encode_chat(msgs)
    assert tok.token_to_id("<|im_start|>") in ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_hf_style_template_features(tmp_path, tok_dir):
    # loopcontrols, tojson, raise_exception, namespace, trim_blocks: what Qwen templates use
    tpl = (
        "{%- set ns = namespace(n=0) %}"
        "{%- for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
        "{%- set ns.n = ns.n + 1 %}{{ m.role }}:{{ m.content | tojson }}\n"
        "{%- if loop.index == 5 %}{% break %}{% endif %}{% endfor %}"
        "{%- if add_generation_prompt %}assistant:{% endif %}"
        "{%- if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}"
    )
    for f in ("tokenizer.json", "generation_config.json"):
        (tmp_path / f).write_bytes((tok_dir / f).read_bytes())
    (tmp_path / "chat_template.jinja").write_text(tpl)
    tok = Tokenizer.from_dir(tmp_path)
    out = tok.apply_chat_template([{"role": "user", "content": "é\"x"}], enable_thinking=False)
    assert out == 'user:"é\\"x"assistant:<no-think>'  # '{%-' eats the newline
    with pytest.raises(TokenizerError, match="bad role"):
        tok.apply_chat_template([{"role": "bad", "content": ""}])


def test_missing_tokenizer_and_template_errors(tmp_path, tok_dir):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    tok = Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    assert isinstance(TokenizerError("x"), ValueError)  # the CLI prints it as a one-line error


def test_long_texts_encode_the_same_with_the_gil_released(tok_dir):
    import mtplx.tokenizer as tkmod

    tok = Tokenizer.from_dir(tok_dir)
    text = "héllo wörld <|im_end|> 東京\n" * (tkmod.LONG_TEXT // 20)
    assert len(text) > tkmod.LONG_TEXT
    assert tok.encode(text) == list(tok._tk.encode(text).ids)
    assert tok.encode(text, add_special_tokens=False) == list(tok._tk.encode(text, add_special_tokens=False).ids)
