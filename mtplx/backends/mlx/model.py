"""Qwen3.5 / Qwen3.6 / Qwen3-Next target model on MLX, built from mlx-lm's own modules.

The layers ARE mlx-lm's (`mlx_lm.models.qwen3_5.DecoderLayer`: GatedDeltaNet or gated
attention, dense MLP or `SparseMoeBlock` with `SwitchGLU` experts); quantized checkpoints load
into mlx-lm's `QuantizedLinear` / `QuantizedSwitchLinear` / `QuantizedEmbedding`. This file
adds what mlx-lm lacks for lossless speculation:

- parallel path (`prefill`): mlx-lm's layer `__call__` over whole prompt chunks, with mlx-lm's
  `KVCache` / `ArraysCache`; returns the hiddens before AND after the final norm (the MTP head
  needs them for every prompt position);
- exact path (`step`): decode AND verify. Every kernel sees the same shapes whatever the number
  of rows fed (1 for decode, D+1 for verify), so verify row i is bit-identical to a one-token
  decode at that position, on any device:
  * every row-wise module (linears, the whole dense MLP, the whole MoE block, the lm_head) runs
    on fixed chunks of `row_bucket` rows (zero-padded), so a 1-row decode and a 4-row verify
    call the very same kernels (on Metal a 1-row matmul is a gemv, a 4-row one a gemm);
  * attention runs one query row at a time over exactly the keys that row may see (the decode
    call), RoPE one row at a time at that row's offset;
  * the GatedDeltaNet recurrence runs token by token (`gated_delta_update` with T = 1, the
    Metal kernel on Apple, ops on CPU), keeping the state after every position for rollback;
    the causal conv is an elementwise sum in a fixed order.
  `row_bucket=None` turns the padding off (this CPU's matmuls are row-invariant anyway; see
  tests/test_mlx_exact.py for the negative control that shows what the padding protects from).

Norm weights: mlx-lm's modules take plain multipliers (its sanitize adds 1 to zero-centred HF
files); mtplx's canonical norms are already multipliers `1 + w`, so they load unchanged.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen3_5 as q35
from mlx_lm.models.base import create_attention_mask, create_ssm_mask, gather_last_axis
from mlx_lm.models.cache import ArraysCache, KVCache
from mlx_lm.models.gated_delta import gated_delta_update, normalize_qk

from mtplx.checkpoint.config import FULL_ATTENTION, ModelConfig

DEFAULT_ROW_BUCKET = 4  # decode and verify of up to 3 drafts share one kernel shape
PREFILL_CHUNK = 2048


def text_args(cfg: ModelConfig) -> q35.TextModelArgs:
    """mlx-lm's TextModelArgs from our parsed config (text-only RoPE: mRoPE reduces to 1-D)."""
    rope = {"type": "default", "rope_theta": float(cfg.rope_theta),
            "partial_rotary_factor": float(cfg.partial_rotary_factor)}
    return q35.TextModelArgs(
        model_type=cfg.model_type, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or 1, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, rms_norm_eps=cfg.rms_norm_eps, vocab_size=cfg.vocab_size,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        linear_num_value_heads=cfg.linear_num_value_heads, linear_num_key_heads=cfg.linear_num_key_heads,
        linear_key_head_dim=cfg.linear_key_head_dim, linear_value_head_dim=cfg.linear_value_head_dim,
        linear_conv_kernel_dim=cfg.linear_conv_kernel_dim, tie_word_embeddings=cfg.tie_word_embeddings,
        head_dim=cfg.head_dim, full_attention_interval=4,
        num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
        rope_parameters=rope,
    )


def make_layer(args: q35.TextModelArgs, cfg: ModelConfig, layer_type: str, moe: bool) -> q35.DecoderLayer:
    """An mlx-lm decoder layer of the given mixer type and MLP kind (whatever the interval rule)."""
    layer = q35.DecoderLayer(args, layer_idx=3 if layer_type == FULL_ATTENTION else 0)
    if moe and not isinstance(layer.mlp, q35.SparseMoeBlock):
        layer.mlp = q35.SparseMoeBlock(args)
    elif not moe and not isinstance(layer.mlp, q35.MLP):
        layer.mlp = q35.MLP(cfg.hidden_size, cfg.intermediate_size)
    return layer


