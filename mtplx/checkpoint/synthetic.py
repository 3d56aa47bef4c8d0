"""Synthetic checkpoints: random weights with the REAL key names and shapes of the family.

    ck = write_synthetic_checkpoint(out_dir, "qwen3.5-35b-a3b", layout="mlx", head="mlx_sidecar",
                                    quantize=(4, 64), tokenizer=True)
    ck.path, ck.config (ModelConfig), ck.canonical  # what canonical_weights must yield

Layouts (`layout`, and `head_layout` for the MTP head, default: per-expert for HF, switch_mlp
for MLX, as the real releases):
  "hf"        HF names, per-expert 2-D experts, conv [C, 1, K], zero-centred norms
  "hf_fused"  as "hf" with fused 3-D experts `gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I]
  "mlx"       mlx-lm names (`language_model.model.*` for Qwen3.5), `switch_mlp` experts,
              conv [C, K, 1], norms stored 1 + w; optionally MLX-affine quantized
Heads (`head`): "embedded" (`mtp.*` in the model files), "sidecar_file" (`mtp.safetensors`,
or `sidecar_name`), "sidecar_dir" (`mtp/weights.safetensors`), "mlx_sidecar" (folder `mtp/`
with config `qwen3_5_mtp`, keys without `mtp.`, norms 1 + w, switch_mlp), "none".
Qwen3-Next files always hold fused `in_proj_qkvz` / `in_proj_ba`, as the release does.

Norm weights are drawn zero-centred (w ~ 0.05 N(0, 1)) and written in the file's convention.
`router_near_ties=eps` makes the router rows of odd experts copies of the even ones plus
eps * N(0, 1) (eps=0: exact duplicates), for MoE exactness tests.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from .config import MTP_SIDECAR_MODEL_TYPE, ModelConfig
from .encode import Encoder, encode_group, is_norm_name
from .layout import canonical_shapes
from .norms import ONE_PLUS_W, ZERO_CENTERED
from .store import INDEX_NAME, save_safetensors

LAYOUTS = ("hf", "hf_fused", "mlx")
HEADS = ("embedded", "sidecar_file", "sidecar_dir", "mlx_sidecar", "none")
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}

_COMMON_TEXT = dict(
    hidden_act="silu", head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16,
    linear_value_head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=4096,
    full_attention_interval=4, attn_output_gate=True, attention_bias=False,
    vocab_size=512,
)
_ROPE_35 = {"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1], "mrope_interleaved": True}


def _q35(model_type: str, arch: str, text: dict, tied: bool) -> dict:
    t = {**_COMMON_TEXT, **text, "model_type": model_type + "_text", "tie_word_embeddings": tied,
         "mtp_num_hidden_layers": 1, "rope_parameters": dict(_ROPE_35), "eos_token_id": 2, "bos_token_id": None}
    return {"architectures": [arch], "model_type": model_type, "text_config": t,
            "tie_word_embeddings": tied, "vision_config": {"depth": 1, "hidden_size": 32}}


# Scaled-down versions of the family table (reference section 4): real structure (hybrid
# layers, head ratios, expert counts where it matters), tiny widths.
PRESETS: dict[str, dict] = {
    "qwen3.5-0.8b": _q35("qwen3_5", "Qwen3_5ForConditionalGeneration", dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        linear_num_key_heads=4, linear_num_value_heads=4, intermediate_size=128), tied=True),
    "qwen3.5-9b": _q35("qwen3_5", "Qwen3_5ForConditionalGeneration", dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        linear_num_key_heads=2, linear_num_value_heads=4, intermediate_size=192), tied=False),
    "qwen3.5-35b-a3b": _q35("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        linear_num_key_heads=2, linear_num_value_heads=4, num_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=32, shared_expert_intermediate_size=32, norm_topk_prob=True), tied=False),
    "qwen3.5-122b-a10b": _q35("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        linear_num_key_heads=2, linear_num_value_heads=8, num_experts=256, num_experts_per_tok=8,
        moe_intermediate_size=16, shared_expert_intermediate_size=16, norm_topk_prob=True), tied=False),
    "qwen3-next-80b-a3b": {
        **_COMMON_TEXT, "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
        "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "intermediate_size": 128,
        "num_experts": 32, "num_experts_per_tok": 4, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "tie_word_embeddings": False, "eos_token_id": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25},
    },
}
PRESET_ALIASES = {"0.8b": "qwen3.5-0.8b", "9b": "qwen3.5-9b", "35b-a3b": "qwen3.5-35b-a3b",
                  "122b-a10b": "qwen3.5-122b-a10b", "next-80b": "qwen3-next-80b-a3b",
                  "qwen3-next": "qwen3-next-80b-a3b"}


def preset_config(name: str, **overrides) -> dict:
    """A deep copy of a preset config.json dict; `overrides` go into the text config."""
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    d = copy.deepcopy(PRESETS[key])
    target = d.get("text_config", d)
    target.update(overrides)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        target.pop("layer_types", None)
    return d


# ---- random canonical weights (norms zero-centred: `w`, not 1 + w) -----------------------------


def random_canonical(cfg: ModelConfig, *, n_mtp_layers: int = 1, seed: int = 0,
                     router_near_ties: float | None = None) -> dict[str, np.ndarray]:
    """fp32 random weights under canonical names; norm weights ZERO-CENTRED (w, not 1 + w)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in canonical_shapes(cfg, n_mtp_layers).items():
        if is_norm_name(name):
            a = 0.05 * rng.standard_normal(shape)
        elif name.endswith("linear_attn.norm.weight"):
            a = 1.0 + 0.05 * rng.standard_normal(shape)
        elif name.endswith("A_log"):
            a = np.log(rng.uniform(1.0, 16.0, shape))
        elif name.endswith("dt_bias"):
            a = rng.uniform(-1.0, 1.0, shape)
        elif name.endswith("conv1d.weight"):
            a = rng.standard_normal(shape) / math.sqrt(shape[-1])
        elif name == "embed_tokens.weight":
            a = rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) / math.sqrt(shape[-1])
        a = a.astype(np.float32)
        if router_near_ties is not None and name.endswith("mlp.gate.weight"):
            noise = rng.standard_normal(a[1::2].shape).astype(np.float32)
            a[1::2] = a[0::2][: a[1::2].shape[0]] + np.float32(router_near_ties) * noise
        out[name] = a
    return out


