"""Expected tensor names and shapes, derived from the config, for every storage layout.

Nothing here is a hard-coded count: the MTP head of an MoE model with E experts expects
3E + 17 tensors per layer in the HF per-expert layout (785 for E = 256), 19 with fused 3-D
experts, 20 with MLX `switch_mlp`, 15 for a dense head; quantized MLX modules add `.scales`
and `.biases`; N MTP layers repeat the per-layer block N times.

`canonical_shapes(cfg, n_mtp_layers)` is the canonical contract (docs/architecture.md);
`expected_group(cfg, group, fmt)` maps it to file names/shapes for one storage format;
`detect_format(keys, cfg, group)` tells which format a group of keys is stored in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import FULL_ATTENTION, ModelConfig, QuantizationConfig
from .names import is_norm, split_key

def _attn_mlp_shapes(cfg: ModelConfig, moe: bool) -> dict[str, tuple[int, ...]]:
    H, hd, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    q_rows = nh * hd * (2 if cfg.attn_output_gate else 1)
    s = {
        "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (q_rows, H), "self_attn.k_proj.weight": (nkv * hd, H),
        "self_attn.v_proj.weight": (nkv * hd, H), "self_attn.o_proj.weight": (H, nh * hd),
        "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
    }
    s.update(_mlp_shapes(cfg, moe))
    return s


def _mlp_shapes(cfg: ModelConfig, moe: bool) -> dict[str, tuple[int, ...]]:
    H = cfg.hidden_size
    if moe:
        E, I, Is = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
        return {
            "mlp.gate.weight": (E, H), "mlp.experts.gate_proj": (E, I, H), "mlp.experts.up_proj": (E, I, H),
            "mlp.experts.down_proj": (E, H, I), "mlp.shared_expert.gate_proj.weight": (Is, H),
            "mlp.shared_expert.up_proj.weight": (Is, H), "mlp.shared_expert.down_proj.weight": (H, Is),
            "mlp.shared_expert_gate.weight": (1, H),
        }
    I = cfg.intermediate_size
    return {"mlp.gate_proj.weight": (I, H), "mlp.up_proj.weight": (I, H), "mlp.down_proj.weight": (H, I)}


def _linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    H, nv = cfg.hidden_size, cfg.linear_num_value_heads
    return {
        "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
        "linear_attn.in_proj_qkv.weight": (cfg.linear_conv_dim, H),
        "linear_attn.in_proj_z.weight": (cfg.linear_value_dim, H),
        "linear_attn.in_proj_b.weight": (nv, H), "linear_attn.in_proj_a.weight": (nv, H),
        "linear_attn.conv1d.weight": (cfg.linear_conv_dim, cfg.linear_conv_kernel_dim),
        "linear_attn.A_log": (nv,), "linear_attn.dt_bias": (nv,),
        "linear_attn.norm.weight": (cfg.linear_value_head_dim,),
        "linear_attn.out_proj.weight": (cfg.hidden_size, cfg.linear_value_dim),
    }


def canonical_shapes(cfg: ModelConfig, n_mtp_layers: int) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape for a config (unquantized); the contract of docs/architecture.md."""
    H, V = cfg.hidden_size, cfg.vocab_size
    out: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (V, H)}
    for i, t in enumerate(cfg.layer_types):
        base = _attn_mlp_shapes(cfg, cfg.layer_is_moe(i)) if t == FULL_ATTENTION else {
            **_linear_shapes(cfg), **_mlp_shapes(cfg, cfg.layer_is_moe(i))}
        out.update({f"layers.{i}.{k}": v for k, v in base.items()})
    out["norm.weight"] = (H,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, H)
    if n_mtp_layers:
        out.update({"mtp.fc.weight": (H, 2 * H), "mtp.pre_fc_norm_embedding.weight": (H,),
                    "mtp.pre_fc_norm_hidden.weight": (H,), "mtp.norm.weight": (H,)})
        for j in range(n_mtp_layers):
            out.update({f"mtp.layers.{j}.{k}": v for k, v in _attn_mlp_shapes(cfg, cfg.mtp_is_moe).items()})
    return out



# ---- storage formats ------------------------------------------------------------------------
EXPERTS_PER_EXPERT = "per_expert"  # mlp.experts.{i}.{gate,up,down}_proj.weight
EXPERTS_FUSED = "fused"  # mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I]
EXPERTS_SWITCH = "switch_mlp"  # mlp.switch_mlp.{gate,up,down}_proj.weight [E, out, in]
EXPERTS_NONE = "dense"


@dataclass
class GroupFormat:
    """How one group (backbone or mtp) is stored in the files."""

    prefix: str  # file-key prefix of the group ("model.language_model.", "mtp.", ...)
    experts: str = EXPERTS_NONE
    conv: str = "hf"  # "hf" [C, 1, K] | "mlx" [C, K, 1]
    quantization: QuantizationConfig | None = None
    quant_path_strip: str = ""  # strip this from a file module path before override lookup
    lm_head_prefix: str = ""  # backbone only
    n_mtp_layers: int = 0  # mtp only

    @property
    def quantized(self) -> bool:
        return self.quantization is not None

    def describe(self) -> str:
        parts = [self.experts if self.experts != EXPERTS_NONE else "dense"]
        if self.quantization is not None:
            parts.append(f"mlx-{self.quantization.bits}bit-g{self.quantization.group_size}")
        return ", ".join(parts)


def _group_rests(keys, group: str) -> list[tuple[str, str]]:
    out = []
    for k in keys:
        s = split_key(k)
        if s and s[0] == group:
            out.append((k, s[1]))
    return out