# ---- exact-path helpers -----------------------------------------------------------------------


def exact_rows(fn, x: mx.array, R: int | None) -> mx.array:
    """Apply a row-wise fn to x [T, ...] in fixed chunks of R rows (zero-padded): every call
    has the shape [R, ...] whatever T, so row results do not depend on T."""
    if not R:
        return fn(x)
    T = x.shape[0]
    outs = []
    for s in range(0, T, R):
        c = x[s:s + R]
        n = c.shape[0]
        if n < R:
            c = mx.concatenate([c, mx.zeros((R - n, *c.shape[1:]), dtype=c.dtype)])
        outs.append(fn(c)[:n])
    return outs[0] if len(outs) == 1 else mx.concatenate(outs)


def _attn_step(attn, x: mx.array, cache: KVCache, R) -> mx.array:
    """mlx-lm Qwen3NextAttention weights, exact path. x [T, H] at positions cache.offset.."""
    T = x.shape[0]
    nh, nkv, hd = attn.num_attention_heads, attn.num_key_value_heads, attn.head_dim
    pos0 = cache.offset
    qg = exact_rows(attn.q_proj, x, R).reshape(T, nh, 2 * hd)
    q, gate = qg[..., :hd], qg[..., hd:].reshape(T, nh * hd)
    k = exact_rows(attn.k_proj, x, R).reshape(T, nkv, hd)
    v = exact_rows(attn.v_proj, x, R).reshape(T, nkv, hd)
    q = attn.q_norm(q).transpose(1, 0, 2)[None]  # [1, nh, T, hd]
    k = attn.k_norm(k).transpose(1, 0, 2)[None]  # [1, nkv, T, hd]
    v = v.transpose(1, 0, 2)[None]
    q = mx.concatenate([attn.rope(q[:, :, i:i + 1], offset=pos0 + i) for i in range(T)], axis=2)
    k = mx.concatenate([attn.rope(k[:, :, i:i + 1], offset=pos0 + i) for i in range(T)], axis=2)
    K, V = cache.update_and_fetch(k, v)  # [1, nkv, pos0+T, hd]
    outs = [mx.fast.scaled_dot_product_attention(q[:, :, i:i + 1], K[:, :, :pos0 + i + 1], V[:, :, :pos0 + i + 1],
                                                 scale=attn.scale, mask=None) for i in range(T)]
    o = mx.concatenate(outs, axis=2).transpose(0, 2, 1, 3).reshape(T, nh * hd)
    return exact_rows(attn.o_proj, o * mx.sigmoid(gate), R)


def causal_conv(xx: mx.array, w_t: mx.array, T: int) -> mx.array:
    """Depthwise causal conv as a fixed-order elementwise sum. xx [K-1+T, C], w_t [K, C] -> [T, C]."""
    acc = xx[0:T] * w_t[0]
    for j in range(1, w_t.shape[0]):
        acc = acc + xx[j:j + T] * w_t[j]
    return acc


def _gdn_step(la, x: mx.array, cache: "GdnState", R) -> mx.array:
    """mlx-lm GatedDeltaNet weights, exact path: token-by-token recurrence; records the pre-conv
    rows and the state after every position in `cache` for rollback. x [T, H] -> [T, H]."""
    T = x.shape[0]
    nk, nv, dk, dv = la.num_k_heads, la.num_v_heads, la.head_k_dim, la.head_v_dim
    qkv = exact_rows(la.in_proj_qkv, x, R)  # [T, C]
    z = exact_rows(la.in_proj_z, x, R).reshape(1, T, nv, dv)
    b = exact_rows(la.in_proj_b, x, R)[None]  # [1, T, nv]
    a = exact_rows(la.in_proj_a, x, R)[None]
    K1 = la.conv_kernel_size - 1
    conv = cache.conv if cache.conv is not None else mx.zeros((1, K1, la.conv_dim), dtype=qkv.dtype)
    xx = mx.concatenate([conv[0].astype(qkv.dtype), qkv])  # [K-1+T, C]
    w_t = la.conv1d.weight[:, :, 0].T  # [K, C]
    conv_out = nn.silu(causal_conv(xx, w_t, T))
    q, k, v = mx.split(conv_out, [la.key_dim, 2 * la.key_dim], axis=-1)
    q, k = normalize_qk(q.reshape(1, T, nk, dk), k.reshape(1, T, nk, dk), inv_scale=dk ** -0.5, eps=1e-6)
    v = v.reshape(1, T, nv, dv)
    state = cache.state if cache.state is not None else mx.zeros((1, nv, dv, dk), dtype=mx.float32)
    ys, states = [], []
    for t in range(T):
        y, state = gated_delta_update(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], a[:, t:t + 1], b[:, t:t + 1],
                                      la.A_log, la.dt_bias, state, None, use_kernel=True)
        ys.append(y)
        states.append(state)
    cache.record(qkv, states)
    out = la.norm(mx.concatenate(ys, axis=1), z)  # [1, T, nv, dv]
    if getattr(la, "sharding_group", None) is not None:  # tensor parallel (tp.py): sum the ranks' partials
        return exact_rows(lambda c: mx.distributed.all_sum(la.out_proj(c), group=la.sharding_group),
                          out.reshape(T, nv * dv), R)
    return exact_rows(la.out_proj, out.reshape(T, nv * dv), R)


