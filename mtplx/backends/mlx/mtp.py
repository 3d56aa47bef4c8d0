"""The MTP head on MLX: predicts x[t+2] from (h[t], x[t+1]) at RoPE position t.

    e  = pre_fc_norm_embedding(embed(x[t+1]))
    hh = pre_fc_norm_hidden(h[t])
    u  = fc(concat([e, hh]))                     # [H, 2H], embedding first
    u  = layers[0](u, position t, own KVCache)   # mlx-lm's full-attention DecoderLayer
                                                 # (dense MLP or SparseMoeBlock/SwitchGLU)
    g  = norm(u)
    logits = lm_head(g)                          # the target's (or its tied embedding)

Attribute names mirror the canonical `mtp.*` names, so the loader maps them one to one (experts
go to `mlp.switch_mlp.*` as for the backbone). Depth > 1 applies the layer again to
(g, the token just drafted) at the next position (hidden_source "pre": u instead of g).
The head's position is its KVCache offset: entries written while drafting are trimmed at
commit and rebuilt from the verified hiddens.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from mtplx.checkpoint.config import FULL_ATTENTION, ModelConfig

from .model import make_layer, text_args


class MtpHead(nn.Module):
    def __init__(self, cfg: ModelConfig, n_layers: int = 1):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        args = text_args(cfg)
        self.pre_fc_norm_embedding = nn.RMSNorm(H, eps=eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(H, eps=eps)
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.layers = [make_layer(args, cfg, FULL_ATTENTION, cfg.mtp_is_moe) for _ in range(n_layers)]
        self.norm = nn.RMSNorm(H, eps=eps)

    def rows(self, target, hidden: mx.array, next_ids: mx.array, cache: KVCache):
        """Pairs (hidden [T, H], next_ids [T]) at head positions cache.offset.. (T entries
        written). -> (g [T, H] post norm, u [T, H] pre norm, logits [T, V])."""
        e = self.pre_fc_norm_embedding(target.embed(next_ids))
        hh = self.pre_fc_norm_hidden(hidden.astype(e.dtype))
        u = self.fc(mx.concatenate([e, hh], axis=-1))[None]  # [1, T, H]
        u = self.layers[0](u, mask=create_attention_mask(u, cache), cache=cache)[0]
        g = self.norm(u)
        return g, u, target.logits(g)


__all__ = ["MtpHead"]
