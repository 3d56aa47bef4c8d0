"""Model configuration: one dataclass for Qwen3.5 / Qwen3.6 / Qwen3-Next, dense and MoE.

`ModelConfig.from_dict` accepts the config.json of every supported release (nested
`text_config`, flat Qwen3-Next, MLX-converted files with a `quantization` block) and ignores
keys it does not know. Everything downstream (key layouts, the tensor gate, the model code)
reads dimensions from here, never from hard-coded numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UnsupportedArchitecture

# model_type -> (family, is_moe). Families: "qwen3_5" (Qwen3.5/3.6 unfused projections),
# "qwen3_next" (fused in_proj_qkvz / in_proj_ba).
SUPPORTED_MODEL_TYPES: dict[str, tuple[str, bool]] = {
    "qwen3_5": ("qwen3_5", False),
    "qwen3_5_text": ("qwen3_5", False),
    "qwen3_5_moe": ("qwen3_5", True),
    "qwen3_5_moe_text": ("qwen3_5", True),
    "qwen3_next": ("qwen3_next", True),
}
MTP_SIDECAR_MODEL_TYPE = "qwen3_5_mtp"

FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"


@dataclass
class QuantizationConfig:
    """MLX affine quantization: a default and per-module overrides.

    `overrides` maps a module path (as written in the file, e.g.
    "language_model.model.layers.0.mlp.gate") to {"bits", "group_size"} or to False
    (that module is not quantized).
    """

    bits: int = 4
    group_size: int = 64
    mode: str = "affine"
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantizationConfig":
        bits = int(d.get("bits", 4))
        group_size = int(d.get("group_size", 64))
        mode = str(d.get("mode", "affine"))
        overrides = {k: v for k, v in d.items() if k not in ("bits", "group_size", "mode")}
        return cls(bits=bits, group_size=group_size, mode=mode, overrides=overrides)

    def for_module(self, module_path: str) -> tuple[int, int] | None:
        """(bits, group_size) for a module, or None when that module is left unquantized."""
        o = self.overrides.get(module_path)
        if o is None:
            return self.bits, self.group_size
        if o is False:
            return None
        if isinstance(o, dict):
            return int(o.get("bits", self.bits)), int(o.get("group_size", self.group_size))
        return self.bits, self.group_size

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "mode": self.mode, **self.overrides}


@dataclass
class ModelConfig:
    model_type: str  # as written in the file (e.g. "qwen3_5_moe")
    family: str  # "qwen3_5" | "qwen3_next"
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: list[str]
    intermediate_size: int = 0  # dense MLP width (0 for MoE-only models)
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attn_output_gate: bool = True
    # MoE (num_experts == 0 means dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    # MTP: None = the config does not say (Qwen3-Next: count from the weights)
    num_mtp_layers: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    quantization: QuantizationConfig | None = None
    is_vlm_wrapper: bool = False  # config had a text_config (Qwen3.5/3.6 VL checkpoints)
    raw: dict = field(default_factory=dict, repr=False)

    # ---- derived dimensions -------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:  # total key width of a GatedDeltaNet layer
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    def layer_is_moe(self, layer_idx: int) -> bool:
        """Whether backbone layer `layer_idx` has an MoE block (Qwen3-Next allows dense layers)."""
        if not self.is_moe or layer_idx in self.mlp_only_layers:
            return False
        return (layer_idx + 1) % max(self.decoder_sparse_step, 1) == 0

    @property
    def mtp_is_moe(self) -> bool:
        """The MTP layer uses the MoE block whenever the model is MoE."""
        return self.is_moe

    # ---- parsing ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise CheckpointError(f"config must be a JSON object, found {type(d).__name__}")
        outer = d
        text = d.get("text_config")
        is_vlm = isinstance(text, dict)
        # text_config values win; fall back to the outer dict for keys only written there
        merged = {**{k: v for k, v in outer.items() if k != "text_config"}, **(text or {})}
        model_type = str(outer.get("model_type") or merged.get("model_type") or "")
        if model_type == MTP_SIDECAR_MODEL_TYPE:
            model_type = str(merged.get("base_model_type") or merged.get("model_type") or model_type)
        if model_type not in SUPPORTED_MODEL_TYPES:
            text_type = (text or {}).get("model_type")
            if text_type in SUPPORTED_MODEL_TYPES:
                model_type = text_type
            else:
                known = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
                raise UnsupportedArchitecture(
                    f"unsupported model_type {model_type or '(missing)'!r}: mtplx runs {known}"
                )
        family, is_moe_type = SUPPORTED_MODEL_TYPES[model_type]

        def need(key: str):
            if key not in merged:
                raise CheckpointError(f"config.json is missing required key {key!r} for {model_type}")
            return merged[key]

        n_layers = int(need("num_hidden_layers"))
        layer_types = merged.get("layer_types")
        if layer_types is None:
            interval = int(merged.get("full_attention_interval", 4))
            layer_types = [
                FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(n_layers)
            ]
        layer_types = list(layer_types)
        if len(layer_types) != n_layers:
            raise CheckpointError(
                f"config layer_types has {len(layer_types)} entries, expected num_hidden_layers={n_layers}"
            )
        bad = sorted({t for t in layer_types if t not in (FULL_ATTENTION, LINEAR_ATTENTION)})
        if bad:
            raise CheckpointError(f"unknown layer types {bad} in config layer_types")

        rope = merged.get("rope_parameters") or merged.get("rope_scaling") or {}
        rope_theta = float(rope.get("rope_theta", merged.get("rope_theta", 10_000_000.0)))
        partial = float(rope.get("partial_rotary_factor", merged.get("partial_rotary_factor", 0.25)))

        hidden = int(need("hidden_size"))
        n_heads = int(need("num_attention_heads"))
        num_experts = int(merged.get("num_experts", 0) or 0) if is_moe_type else 0

        mtp_layers = merged.get("mtp_num_hidden_layers", merged.get("num_nextn_predict_layers"))
        quant = merged.get("quantization") or merged.get("quantization_config")
        quantization = None
        if isinstance(quant, dict) and quant.get("quant_method") in (None, "mlx"):
            if "bits" in quant or "group_size" in quant:
                quantization = QuantizationConfig.from_dict(quant)

        eos = merged.get("eos_token_id")
        eos_list = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])

        kw: dict[str, Any] = dict(
            model_type=model_type,
            family=family,
            hidden_size=hidden,
            num_hidden_layers=n_layers,
            vocab_size=int(need("vocab_size")),
            num_attention_heads=n_heads,
            num_key_value_heads=int(merged.get("num_key_value_heads", n_heads)),
            head_dim=int(merged.get("head_dim") or hidden // n_heads),
            layer_types=layer_types,
            intermediate_size=int(merged.get("intermediate_size", 0) or 0),
            rope_theta=rope_theta,
            partial_rotary_factor=partial,
            num_experts=num_experts,
            num_mtp_layers=None if mtp_layers is None else int(mtp_layers),
            eos_token_id=eos_list,
            quantization=quantization,
            is_vlm_wrapper=is_vlm,
            raw=d,
        )
        for name in (
            "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
            "linear_value_head_dim", "linear_conv_kernel_dim", "rms_norm_eps",
            "max_position_embeddings", "tie_word_embeddings", "attn_output_gate",
            "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
            "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "bos_token_id", "pad_token_id",
        ):
            if name in merged and merged[name] is not None:
                kw[name] = merged[name]
        if "tie_word_embeddings" in outer and "tie_word_embeddings" not in (text or {}):
            kw["tie_word_embeddings"] = bool(outer["tie_word_embeddings"])
        for name in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                     "linear_value_head_dim", "linear_conv_kernel_dim", "max_position_embeddings",
                     "num_experts_per_tok", "moe_intermediate_size",
                     "shared_expert_intermediate_size", "decoder_sparse_step"):
            if name in kw:
                kw[name] = int(kw[name])
        for name in ("tie_word_embeddings", "attn_output_gate", "norm_topk_prob"):
            if name in kw:
                kw[name] = bool(kw[name])
        kw["rms_norm_eps"] = float(kw.get("rms_norm_eps", 1e-6))
        kw["mlp_only_layers"] = [int(i) for i in kw.get("mlp_only_layers", [])]
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def bad(msg: str):
            raise CheckpointError(f"invalid config: {msg}")

        for name in ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "head_dim"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive, found {getattr(self, name)}")
        if self.num_attention_heads % max(self.num_key_value_heads, 1):
            bad(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.linear_num_value_heads % max(self.linear_num_key_heads, 1):
            bad(f"linear_num_value_heads={self.linear_num_value_heads} is not a multiple of "
                f"linear_num_key_heads={self.linear_num_key_heads}")
        if self.is_moe:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                bad(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}")
            if self.moe_intermediate_size <= 0:
                bad("MoE config needs moe_intermediate_size > 0")
        elif self.intermediate_size <= 0:
            bad("dense config needs intermediate_size > 0")

    def to_dict(self) -> dict:
        """A flat, self-describing dict (used by --json and by the synthetic writer)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("raw", "quantization")}
        out["quantization"] = self.quantization.to_dict() if self.quantization else None
        return out


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read and parse `config.json` of a checkpoint folder, with a clear error when it is not there."""
    path = Path(model_dir)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder that holds config.json")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} has no config.json: is this a Hugging Face / MLX checkpoint folder?")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    return ModelConfig.from_dict(raw)