class GdnState:
    """GatedDeltaNet cache of one layer with per-position rollback (mlx-lm ArraysCache layout:
    conv [1, K-1, C] pre-conv rows, state [1, nv, dv, dk] fp32)."""

    def __init__(self, kernel_size: int):
        self._K1 = kernel_size - 1
        self.inner = ArraysCache(size=2)  # what mlx-lm's module __call__ reads and writes
        self._rows = None  # [T, C] pre-conv rows fed by the last exact step
        self._states: list = []

    @property
    def conv(self):
        return self.inner[0]

    @property
    def state(self):
        return self.inner[1]

    def record(self, rows, states) -> None:
        self._rows, self._states = rows, states

    def keep(self, m: int) -> None:
        """Keep the first m positions of the last exact step (state after position m-1)."""
        if self._rows is None:
            if m:
                raise RuntimeError("GdnState.keep: nothing was recorded")
            return
        if m > 0:
            K1 = self._K1
            prev = self.inner[0][0] if self.inner[0] is not None else mx.zeros((K1, self._rows.shape[1]),
                                                                                   dtype=self._rows.dtype)
            self.inner[0] = mx.concatenate([prev.astype(self._rows.dtype), self._rows[:m]])[-K1:][None]
            self.inner[1] = self._states[m - 1]
        self._rows, self._states = None, []


class AttnState:
    """Full-attention KV cache of one layer (mlx-lm KVCache); rollback = trim."""

    def __init__(self):
        self.inner = KVCache()
        self._fed = 0

    def keep(self, m: int) -> None:
        drop = self._fed - m
        if drop > 0:
            self.inner.trim(drop)
        self._fed = 0


class ModelCache:
    """All target-layer caches of one session; `length` = committed positions."""

    def __init__(self, model: "MlxModel", max_len: int):
        self.max_len = max_len
        self.length = 0
        self.layers = []
        for layer in model.layers:
            if layer.is_linear:
                c = GdnState(layer.linear_attn.conv_kernel_size)
            else:
                c = AttnState()
            self.layers.append(c)

    def ensure(self, n: int) -> None:
        if n > self.max_len:
            raise ValueError(f"context limit: {n} positions requested, this session holds {self.max_len}")

    def keep(self, m: int) -> None:
        for c in self.layers:
            c.keep(m)
        self.length += m


# ---- the model ---------------------------------------------------------------------------------


