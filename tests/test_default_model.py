"""The embedded default model: present in the package, passes inspect with its MTP head (MoE,
embedded, HF names), ships a ChatML tokenizer, loads as the default of `mtplx.load()`, and
greedy MTP decoding emits exactly the depth-0 tokens on it."""

from __future__ import annotations

import json

import pytest

from mtplx.api import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "model.safetensors").is_file(),
                                reason="the default model is not built (recipes/default_model)")

PROMPT = "def median(data):\n    \"\"\"Return the median of numeric data.\"\"\"\n"


def test_files_and_size():
    names = {p.name for p in DEFAULT_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir())
    assert size < 25 * 2**20, size


def test_inspect_passes_with_moe_mtp_head():
    from mtplx.checkpoint.inspect import inspect_checkpoint

    rep = inspect_checkpoint(DEFAULT_MODEL_DIR)
    assert rep.exit_code == 0 and rep.head_present, rep.to_json()
    cfg = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert cfg["num_experts"] > 1 and cfg["num_experts_per_tok"] >= 1 and cfg["shared_expert_intermediate_size"] > 0
    assert {"linear_attention", "full_attention"} <= set(cfg["layer_types"])
    assert cfg["mtp_num_hidden_layers"] == 1
    from mtplx.checkpoint.store import open_store

    keys = set(open_store(DEFAULT_MODEL_DIR))
    assert "mtp.fc.weight" in keys and "mtp.layers.0.mlp.experts.0.gate_proj.weight" in keys
    assert any(k.startswith("model.layers.0.linear_attn.") for k in keys)


def test_tokenizer_is_chatml():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json"))
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert tok.token_to_id(t) is not None
    tc = json.loads((DEFAULT_MODEL_DIR / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tc["chat_template"]
    assert tok.decode(tok.encode(PROMPT).ids) == PROMPT


@pytest.fixture
def one_thread():
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a busy 2-core machine spin-wait: 10x slower
    yield
    torch.set_num_threads(prev)


def test_default_load_and_greedy_mtp_parity(one_thread):
    import mtplx
    from mtplx.decoding.params import SamplingParams

    model = mtplx.load()  # the default model
    assert model.has_mtp
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    base = mtplx.generate(model, PROMPT, params, depth=0)
    assert len(base.token_ids) == 40
    for depth in (1, 3):
        out = mtplx.generate(model, PROMPT, params, depth=depth)
        assert out.token_ids == base.token_ids, depth
        assert out.text == base.text