# ---- writing -----------------------------------------------------------------------------
@dataclass
class SyntheticCheckpoint:
    path: Path
    config: ModelConfig
    canonical: dict[str, np.ndarray]  # what canonical_weights(store, config) must yield
    files: list[Path] = field(default_factory=list)
    head_kind: str = "embedded"


def _write_files(folder: Path, tensors: dict[str, np.ndarray], shards: int, metadata: dict,
                 single_name: str = "model.safetensors") -> list[Path]:
    names = list(tensors)
    if shards <= 1:
        p = folder / single_name
        save_safetensors(p, tensors, metadata)
        return [p]
    per = math.ceil(len(names) / shards)
    weight_map, files = {}, []
    total = 0
    for s in range(shards):
        chunk = names[s * per:(s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_safetensors(folder / fname, {k: tensors[k] for k in chunk}, metadata)
        files.append(folder / fname)
        for k in chunk:
            weight_map[k] = fname
            total += tensors[k].nbytes
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return files


def write_synthetic_checkpoint(
    out_dir,
    config="qwen3.5-35b-a3b",
    *,
    layout: str = "hf",
    head: str = "embedded",
    head_layout: str | None = None,
    shards: int = 1,
    quantize: tuple[int, int] | None = None,
    tokenizer: bool = False,
    dtype: str = "float32",
    seed: int = 0,
    norm_convention: str | None = None,
    head_norm_convention: str | None = None,
    n_mtp_layers: int | None = None,
    router_near_ties: float | None = None,
    sidecar_name: str | None = None,
    head_hidden_size: int | None = None,
) -> SyntheticCheckpoint:
    """Write a random checkpoint folder and return what canonical_weights must give for it.

    config: a preset name (see PRESETS) or a config.json dict. layout/head/head_layout: see the
    module docstring. quantize=(bits, group_size) requires layout "mlx" (or an mlx_sidecar head:
    then only the head is quantized when the layout is HF). norm_convention: how norms are
    stored (default: zero-centred for HF, one_plus_w for MLX); head_norm_convention overrides
    it for the head (to write deliberately mis-converted heads). n_mtp_layers: head depth
    (default: the config's, else 1). head_hidden_size: write a head for another hidden size
    (a mismatched sidecar), for gate tests.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if head == "mlx_sidecar":
        head_layout = "mlx"
    head_layout = head_layout or ("mlx" if layout == "mlx" else "hf")
    if head_layout not in LAYOUTS:
        raise ValueError(f"head_layout must be one of {LAYOUTS}, got {head_layout!r}")
    if quantize is not None and layout != "mlx" and head_layout != "mlx":
        raise ValueError("quantize needs layout='mlx' or an MLX head (MLX-affine quantization is an MLX format)")
    np_dtype = DTYPES[dtype]

    raw = preset_config(config) if isinstance(config, str) else copy.deepcopy(config)
    text = raw.get("text_config", raw)
    cfg = ModelConfig.from_dict(raw)
    if n_mtp_layers is None:
        n_mtp_layers = cfg.num_mtp_layers if cfg.num_mtp_layers is not None else 1
    if head == "none":
        n_mtp_layers_written = 0
    else:
        n_mtp_layers_written = n_mtp_layers
    if cfg.family == "qwen3_5":
        text["mtp_num_hidden_layers"] = n_mtp_layers
    quant_backbone = quantize if layout == "mlx" else None
    quant_head = quantize if head_layout == "mlx" else None

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_dict(raw)
    canon = random_canonical(cfg, n_mtp_layers=n_mtp_layers_written, seed=seed, router_near_ties=router_near_ties)
    if head_hidden_size is not None and n_mtp_layers_written:
        other_raw = copy.deepcopy(raw)
        other_raw.get("text_config", other_raw)["hidden_size"] = head_hidden_size
        other = ModelConfig.from_dict(other_raw)
        other_canon = random_canonical(other, n_mtp_layers=n_mtp_layers_written, seed=seed + 1)
        canon = {k: v for k, v in canon.items() if not k.startswith("mtp.")}
        canon.update({k: v for k, v in other_canon.items() if k.startswith("mtp.")})

    # backbone
    bb_conv = norm_convention or (ONE_PLUS_W if layout == "mlx" else ZERO_CENTERED)
    hd_conv = head_norm_convention or norm_convention or (ONE_PLUS_W if head_layout == "mlx" else ZERO_CENTERED)
    is35 = cfg.family == "qwen3_5"
    if layout == "mlx":
        bb_prefix = "language_model.model." if is35 else "model."
        lm_prefix = "language_model." if is35 else ""
    else:
        bb_prefix = "model.language_model." if is35 else "model."
        lm_prefix = ""
    overrides: dict = {}
    bb = Encoder(cfg, layout, bb_prefix, bb_conv, np_dtype, quant_backbone, overrides, bb_prefix)
    bb_names = [k for k in canon if not k.startswith("mtp.") and k != "lm_head.weight"]
    encode_group(bb, canon, bb_names, "", "", layout)
    lm = Encoder(cfg, layout, lm_prefix, bb_conv, np_dtype, quant_backbone, overrides, lm_prefix)
    if "lm_head.weight" in canon:
        lm.linear("lm_head", "lm_head", canon["lm_head.weight"])
    file_tensors = {**bb.file, **lm.file}
    expected = {**bb.expected, **lm.expected}

    # head
    head_files: dict[str, np.ndarray] = {}
    head_overrides: dict = {}
    if n_mtp_layers_written:
        mlx_side = head == "mlx_sidecar"
        hp = "" if mlx_side else "mtp."
        he = Encoder(cfg, head_layout, hp, hd_conv, np_dtype, quant_head,
                      head_overrides if mlx_side else overrides, hp)
        if head_hidden_size is not None:
            he.cfg = other  # shapes of the other model
        encode_group(he, canon, [k for k in canon if k.startswith("mtp.")], "mtp.", "mtp.", head_layout)
        head_files = he.file
        expected.update(he.expected)

    quant_block = None
    if quant_backbone is not None:
        quant_block = {"group_size": quant_backbone[1], "bits": quant_backbone[0], "mode": "affine", **overrides}
        raw["quantization"] = quant_block
        raw["quantization_config"] = dict(quant_block)
    elif quant_head is not None and head != "mlx_sidecar":
        quant_block = {"group_size": quant_head[1], "bits": quant_head[0], "mode": "affine", **overrides}
        raw["quantization"] = quant_block
        raw["quantization_config"] = dict(quant_block)
    meta = {"format": "mlx" if layout == "mlx" else "pt"}
    written: list[Path] = []
    if head == "embedded":
        file_tensors.update(head_files)
        head_files = {}
    written += _write_files(out, file_tensors, shards, meta)
    if head_files:
        hmeta = {"format": "mlx" if head_layout == "mlx" else "pt"}
        if head == "sidecar_file":
            p = out / (sidecar_name or "mtp.safetensors")
            save_safetensors(p, head_files, hmeta)
            written.append(p)
        elif head == "sidecar_dir":
            p = out / "mtp" / "weights.safetensors"
            save_safetensors(p, head_files, hmeta)
            written.append(p)
        else:
            d = out / (sidecar_name or "mtp")
            d.mkdir(parents=True, exist_ok=True)
            side_text = dict(text if head_hidden_size is None else {**text, "hidden_size": head_hidden_size})
            side_cfg = {**{k: v for k, v in side_text.items() if k != "model_type"},
                        "model_type": MTP_SIDECAR_MODEL_TYPE,
                        "base_model_type": raw.get("model_type"),
                        "num_nextn_predict_layers": n_mtp_layers, "mtp_num_hidden_layers": n_mtp_layers}
            side_cfg.pop("text_config", None)
            side_cfg.pop("quantization", None)
            side_cfg.pop("quantization_config", None)
            if quant_head is not None:
                side_cfg["quantization"] = {"group_size": quant_head[1], "bits": quant_head[0], "mode": "affine",
                                            **head_overrides}
            (d / "config.json").write_text(json.dumps(side_cfg, indent=1))
            save_safetensors(d / "model.safetensors", head_files, hmeta)
            written.append(d / "model.safetensors")
    (out / "config.json").write_text(json.dumps(raw, indent=1))
    cfg = ModelConfig.from_dict(raw)
    if tokenizer:
        write_tokenizer(out, cfg.vocab_size)
    return SyntheticCheckpoint(out, cfg, expected, written, head)


# ---- tokenizer ---------------------------------------------------------------------------
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Speculative decoding drafts tokens with a small head and verifies them in one pass.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Hello! How are you today? I am fine, thank you. What would you like to know?",
    "Qwen models use a hybrid of gated delta net and full attention layers.",
    "1 2 3 4 5 6 7 8 9 10 100 1000 the of and to in is that it for on with as was",
]


def write_tokenizer(out_dir, vocab_size: int) -> None:
    """A tiny byte-level BPE (tokenizers) with ChatML specials; exactly `vocab_size` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers, AddedToken

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} too small for a byte-level tokenizer (need >= 259)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    n = tok.get_vocab_size()
    if n < vocab_size:
        tok.add_special_tokens([AddedToken(f"<|reserved_{i}|>", special=True) for i in range(vocab_size - n)])
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    out = Path(out_dir)
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
        "chat_template": CHATML_TEMPLATE, "model_max_length": 4096,
        "added_tokens_decoder": {str(i): {"content": t, "special": True} for t, i in ids.items()},
    }, indent=1))
    (out / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"],
    }, indent=1))