def detect_format(keys, cfg: ModelConfig, group: str, *, quantization: QuantizationConfig | None = None,
                  n_mtp_layers: int | None = None) -> GroupFormat:
    """The storage format of `group` from its key names (and conv shape when `shapes` given)."""
    pairs = _group_rests(keys, group)
    fmt = GroupFormat(prefix="mtp." if group == "mtp" else "model.language_model.")
    if pairs:
        # prefix: from the first key that is not lm_head
        for k, rest in pairs:
            if not rest.startswith("lm_head."):
                fmt.prefix = k[: len(k) - len(rest)]
                break
        for k, rest in pairs:
            if rest.startswith("lm_head."):
                fmt.lm_head_prefix = k[: len(k) - len(rest)]
                break
    rests = [r for _, r in pairs]
    if any(".switch_mlp." in r for r in rests):
        fmt.experts = EXPERTS_SWITCH
    elif any(".experts.gate_up_proj" in r for r in rests):
        fmt.experts = EXPERTS_FUSED
    elif any(".experts." in r for r in rests) or cfg.is_moe:
        fmt.experts = EXPERTS_PER_EXPERT
    if not cfg.is_moe:
        fmt.experts = EXPERTS_NONE
    if any(r.endswith(".scales") for r in rests):
        fmt.quantization = quantization or QuantizationConfig()
    if group == "mtp":
        fmt.n_mtp_layers = n_mtp_layers if n_mtp_layers is not None else count_mtp_layers(rests)
    return fmt


def count_mtp_layers(rests) -> int:
    idx = set()
    for r in rests:
        if r.startswith("layers."):
            try:
                idx.add(int(r.split(".")[1]))
            except ValueError:
                pass
    return (max(idx) + 1) if idx else (1 if rests else 0)


def _is_quantizable(rest: str, shape: tuple[int, ...]) -> bool:
    if not rest.endswith(".weight") or is_norm("backbone", rest) or is_norm("mtp", rest):
        return False
    if rest.endswith(("conv1d.weight", "linear_attn.norm.weight")) or len(shape) < 2:
        return False
    return True


def _quant_shapes(shape: tuple[int, ...], bits: int, gs: int) -> dict[str, tuple[int, ...]]:
    *lead, out_dim, in_dim = shape
    return {
        "weight": (*lead, out_dim, in_dim * bits // 32),
        "scales": (*lead, out_dim, in_dim // gs),
        "biases": (*lead, out_dim, in_dim // gs),
    }


def expected_group(cfg: ModelConfig, group: str, fmt: GroupFormat) -> dict[str, tuple[int, ...]]:
    """File key -> shape that `group` must hold in format `fmt`."""
    canon = canonical_shapes(cfg, fmt.n_mtp_layers if group == "mtp" else 0)
    out: dict[str, tuple[int, ...]] = {}

    def put(rest: str, shape: tuple[int, ...], file_prefix: str):
        if fmt.quantization is not None and _is_quantizable(rest, shape):
            module = file_prefix + rest[: -len(".weight")]
            q = fmt.quantization.for_module(module[len(fmt.quant_path_strip):] if module.startswith(fmt.quant_path_strip) else module)
            if q is not None and shape[-1] % q[1] == 0 and (shape[-1] * q[0]) % 32 == 0:
                for part, shp in _quant_shapes(shape, *q).items():
                    out[f"{module}.{part}"] = shp
                return
        out[file_prefix + rest] = shape

    for name, shape in canon.items():
        if group == "mtp":
            if not name.startswith("mtp."):
                continue
            rest, prefix = name[len("mtp."):], fmt.prefix
        else:
            if name.startswith("mtp."):
                continue
            rest = name
            prefix = fmt.lm_head_prefix if name.startswith("lm_head.") else fmt.prefix
        if rest.endswith("linear_attn.conv1d.weight"):
            c, k = shape
            out[prefix + rest] = (c, k, 1) if fmt.conv == "mlx" else (c, 1, k)
        elif cfg.family == "qwen3_next" and rest.endswith(("linear_attn.in_proj_z.weight", "linear_attn.in_proj_b.weight",
                                                            "linear_attn.in_proj_a.weight")):
            continue
        elif cfg.family == "qwen3_next" and rest.endswith("linear_attn.in_proj_qkv.weight"):
            la = rest[: -len(".in_proj_qkv.weight")]
            H = cfg.hidden_size
            put(la + ".in_proj_qkvz.weight", (cfg.linear_conv_dim + cfg.linear_value_dim, H), prefix)
            put(la + ".in_proj_ba.weight", (2 * cfg.linear_num_value_heads, H), prefix)
        elif ".mlp.experts." in "." + rest:
            mlp, proj = rest.split(".experts.")
            E, o, i = shape
            if fmt.experts == EXPERTS_SWITCH:
                put(f"{mlp}.switch_mlp.{proj}.weight", shape, prefix)
            elif fmt.experts == EXPERTS_FUSED:
                if proj == "gate_proj":
                    out[f"{prefix}{mlp}.experts.gate_up_proj"] = (E, 2 * o, i)
                elif proj == "down_proj":
                    out[f"{prefix}{mlp}.experts.down_proj"] = shape
            else:
                for e in range(E):
                    put(f"{mlp}.experts.{e}.{proj}.weight", (o, i), prefix)
        else:
            put(rest, shape, prefix)
    return out


def optional_keys(cfg: ModelConfig, group: str, fmt: GroupFormat) -> set[str]:
    """Keys a group may hold without being wrong (lm_head of a tied model)."""
    if group == "backbone" and cfg.tie_word_embeddings:
        p = fmt.lm_head_prefix
        return {p + "lm_head.weight", p + "lm_head.scales", p + "lm_head.biases"}
    return set()
