"""Key-name parsing shared by canonical conversion, layouts, the gate and norm detection.

Every file key is split into (group, rest): group "backbone" or "mtp", rest the name relative
to the text model (`layers.3.self_attn.q_proj.weight`, `embed_tokens.weight`,
`lm_head.weight`) or to the MTP head (`fc.weight`, `layers.0.mlp.gate.weight`).
"""

from __future__ import annotations

import re

VISUAL_PREFIXES = ("model.visual.", "visual.", "vision_tower.", "model.vision_tower.", "language_model.visual.")
MTP_PREFIXES = ("model.language_model.mtp.", "language_model.mtp.", "model.mtp.", "mtp.")
BACKBONE_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
LM_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight")
LM_HEAD_PREFIXES = ("language_model.lm_head.", "model.lm_head.", "lm_head.")

# norm weights stored zero-centred in HF files (1 + w in MLX files); linear_attn.norm is plain
LAYER_NORM_SUFFIXES = (".input_layernorm.weight", ".post_attention_layernorm.weight",
                       ".self_attn.q_norm.weight", ".self_attn.k_norm.weight")
MTP_TOP_NORMS = ("pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight", "norm.weight")

LAYER_RE = re.compile(r"^layers\.(\d+)\.")


def split_key(key: str) -> tuple[str, str] | None:
    """(group, rest) for a file key, or None for keys that are not part of the text model."""
    if key.startswith(VISUAL_PREFIXES):
        return None
    for p in LM_HEAD_PREFIXES:
        if key.startswith(p):
            return "backbone", "lm_head." + key[len(p):]
    for p in MTP_PREFIXES:
        if key.startswith(p):
            return "mtp", key[len(p):]
    for p in BACKBONE_PREFIXES:
        if key.startswith(p):
            return "backbone", key[len(p):]
    if key.startswith(("layers.", "embed_tokens.", "norm.")):
        return "backbone", key
    return None


def is_norm(group: str, rest: str) -> bool:
    """Whether `rest` is a zero-centred-in-HF RMSNorm weight (never linear_attn.norm)."""
    if rest.endswith(LAYER_NORM_SUFFIXES):
        return True
    if group == "mtp":
        return rest in MTP_TOP_NORMS
    return rest == "norm.weight"


def layer_index(rest: str) -> int | None:
    m = LAYER_RE.match(rest)
    return int(m.group(1)) if m else None
