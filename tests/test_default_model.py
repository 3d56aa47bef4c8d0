"""The embedded default model: present in the package, passes inspect with its MTP head (MoE,
embedded, HF names), ships a ChatML tokenizer with the tool / think markers as single tokens and
the Qwen3.5-structured chat template, has 65536 positions, loads as the default of
`mtplx.load()`, greedy MTP decoding emits exactly the depth-0 tokens on it (code, chat and
tool prompts), and a tool task through the Python API comes back as a parsed call."""

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


MARKERS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS_SYSTEM = (
    "<|im_start|>system\n# Tools\n\nThese functions are available to you:\n\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Get the weather.", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
    "</tools>\n\nTo call a function, reply with exactly this nesting and nothing after it:\n\n"
    "<tool_call>\n<function=function_name>\n<parameter=first_parameter>\nvalue\n</parameter>\n"
    "<parameter=second_parameter>\na value that may\nrun over several lines\n</parameter>\n</function>\n"
    "</tool_call>\n\n<IMPORTANT>\n"
    "- Every call is one <function=...></function> block inside <tool_call></tool_call> tags.\n"
    "- Give every required parameter.\n"
    "- You may explain your reasoning in plain text before a call, never after it.\n"
    "- If no function fits, answer normally and do not mention functions.\n</IMPORTANT>")


@pytest.fixture(scope="module")
def model():
    import mtplx

    return mtplx.load()


def test_markers_are_single_text_tokens(model):
    tok = model.tokenizer
    for m in MARKERS:
        ids = tok.encode(m)
        assert len(ids) == 1, (m, ids)
        assert tok.decode(ids) == m  # added, not special: decoded as text for the parsers
    assert tok.decode(tok.encode("<|im_end|>")) == ""
    assert model.config.max_position_embeddings >= 65536


def test_template_renders_tools_calls_results_thinking(model):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "The user wants the weather.",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18C, sunny"},
    ]
    text = model.tokenizer.apply_chat_template(messages, tools=[WEATHER], enable_thinking=True)
    assert text == (
        TOOLS_SYSTEM + "\n\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nThe user wants the weather.\n</think>\n\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
        "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18C, sunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n")
    # thinking off (the default): the generation prompt carries an empty block; an earlier turn's
    # reasoning (before the last real user query) is dropped
    later = messages + [{"role": "assistant", "content": "It is 18C and sunny."},
                        {"role": "user", "content": "Thanks"}]
    text = model.tokenizer.apply_chat_template(later, tools=[WEATHER])
    assert text.endswith(
        "<|im_start|>assistant\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18C, sunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nIt is 18C and sunny.<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


CHAT = [{"role": "user", "content": "What does `heapq.heappush` do?"}]
TOOL_TASK = [{"role": "user", "content": "Please get the weather for city Oslo."}]


def test_greedy_mtp_parity_on_chat_and_tool_prompts(model, one_thread):
    import mtplx
    from mtplx.decoding.params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=48)
    for messages, kw in ((CHAT, {}), (TOOL_TASK, {"tools": [WEATHER]}), (CHAT, {"enable_thinking": True})):
        base = mtplx.generate(model, messages, params, depth=0, chat_kwargs=kw)
        for depth in (2, 3):
            out = mtplx.generate(model, messages, params, depth=depth, chat_kwargs=kw)
            assert out.token_ids == base.token_ids, (messages, kw, depth)


def test_chat_turn_ends(model, one_thread):
    import mtplx
    from mtplx.decoding.params import SamplingParams

    r = mtplx.generate(model, CHAT, SamplingParams(temperature=0.0, max_tokens=256), depth=3)
    assert r.finish_reason == "stop" and r.token_ids[-1] == model.tokenizer.token_to_id("<|im_end|>"), r.text


def test_tool_task_through_the_python_api(model, one_thread):
    import mtplx
    from mtplx.decoding.params import SamplingParams

    reply = mtplx.chat(model, TOOL_TASK, tools=[WEATHER], params=SamplingParams(temperature=0.0, max_tokens=128))
    assert reply.finish_reason == "tool_calls", reply.result.text
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("get_weather", {"city": "Oslo"})]
    assert not reply.failures


@pytest.mark.parametrize("dtype,hidden_source", [("float32", "post"), ("bfloat16", "post"), ("float32", "pre")])
def test_drafts_in_one_call_equal_step_by_step(one_thread, monkeypatch, dtype, hidden_source):
    """Greedy drafting in one compiled call (TorchSession.chain_drafts, Step.draft_chain) drafts
    exactly the tokens of one head call and one argmax per step, cycle by cycle, and the output
    stays depth 0's."""
    import mtplx
    from mtplx.backends.torch.session import TorchSession
    from mtplx.decoding.loop import generate_steps
    from mtplx.decoding.params import SamplingParams

    model = mtplx.load(dtype=dtype)
    if model.model.kernel != "fused":
        pytest.skip("the fused kernel is not available here")
    ids = model.encode_prompt(CHAT)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    drafts = {}
    real_draft = TorchSession.draft

    def recording(self, depth, p, rng):
        out = real_draft(self, depth, p, rng)
        drafts[self.chain_drafts].append(list(out[0]))
        return out

    monkeypatch.setattr(TorchSession, "draft", recording)
    outs = {}
    for chained in (True, False):
        monkeypatch.setattr(TorchSession, "chain_drafts", chained)
        drafts[chained] = []
        session = TorchSession(model.model, hidden_source=hidden_source)
        outs[chained] = [s.token_id for s in generate_steps(session, ids, params, depth=3)]
    base = [s.token_id for s in generate_steps(TorchSession(model.model, hidden_source=hidden_source), ids, params)]
    assert len(drafts[True]) >= 10 and drafts[True] == drafts[False]
    assert outs[True] == outs[False] == base