class MlxModel(nn.Module):
    """Target model (+ optional MTP head in `self.mtp`). Build it with `loader.load_mlx_model`."""

    def __init__(self, cfg: ModelConfig, row_bucket: int | None = DEFAULT_ROW_BUCKET):
        super().__init__()
        self.cfg = cfg
        self.args = text_args(cfg)
        self.model = q35.Qwen3_5TextModel(self.args)
        self.model.layers = [make_layer(self.args, cfg, cfg.layer_types[i], cfg.layer_is_moe(i))
                             for i in range(cfg.num_hidden_layers)]
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # self.mtp = MtpHead(...) is set by the loader only when the checkpoint has a head
        self.row_bucket = row_bucket  # plain attributes (not arrays): outside the parameter tree
        self.mtp_hidden = "post"  # which target hidden feeds the head: "post" | "pre" final norm
        self.dtype = mx.float32

    @property
    def head(self):
        """The MTP head, or None."""
        return self["mtp"] if "mtp" in self else None

    @property
    def layers(self):
        return self.model.layers

    def embed(self, ids: mx.array) -> mx.array:
        return self.model.embed_tokens(ids)

    def _lm(self, h: mx.array) -> mx.array:
        if self.cfg.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        out = self.lm_head(h)
        group = getattr(self, "lm_group", None)  # tensor parallel: this rank's vocab slice -> all of it
        return out if group is None else gather_last_axis(out, group)

    def logits(self, h: mx.array, exact: bool = False) -> mx.array:
        """h [T, H] -> [T, V] (exact: fixed row chunks)."""
        return exact_rows(self._lm, h, self.row_bucket) if exact else self._lm(h)

    # -- parallel path (prompts)
    def forward_hidden(self, ids: mx.array, caches=None):
        """ids [B, T] -> (post [B, T, H], pre [B, T, H]) through mlx-lm's layer __call__; caches
        (B == 1): a list of mlx-lm caches, one per layer (updated in place)."""
        x = self.embed(ids)
        caches = caches or [None] * len(self.layers)
        fa = next((c for c, l in zip(caches, self.layers) if not l.is_linear), None)
        ssm = next((c for c, l in zip(caches, self.layers) if l.is_linear), None)
        fa_mask = create_attention_mask(x, fa)
        ssm_mask = create_ssm_mask(x, ssm)
        for layer, c in zip(self.layers, caches):
            x = layer(x, mask=ssm_mask if layer.is_linear else fa_mask, cache=c)
        return self.model.norm(x), x

    def __call__(self, ids: mx.array) -> mx.array:  # [B, T] -> logits [B, T, V]
        return self._lm(self.forward_hidden(ids)[0])

    def prompt_logits(self, ids: mx.array) -> mx.array:  # [T] -> [T, V] (parallel path, no cache)
        return self(ids[None])[0]

    def prefill(self, ids: mx.array, cache: ModelCache, chunk: int = PREFILL_CHUNK):
        """ids [T] after cache.length -> (post [T, H], pre [T, H], last logits [V]); commits T."""
        T = ids.shape[0]
        cache.ensure(cache.length + T)
        inner = [c.inner for c in cache.layers]
        posts, pres = [], []
        for s in range(0, T, chunk):
            post, pre = self.forward_hidden(ids[None, s:s + chunk], inner)
            mx.eval(post, pre)
            posts.append(post[0])
            pres.append(pre[0])
        post = posts[0] if len(posts) == 1 else mx.concatenate(posts)
        pre = pres[0] if len(pres) == 1 else mx.concatenate(pres)
        cache.length += T
        return post, pre, self._lm(post[-1:])[0]

    # -- exact path (decode and verify)
    def step(self, ids: mx.array, cache: ModelCache):
        """ids [T] at positions cache.length.. -> (post [T, H], pre [T, H], logits [T, V]).
        Positions stay pending until cache.keep(m)."""
        T = ids.shape[0]
        cache.ensure(cache.length + T)
        R = self.row_bucket
        x = self.embed(ids)
        for layer, c in zip(self.layers, cache.layers):
            h = layer.input_layernorm(x)
            if layer.is_linear:
                h = _gdn_step(layer.linear_attn, h, c, R)
            else:
                c._fed = T
                h = _attn_step(layer.self_attn, h, c.inner, R)
            x = x + h
            x = x + exact_rows(layer.mlp, layer.post_attention_layernorm(x), R)
        post = self.model.norm(x)
        return post, x, self.logits(post, exact=True)

    def new_cache(self, max_len: int) -> ModelCache:
        return ModelCache(self, max_len)

    def new_head_cache(self) -> KVCache:  # the MTP head's KV cache of one session
        return KVCache()

    def new_session(self, max_context: int | None = None, hidden_source: str | None = None, **options):
        from .session import MlxSession

        return MlxSession(self, max_context=max_context, hidden_source=hidden_source, **options)


__all__ = ["MlxModel", "ModelCache", "GdnState", "AttnState", "exact_rows", "text_args", "make_layer",
           "DEFAULT_ROW_BUCKET"]
