"""Qwen3.5 / Qwen3.6 / Qwen3-Next target model in plain PyTorch (dense and MoE).

Reads top to bottom: numerics helpers (row-invariant linear, norms, RoPE), the two token
mixers (gated full attention, GatedDeltaNet), the two MLPs (dense SwiGLU, MoE), the decoder
layer and the model. Weights use the canonical names of docs/architecture.md; the loader fuses
a few of them (q|k|v, in_proj qkv|z|b|a, gate|up) into one matrix per module.

Two forward paths:
- parallel (`forward_hidden`, `prefill`): whole sequences, chunked GatedDeltaNet, SDPA;
  autograd-safe, used for prompts and for training an MTP head;
- exact (`step`): the path of decode AND verify. On x86 CPUs it runs through the compiled
  fixed-order kernels of kernels.py (Ops `EXACT_ROWMM`: matmuls, the GatedDeltaNet step between
  its projections, attention over the cache, norms, dense-MoE activations; row invariant by
  construction, docs/kernels.md). The pure-torch exact path (Ops `EXACT`, the fallback) keeps
  every kernel on the same shapes whatever the number of rows fed (1 for decode, D+1 for
  verify), so verify row i is bit-identical to a one-token decode at that position:
  * linears go through `exact_linear`, which runs fp32 rows as calls of exactly ROW_GROUP rows,
    zero-padded (on x86 MKL a 1-row fp32 matmul, a 2-3 row one and a 4-row one use three
    different kernels, and on Intel an 8-row one a fourth; bf16 gives the same bits for any
    row count);
  * attention batches the rows per key tile: a row at position p always runs over the first
    ceil((p+1)/ATTN_TILE)*ATTN_TILE cache slots, later ones masked, so its shapes never depend
    on the other rows (query rows in calls of ROW_GROUP rows);
  * the GatedDeltaNet recurrence runs token by token (state saved after every position, for
    rollback) with only the state update in the loop; the causal conv is an elementwise sum in a
    fixed order; narrow elementwise transcendental ops are zero-padded to 64-wide rows (exact_ew);
  * MoE: fp32 router softmax on row-invariant router logits. Small blocks (E*I <= DENSE_MOE_MAX_EI)
    run every expert for every row in two fused matmuls (forward_dense: cost independent of the
    distinct experts picked, each expert's activation scaled by its routing weight, 0 if not
    picked); larger ones run each expert's tokens through `exact_linear` and sum a token's
    expert outputs in top-k rank order. (Measured on the default model: running only the union
    of picked experts over all rows is faster for decode but slower for verify, so not used.)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtplx.checkpoint.config import FULL_ATTENTION, ModelConfig

from . import fused, kernels

# ---- numerics -------------------------------------------------------------------------------

# Every exact-path fp32 matmul runs as calls of exactly this many rows (zero-padded). Measured on
# x86 + MKL (torch 2.13): fp32 row results fall in classes {1}, {2,3}, {4}, and on Intel CPUs an
# 8-row call differs again from a 4-row one, so a call never has more than ROW_GROUP rows.
# bf16/fp16 (oneDNN) give identical rows for any count. `check_row_invariance` re-measures this
# on the running machine.
ROW_GROUP: dict[torch.dtype, int] = {torch.float32: 4, torch.bfloat16: 1, torch.float16: 1}


def row_groups(x: torch.Tensor, g: int, dim: int = 0) -> list[torch.Tensor]:
    """x split along `dim` into blocks of exactly g rows, the last one zero-padded (g == 1: [x])."""
    if g == 1:
        return [x]
    m = x.shape[dim]
    pad = (-m) % g
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim)
    return list(x.split(g, dim))


def exact_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w[N, K].T -> [M, N], row results independent of M and of the other rows."""
    if not isinstance(w, torch.Tensor):  # a quantized weight (int8.Int8Weight): row-invariant kernel
        return w.linear(x)
    g = ROW_GROUP.get(x.dtype, 1)
    m = x.shape[0]
    if g == 1 or m == g:
        return F.linear(x, w)
    return torch.cat([F.linear(xg, w) for xg in row_groups(x, g)])[:m]


# CPUs without native bf16/fp16 FMA (AVX2) run half-precision matmuls compute-bound at ~10
# GFLOP/s; for many rows (prompts, training) widening the weight to fp32 and using sgemm is much
# faster. Parallel path only: its rows need not match the exact path bit for bit.
WIDEN_MIN_ROWS = 16


def plain_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):  # a quantized weight (int8.Int8Weight)
        return w.linear(x)
    if (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
            and x.reshape(-1, x.shape[-1]).shape[0] >= WIDEN_MIN_ROWS):
        return F.linear(x.float(), w.float()).to(x.dtype)
    return F.linear(x, w)


def plain_ew(fn, x: torch.Tensor) -> torch.Tensor:
    return fn(x)


EW_GRAIN = 32768  # ATen splits an elementwise op across threads from this many elements


def exact_ew(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply an elementwise transcendental op (exp, sigmoid, silu, softplus, ...) to x [T, ...] so
    that row i gets the bits a 1-row call would give. ATen runs contiguous elementwise ops as one
    flat SIMD loop with a scalar tail (and splits big ones across threads), and the SIMD and scalar
    exp differ in the last bit: rows are aligned when each row is a multiple of 64 elements and
    the op stays single-threaded. Narrower rows are zero-padded to a multiple of 64 (for every T,
    1 included, so decode takes the same SIMD path as verify); many rows run in chunks that stay
    under ATen's grain (a batched verify of 8 x 4 rows: 2 calls, not 32)."""
    T = x.shape[0]
    W = x[0].numel() if T else 0
    if W % 64 == 0:
        return _ew_chunks(fn, x.contiguous(), W)
    Wp = W + (-W) % 64
    buf = x.new_zeros(T, Wp)
    buf[:, :W] = x.reshape(T, W)
    return _ew_chunks(fn, buf, Wp)[:, :W].reshape(x.shape)


def _ew_chunks(fn, x: torch.Tensor, W: int) -> torch.Tensor:
    """fn over x [T, ...] (contiguous, W elements per row, W % 64 == 0) in chunks of whole rows of
    fewer than EW_GRAIN elements (one row per chunk when a row alone reaches it)."""
    per = max(1, (EW_GRAIN - 1) // W)
    T = x.shape[0]
    if T <= per:
        return fn(x)
    return torch.cat([fn(x[i:i + per]) for i in range(0, T, per)])


class Ops:
    """The kernels a forward uses: plain (parallel path) or exact (decode/verify path); `compiled`:
    the exact path through kernels.py (fixed-order matmuls and fused small ops)."""

    def __init__(self, lin, ew, compiled: bool = False):
        self.lin, self.ew, self.compiled = lin, ew, compiled

    @property
    def fused(self):  # the compiled fused ops (kernels.get_fused), or None
        return kernels.get_fused() if self.compiled else None

    def norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        f = self.fused
        return rms_norm(x, w, eps) if f is None else f.rms_rows(x, w, eps)


def rowmm_linear(x: torch.Tensor, w) -> torch.Tensor:
    """Exact-path linear through the fixed-order kernel (kernels.py): fp32 / bf16 / fp16 weights
    and int8 ones (int8.Int8Weight) alike; a weight it cannot take goes to exact_linear."""
    fn = kernels.rowmm_fn()
    if fn is None:
        return exact_linear(x, w)
    if isinstance(w, torch.Tensor):
        if not w.is_contiguous() or w.device.type != "cpu":
            return exact_linear(x, w)
        if x.dtype == torch.float32 and x.dim() == 2:
            return fn(x, w)
        if x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16:
            dot = kernels.rowmm_bf16_fn()
            if dot is not None:
                return dot(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], -1).to(x.dtype)
        return fn(x.reshape(-1, x.shape[-1]).float(), w).reshape(*x.shape[:-1], -1).to(x.dtype)
    if hasattr(w, "q") and w.q.is_contiguous():
        return fn(x.reshape(-1, x.shape[-1]).float(), w.q, w.scale_f32).reshape(*x.shape[:-1], -1).to(x.dtype)
    return exact_linear(x, w)


PLAIN = Ops(plain_linear, plain_ew)
# The MLP kernels of the MTP head's drafting rows (MtpHead.rows, a few rows at a time): MoE blocks
# take `forward_one` for one row and the fused dense path for a few, with plain (unpadded)
# kernels. Drafts need no bit-exactness (verify decides every token), only speed.
FEW_ROWS = Ops(plain_linear, plain_ew)
EXACT = Ops(exact_linear, exact_ew)  # pure torch: row padding (ROW_GROUP)
EXACT_ROWMM = Ops(rowmm_linear, exact_ew, compiled=True)  # compiled fixed-order kernels
KERNELS = {"torch": EXACT, "rowmm": EXACT_ROWMM, "fused": EXACT_ROWMM}  # fused: the whole step in C++ (fused.py)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] * rsqrt(mean(x^2) + eps) * w, in fp32 (w: fp32 multiplier, 1 + w_file).
    mean as sum * (1/D) and in-place scalars: a norm of one short row is a handful of
    microsecond ops, and decode runs dozens of them (ATen's mean costs twice its sum here)."""
    xf = x.float()
    r = torch.rsqrt((xf * xf).sum(-1, keepdim=True).mul_(1.0 / x.shape[-1]).add_(eps))
    return (xf * r * w).to(x.dtype)


def l2_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:  # fp32 in, fp32 out
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class Rope(nn.Module):
    """Partial rotary embedding on the first `rotary_dim` dims, rotate-half style (text-only
    mRoPE reduces to this)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.rotary_dim
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.dim = dim
        self.theta = cfg.rope_theta

        self._cos = self._sin = None  # fp32 tables [n_blocks * BLOCK, rot]

    BLOCK = 256

    def reset(self, device) -> None:
        dim = self.dim
        self.inv_freq = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        self._cos = self._sin = None

    def _grow(self, n: int) -> None:
        """Tables cover positions < n. Each block of BLOCK positions is computed on its own with
        the same shapes, so a position's cos/sin bits never depend on the call that asks."""
        have = 0 if self._cos is None else self._cos.shape[0]
        cs, ss = [], []
        for b0 in range(have, n, self.BLOCK):
            pos = torch.arange(b0, b0 + self.BLOCK, device=self.inv_freq.device, dtype=torch.float32)
            f = pos[:, None] * self.inv_freq.float()[None, :]
            emb = torch.cat([f, f], dim=-1)
            cs.append(emb.cos())
            ss.append(emb.sin())
        if cs:
            self._cos = torch.cat(([self._cos] if self._cos is not None else []) + cs)
            self._sin = torch.cat(([self._sin] if self._sin is not None else []) + ss)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):  # [T] -> 2 x [T, rot]
        self._grow(int(positions.max()) + 1)
        return self._cos[positions].to(dtype), self._sin[positions].to(dtype)

    def span(self, pos0: int, n: int, dtype: torch.dtype):  # positions pos0..pos0+n-1 -> 2 x [n, rot]
        self._grow(pos0 + n)
        return self._cos[pos0:pos0 + n].to(dtype), self._sin[pos0:pos0 + n].to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [..., T, n, hd], cos/sin [T, rot]."""
        r = self.dim
        c, s = cos[:, None, :], sin[:, None, :]
        xr, xp = x[..., :r], x[..., r:]
        return torch.cat([xr * c + rotate_half(xr) * s, xp], dim=-1)


# ---- full attention --------------------------------------------------------------------------


class Attention(nn.Module):
    """Gated full attention: q_proj gives [query | gate] per head, q/k norm, partial RoPE, GQA,
    o_proj(attn * sigmoid(gate)). Weights: qkv [nh*2*hd + 2*nkv*hd, H] (q|k|v), o [H, nh*hd]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.scale = self.hd ** -0.5
        H = cfg.hidden_size
        self.q_rows = self.nh * 2 * self.hd
        self.kv_rows = self.nkv * self.hd
        self.qkv = nn.Parameter(torch.empty(self.q_rows + 2 * self.kv_rows, H))
        self.o_proj = nn.Parameter(torch.empty(H, self.nh * self.hd))
        self.q_norm = nn.Parameter(torch.ones(self.hd, dtype=torch.float32))
        self.k_norm = nn.Parameter(torch.ones(self.hd, dtype=torch.float32))

    def _project(self, x, rope: Rope, positions, ops: Ops):
        """x [..., T, H] -> q [..., T, nh, hd], k/v [..., T, nkv, hd], gate [..., T, nh*hd]."""
        lead = x.shape[:-1]
        y = ops.lin(x.reshape(-1, x.shape[-1]), self.qkv).reshape(*lead, -1)
        q, k, v = y.split([self.q_rows, self.kv_rows, self.kv_rows], dim=-1)
        q = q.reshape(*lead, self.nh, 2 * self.hd)
        q, gate = q[..., : self.hd], q[..., self.hd:]
        gate = gate.reshape(*lead, self.nh * self.hd)
        q = ops.norm(q, self.q_norm, self.eps)
        k = ops.norm(k.reshape(*lead, self.nkv, self.hd), self.k_norm, self.eps)
        v = v.reshape(*lead, self.nkv, self.hd)
        cos, sin = rope.cos_sin(positions, x.dtype)
        return rope.apply(q, cos, sin), rope.apply(k, cos, sin), v, gate

    def _out(self, o, gate, ops: Ops):  # o [..., T, nh*hd]
        o = o * ops.ew(torch.sigmoid, gate)
        lead = o.shape[:-1]
        return ops.lin(o.reshape(-1, o.shape[-1]), self.o_proj).reshape(*lead, -1)

    def forward(self, x, rope, pos0: int = 0, cache=None):
        """Parallel path. x [B, T, H]; cache (B == 1) holds positions < pos0 and gets T more."""
        B, T, _ = x.shape
        positions = torch.arange(pos0, pos0 + T, device=x.device)
        q, k, v, gate = self._project(x, rope, positions, PLAIN)
        q = q.transpose(1, 2)  # [B, nh, T, hd]
        if cache is not None:
            cache.write(pos0, k[0], v[0])
            k, v = cache.view(pos0 + T)  # [nkv, S, hd]
            k, v = k[None], v[None]
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        S = k.shape[2]
        if S == T:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
        elif x.device.type == "cpu" and B == 1:
            o = self._attend_past_and_block(q, k, v, S - T)
        else:
            qpos = torch.arange(S - T, S, device=x.device)
            mask = torch.arange(S, device=x.device)[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        o = o.transpose(1, 2).reshape(B, T, self.nh * self.hd)
        return self._out(o, gate, PLAIN)

    def _attend_past_and_block(self, q, k, v, pos0: int):
        """A prefill block's attention on CPU: q [1, nh, T, hd] over the cached keys before pos0 (no
        mask: the query heads of a KV head folded into one flash call) and over the block's own
        keys (causal), merged by their log-sum-exps. 19% less time than one masked call at a 16k
        context; a fixed function of the block, so the prefix cache's blocks keep their bits."""
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        _, nh, T, hd = q.shape
        nkv = k.shape[1]
        g = nh // nkv
        o1, l1 = flash(q.reshape(1, nkv, g * T, hd), k[:, :, :pos0], v[:, :, :pos0], 0.0, False,
                       attn_mask=None, scale=self.scale)
        kb, vb = (t[:, :, pos0:].repeat_interleave(g, 1) for t in (k, v))
        o2, l2 = flash(q, kb, vb, 0.0, True, attn_mask=None, scale=self.scale)
        o1, l1 = o1.reshape(1, nh, T, hd), l1.reshape(1, nh, T)
        m = torch.maximum(l1, l2)
        w1, w2 = torch.exp(l1 - m)[..., None], torch.exp(l2 - m)[..., None]
        return ((o1 * w1 + o2 * w2) / (w1 + w2)).to(q.dtype)

    def forward_many(self, x, rope, spans, caches):
        """Parallel path over several sequences (batched drafting): x [sum T_i, H], sequence i's
        rows at positions pos0_i.. against its own cache; projections on all rows at once."""
        positions = torch.cat([torch.arange(p0, p0 + T, device=x.device) for p0, T in spans])
        q, k, v, gate = self._project(x, rope, positions, PLAIN)
        outs, r = [], 0
        for (p0, T), cache in zip(spans, caches):
            cache.write(p0, k[r:r + T], v[r:r + T])
            K, V = cache.view(p0 + T)  # [nkv, S, hd]
            qi = q[r:r + T].transpose(0, 1)[None]  # [1, nh, T, hd]
            if T == 1:  # one query attends to every key: no mask
                o = F.scaled_dot_product_attention(qi, K[None], V[None], scale=self.scale, enable_gqa=True)
            else:
                qpos = torch.arange(p0, p0 + T, device=x.device)
                mask = torch.arange(p0 + T, device=x.device)[None, :] <= qpos[:, None]
                o = F.scaled_dot_product_attention(qi, K[None], V[None], attn_mask=mask, scale=self.scale,
                                                   enable_gqa=True)
            outs.append(o[0].transpose(0, 1).reshape(T, self.nh * self.hd))
            r += T
        return self._out(torch.cat(outs), gate, PLAIN)

    def step(self, x, rope, pos0: int, cache, ops: Ops = EXACT):
        """Exact path. x [T, H] at positions pos0..pos0+T-1; row i attends to keys <= pos0+i."""
        return self.step_many(x, rope, [(pos0, x.shape[0])], [cache], ops)

    def step_many(self, x, rope, spans, caches, ops: Ops = EXACT):
        """Exact path over several sequences: x [sum T_i, H], sequence i's T_i rows at positions
        pos0_i.. (spans [(pos0_i, T_i)]) against its own cache. Projections run on all rows at
        once (row-invariant kernels); attention per sequence (`_attend`)."""
        if len(spans) == 1:
            positions = torch.arange(spans[0][0], spans[0][0] + spans[0][1], device=x.device)
        else:
            positions = torch.cat([torch.arange(p0, p0 + T, device=x.device) for p0, T in spans])
        q, k, v, gate = self._project(x, rope, positions, ops)
        fused = ops.fused
        outs, r = [], 0
        for (p0, T), cache in zip(spans, caches):
            cache.write(p0, k[r:r + T], v[r:r + T])
            if fused is not None:  # compiled: each row over exactly its own keys, fixed order
                outs.append(fused.attend_rows(q[r:r + T], cache.k, cache.v, p0, self.scale))
            else:
                outs.append(self._attend(q[r:r + T], p0, cache, x.dtype))
            r += T
        o = outs[0] if len(outs) == 1 else torch.cat(outs)  # [sum T, nh*hd]
        return self._out(o, gate, ops)

    def _attend(self, q, pos0: int, cache, dtype):
        """q [T, nh, hd] at positions pos0.. over `cache` -> [T, nh*hd]. Rows are batched per key
        tile: a row at position p always runs over the first L = ceil((p+1)/ATTN_TILE)*ATTN_TILE
        cache slots (later ones masked to -inf, probability 0), whatever the other rows, so its
        scores / softmax / p @ V see the same shapes and values as a one-token decode at p; query
        rows run in calls of the dtype's ROW_GROUP rows, zero-padded."""
        T = q.shape[0]
        nkv, g, hd = self.nkv, self.nh // self.nkv, self.hd
        rg = ROW_GROUP.get(dtype, 1)
        outs = []
        i = 0
        while i < T:
            L = -(-(pos0 + i + 1) // ATTN_TILE) * ATTN_TILE
            j = min(T, L - pos0)  # rows i..j-1 share the tile length L
            n = j - i
            K, V = cache.view(L)  # [nkv, L, hd]
            qg = q[i:j].reshape(n, nkv, g, hd).permute(1, 0, 2, 3).reshape(nkv, n * g, hd)
            M = n * g
            pad = (-M) % rg
            kt = K.transpose(1, 2)
            s = torch.cat([torch.matmul(b, kt) for b in row_groups(qg, rg, 1)], 1) * self.scale  # [nkv, M+pad, L]
            qpos = torch.arange(pos0 + i, pos0 + j, device=q.device).repeat_interleave(g)
            if pad:
                qpos = torch.cat([qpos, qpos.new_full((pad,), pos0 + i)])
            masked = torch.arange(L, device=q.device)[None, :] > qpos[:, None]  # [M+pad, L]
            s = s.masked_fill(masked, float("-inf"))
            p = torch.softmax(s, dim=-1, dtype=torch.float32).to(dtype)
            o = torch.cat([torch.matmul(b, V) for b in row_groups(p, rg, 1)], 1)[:, :M]  # [nkv, M, hd]
            outs.append(o.reshape(nkv, n, g, hd).permute(1, 0, 2, 3).reshape(n, self.nh * hd))
            i = j
        return outs[0] if len(outs) == 1 else torch.cat(outs)


ATTN_TILE = 64  # exact-path attention key tile (cache capacity is kept a multiple of it)


# ---- GatedDeltaNet ---------------------------------------------------------------------------


def causal_conv(xx: torch.Tensor, w_t: torch.Tensor, T: int) -> torch.Tensor:
    """Depthwise causal conv as a fixed-order elementwise sum (row-invariant, autograd-safe).
    xx [..., K-1+T, C] (state rows then new rows), w_t [K, C] fp32 -> [..., T, C] fp32."""
    K = w_t.shape[0]
    xf = xx.float()
    acc = xf[..., 0:T, :] * w_t[0]
    for j in range(1, K):
        acc = acc + xf[..., j:j + T, :] * w_t[j]
    return acc


def chunk_gated_delta(q, k, v, g, beta, state=None, chunk: int = 64):
    """Chunked (parallel) gated delta rule, fp32. q/k [B, n, T, dk] (q pre-scaled), v [B, n, T, dv],
    g/beta [B, n, T], state [B, n, dk, dv] or None -> (o [B, n, T, dv], final state)."""
    B, n, T, dk = k.shape
    dv = v.shape[-1]
    pad = (chunk - T % chunk) % chunk
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    nc = (T + pad) // chunk
    vb = (v * beta[..., None]).reshape(B, n, nc, chunk, dv)
    kb = (k * beta[..., None]).reshape(B, n, nc, chunk, dk)
    q = q.reshape(B, n, nc, chunk, dk)
    k = k.reshape(B, n, nc, chunk, dk)
    g = g.reshape(B, n, nc, chunk).cumsum(-1)
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(upper, float("-inf")).exp()
    ut = (kb @ k.transpose(-1, -2)) * decay
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    # (I + strictly-lower(ut)) X = rhs
    L = ut.masked_fill(~torch.ones_like(upper).tril(-1), 0.0) + eye
    u = torch.linalg.solve_triangular(L, vb, upper=False, unitriangular=True)
    kcd = torch.linalg.solve_triangular(L, kb * g.exp()[..., None], upper=False, unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * decay
    qd = q * g.exp()[..., None]
    kd = k * (g[..., -1:] - g).exp()[..., None]
    cdecay = g[..., -1].exp()[..., None, None]
    S = state if state is not None else q.new_zeros(B, n, dk, dv)
    outs = []
    for i in range(nc):
        vn = u[:, :, i] - kcd[:, :, i] @ S
        outs.append(qd[:, :, i] @ S + attn[:, :, i] @ vn)
        S = S * cdecay[:, :, i] + kd[:, :, i].transpose(-1, -2) @ vn
    o = torch.cat(outs, dim=2)[:, :, :T]
    return o, S


class GatedDeltaNet(nn.Module):
    """Linear attention with the gated delta rule (Qwen3.5 layout; Qwen3-Next fused projections
    are split by the checkpoint layer). Weights: in_proj [C + nv*dv + 2*nv, H] (qkv|z|b|a),
    conv_w [C, K] fp32, A_log [nv] fp32, dt_bias [nv] fp32, gnorm [dv], out_proj [H, nv*dv]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nk, self.nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.K = cfg.linear_conv_kernel_dim
        self.C = cfg.linear_conv_dim
        self.key_dim, self.value_dim = self.nk * self.dk, self.nv * self.dv
        self.eps = cfg.rms_norm_eps
        H = cfg.hidden_size
        self.in_proj = nn.Parameter(torch.empty(self.C + self.value_dim + 2 * self.nv, H))
        self.conv_w = nn.Parameter(torch.empty(self.C, self.K, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.zeros(self.nv, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.zeros(self.nv, dtype=torch.float32))
        self.gnorm = nn.Parameter(torch.ones(self.dv))  # gated norm: plain weight, model dtype
        self.out_proj = nn.Parameter(torch.empty(H, self.value_dim))

    def _inputs(self, x, ops: Ops):
        """x [..., T, H] -> mixed [..., T, C], z [..., T, nv, dv], beta/decay [..., T, nv] (fp32)."""
        lead = x.shape[:-1]
        y = ops.lin(x.reshape(-1, x.shape[-1]), self.in_proj).reshape(*lead, -1)
        mixed, z, b, a = y.split([self.C, self.value_dim, self.nv, self.nv], dim=-1)
        A = self.A_log.float().exp()
        beta = ops.ew(torch.sigmoid, b.float().contiguous())
        g = -A * ops.ew(F.softplus, (a.float() + self.dt_bias.float()).contiguous())
        return mixed, z.reshape(*lead, self.nv, self.dv), beta, g

    def _qkv(self, conv_out, ops: Ops):
        """conv_out [..., T, C] fp32 (post-conv) -> q, k [..., T, nv, dk] (q scaled), v [..., T, nv, dv]."""
        a = ops.ew(F.silu, conv_out)
        q, k, v = a.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        lead = a.shape[:-1]
        q = l2_norm(q.reshape(*lead, self.nk, self.dk)) * (self.dk ** -0.5)
        k = l2_norm(k.reshape(*lead, self.nk, self.dk))
        r = self.nv // self.nk
        if r > 1:
            q = q.repeat_interleave(r, dim=-2)
            k = k.repeat_interleave(r, dim=-2)
        return q, k, v.reshape(*lead, self.nv, self.dv)

    def _out(self, o, z, dtype, ops: Ops):
        """o [..., T, nv, dv] fp32, z [..., T, nv, dv] -> [..., T, H]."""
        y = (o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        y = (self.gnorm * y) * ops.ew(F.silu, z.float())
        y = y.to(dtype)
        lead = y.shape[:-2]
        return ops.lin(y.reshape(-1, self.value_dim), self.out_proj).reshape(*lead, -1)

    def forward(self, x, cache=None):
        """Parallel path. x [B, T, H]; cache (B == 1) supplies the initial conv/recurrent state
        and receives the final one."""
        B, T, _ = x.shape
        mixed, z, beta, g = self._inputs(x, PLAIN)
        prev = cache.conv[None] if cache is not None else mixed.new_zeros(B, self.K - 1, self.C)
        xx = torch.cat([prev.to(mixed.dtype), mixed], dim=1)
        q, k, v = self._qkv(causal_conv(xx, self.conv_w.float().t(), T), PLAIN)
        state = cache.state[None] if cache is not None else None
        o, S = chunk_gated_delta(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                 g.transpose(1, 2), beta.transpose(1, 2), state)
        if cache is not None:
            cache.conv = xx[0, -(self.K - 1):].detach().clone()
            cache.state = S[0].detach()
        return self._out(o.transpose(1, 2), z, x.dtype, PLAIN)

    def step(self, x, cache, ops: Ops = EXACT):
        """Exact path. x [T, H]: token-by-token recurrence; records the state after every
        position in the cache (cache.keep(m) restores the state after position m-1)."""
        return self.step_many(x, [x.shape[0]], [cache], ops)

    def step_many(self, x, lengths, caches, ops: Ops = EXACT):
        """Exact path over several sequences: x [sum T_i, H], T_i = lengths[i] rows of sequence i
        with its own cache. Projections on all rows at once; sequences with the same T_i run their
        conv and recurrence stacked (elementwise ops and a per-matrix bmm: each sequence's rows
        and states get the bits they get alone). With the compiled kernel, everything between
        the two projections is one fused call per sequence (`_fused_step`)."""
        fused = ops.fused
        if fused is not None:
            return self._fused_step(x, lengths, caches, fused.gdn_core, ops)
        mixed, z, beta, g = self._inputs(x, ops)
        if len(lengths) == 1:  # decode / verify of one sequence
            return self._out(self._one(mixed, beta, g, caches[0], ops), z, x.dtype, ops)
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        o = torch.empty(x.shape[0], self.nv, self.dv, dtype=torch.float32, device=x.device)
        groups: dict[int, list[int]] = {}
        for i, T in enumerate(lengths):
            groups.setdefault(T, []).append(i)
        w_t = self.conv_w.float().t()
        big = self.nv * self.dk * self.dv >= STACK_STATE_MAX
        decay = None if big else exact_ew(torch.exp, g)  # once for every stacked group
        for T, members in groups.items():
            if big or len(members) == 1:  # stacking would copy more than the ops it saves
                for i in members:
                    a = starts[i]
                    o[a:a + T] = self._one(mixed[a:a + T], beta[a:a + T], g[a:a + T], caches[i], ops)
                continue
            n, nv = len(members), self.nv
            rows = torch.cat([torch.arange(starts[i], starts[i] + T, device=x.device) for i in members])
            m_rows = mixed[rows].reshape(n, T, -1)  # [n, T, C]
            prev = torch.stack([caches[i].conv for i in members]).to(mixed.dtype)  # [n, K-1, C]
            conv = causal_conv(torch.cat([prev, m_rows], 1), w_t, T)  # [n, T, C]: elementwise, per sequence
            q, k, v = self._qkv(conv.reshape(n * T, -1), ops)
            q, k, v = (t.reshape(n, T, *t.shape[1:]) for t in (q, k, v))
            S = torch.stack([caches[i].state for i in members])  # [n, nv, dk, dv]
            states = _recurrence(S, q, k, v, beta[rows].reshape(n, T, nv),
                                 decay[rows].reshape(n, T, nv))  # T x [n*nv, dk, dv]
            St = (torch.stack(states) if T > 1 else states[0][None]).reshape(T, n, nv, self.dk, self.dv).transpose(0, 1)
            o[rows] = torch.matmul(q[:, :, :, None, :], St)[:, :, :, 0].reshape(n * T, nv, self.dv)
            for j, i in enumerate(members):
                caches[i].record(m_rows[j], [st[j * nv:(j + 1) * nv] for st in states])
        return self._out(o, z, x.dtype, ops)

    def _fused_step(self, x, lengths, caches, core, ops: Ops):
        """Exact path through kernels.gdn_core: conv, SiLU, q/k norms, gates, the recurrence and the
        gated output norm of each sequence in one compiled call (fp32, a fixed order per position,
        so verify rows equal decode bit for bit). x [sum T_i, H] -> [sum T_i, H]."""
        y = ops.lin(x, self.in_proj)  # [N, C + nv*dv + 2nv], model dtype
        C, vd, nv = self.C, self.value_dim, self.nv
        yf = y.float()
        gnorm = self.gnorm.float().contiguous()
        outs, r = [], 0
        for T, cache in zip(lengths, caches):
            part = yf[r:r + T]
            o, states = core(part[:, :C].contiguous(), part[:, C + vd:C + vd + nv].contiguous(),
                             part[:, C + vd + nv:].contiguous(), part[:, C:C + vd].contiguous(),
                             cache.conv.float().contiguous(), self.conv_w.contiguous(), self.A_log.contiguous(),
                             self.dt_bias.contiguous(), cache.state.contiguous(), gnorm,
                             self.nk, self.dk, self.dv, self.eps)
            cache.record(y[r:r + T, :C], list(states.unbind(0)))
            outs.append(o)
            r += T
        o = outs[0] if len(outs) == 1 else torch.cat(outs)  # [N, nv*dv] fp32
        return ops.lin(o.to(x.dtype), self.out_proj)

    def _one(self, mixed, beta, g, cache, ops: Ops):
        """One sequence's conv + recurrence (the same ops as a stacked group of one) -> o [T, nv, dv]."""
        T = mixed.shape[0]
        xx = torch.cat([cache.conv.to(mixed.dtype), mixed], dim=0)
        q, k, v = self._qkv(causal_conv(xx, self.conv_w.float().t(), T), ops)
        states = _recurrence(cache.state[None], q[None], k[None], v[None], beta[None], exact_ew(torch.exp, g)[None])
        St = torch.stack(states) if T > 1 else states[0][None]  # [T, nv, dk, dv]
        o = torch.matmul(q[:, :, None, :], St)[:, :, 0]  # [T, nv, dv]
        cache.record(mixed, states)
        return o


# Sequences whose GatedDeltaNet state (nv * dk * dv fp32 values) is at least this big run their
# recurrence one by one in a batched step: stacking n states copies n x 4 bytes x this per layer
# (a Qwen3.5-0.8B layer: 1 MB per sequence), more than the per-sequence ops cost; smaller states
# (the default model's 16 KB) are stacked into one update per position.
STACK_STATE_MAX = 1 << 16


def _recurrence(S, q, k, v, beta, decay):
    """The gated delta rule, token by token, for n stacked sequences of T positions each:
    S [n, nv, dk, dv] fp32, k [n, T, nv, dk], v [n, T, nv, dv], beta / decay [n, T, nv]
    -> the state after each position (T x [n*nv, dk, dv]: sequence j's heads are rows
    j*nv..(j+1)*nv-1). Only the state update is in the loop; sequences and heads fold into one
    bmm batch, which multiplies each [1, dk] x [dk, dv] matrix pair on its own."""
    n, T, nv, dk = k.shape
    dv = v.shape[-1]
    S = S.reshape(n * nv, dk, dv)
    kt = k.transpose(0, 1).reshape(T, n * nv, dk)
    dec = decay.transpose(0, 1).reshape(T, n * nv, 1, 1).unbind(0)  # T x [n*nv, 1, 1]
    krow = kt[:, :, None, :].unbind(0)  # T x [n*nv, 1, dk]
    kcol = kt[:, :, :, None].unbind(0)  # T x [n*nv, dk, 1]
    vrow = v.transpose(0, 1).reshape(T, n * nv, 1, dv).unbind(0)
    brow = beta.transpose(0, 1).reshape(T, n * nv, 1, 1).unbind(0)
    states = []
    for t in range(T):
        S = S * dec[t]
        delta = (vrow[t] - torch.bmm(krow[t], S)) * brow[t]  # [n*nv, 1, dv]
        S = S + kcol[t] * delta
        states.append(S)
    return states


# ---- MLPs ------------------------------------------------------------------------------------


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x). gate_up [2I, H] (gate rows first), down [H, I]."""

    def __init__(self, H: int, I: int):
        super().__init__()
        self.I = I
        self.gate_up = nn.Parameter(torch.empty(2 * I, H))
        self.down = nn.Parameter(torch.empty(H, I))

    def forward(self, x, ops: Ops = PLAIN):  # x [N, H] -> [N, H]
        gu = ops.lin(x, self.gate_up)
        return ops.lin(ops.ew(F.silu, gu[:, : self.I]) * gu[:, self.I:], self.down)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors (loaded under inference_mode) track no version
        return -1


# Exact-path MoE blocks with E * moe_intermediate_size up to this run every expert for every row
# in two fused matmuls (MoE.forward_dense): for small experts the per-expert gather/scatter ops
# cost more than the extra FLOPs, and the cost no longer grows with the number of distinct
# experts a verify's rows pick. Larger blocks keep the sparse per-expert loop.
DENSE_MOE_MAX_EI = 4096


class MoE(nn.Module):
    """Sparse MoE: fp32 softmax router, top-k, renormalise, stacked SwiGLU experts, plus
    sigmoid(shared_expert_gate x) * shared_expert(x). experts.gate_up [E, 2I, H], down [E, H, I]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, E, I = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.E, self.top_k, self.I = E, cfg.num_experts_per_tok, I
        self.norm_topk = cfg.norm_topk_prob
        self.router = nn.Parameter(torch.empty(E, H))
        self.gate_up = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down = nn.Parameter(torch.empty(E, H, I))
        self.shared = MLP(H, cfg.shared_expert_intermediate_size)
        self.shared_gate = nn.Parameter(torch.empty(1, H))

    def route(self, x, ops: Ops = PLAIN):  # x [N, H] -> weights [N, k] (x.dtype), experts [N, k]
        logits = ops.lin(x, self.router)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            w = w / w.sum(-1, keepdim=True)
        return w.to(x.dtype), idx

    def _fused(self):
        """Exact-path weights for dense evaluation (built once, rebuilt if a weight changes):
        w1 [E + 1 + E*2I + 2Is, H] = router | shared gate | every expert's gate_up | shared gate_up,
        w2 [H, E*I + Is] = every expert's down | shared down. None when not applicable."""
        ws = (self.router, self.shared_gate, self.gate_up, self.down, self.shared.gate_up, self.shared.down)
        if not all(isinstance(t, torch.Tensor) for t in ws) or self.E * self.I > DENSE_MOE_MAX_EI:
            return None
        key = tuple((t.data_ptr(), _version(t)) for t in ws)
        f = self.__dict__.get("_fused_w")
        if f is None or f[0] != key:
            with torch.no_grad():
                E, I, H = self.E, self.I, self.router.shape[1]
                w1 = torch.cat([self.router, self.shared_gate.to(self.router.dtype),
                                self.gate_up.reshape(E * 2 * I, H), self.shared.gate_up]).contiguous()
                w2 = torch.cat([self.down.permute(1, 0, 2).reshape(H, E * I), self.shared.down], 1).contiguous()
            f = (key, w1, w2)
            self.__dict__["_fused_w"] = f
        return f[1], f[2]

    def forward_dense(self, x, w1, w2, ops: Ops):
        """Exact path, all experts at once (cost independent of which experts the rows pick):
        one row-invariant matmul for router + shared gate + every gate_up, SwiGLU on all experts,
        each expert's activation scaled by its routing weight (0 when not picked), one
        row-invariant matmul over all experts' down + the shared expert. x [N, H] -> [N, H]."""
        N, H = x.shape
        E, I, Is = self.E, self.I, self.shared.I
        y = ops.lin(x, w1)  # [N, E + 1 + E*2I + 2Is]
        fused = ops.fused
        if fused is not None:  # routing + every activation in one compiled call
            act = fused.moe_act(y.float().contiguous(), E, I, Is, self.top_k, bool(self.norm_topk), x.dtype)
            return ops.lin(act, w2)
        probs = torch.softmax(y[:, :E], dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            w = w / w.sum(-1, keepdim=True)
        wfull = x.new_zeros(N, E + 1)
        wfull.scatter_(1, idx, w.to(x.dtype))
        wfull[:, E:] = exact_ew(torch.sigmoid, y[:, E:E + 1])
        gu = y[:, E + 1:].reshape(N, E + 1, 2 * I) if Is == I else None
        if gu is None:  # shared expert of another width: two pieces
            ge = y[:, E + 1:E + 1 + E * 2 * I].reshape(N, E, 2 * I)
            gs = y[:, E + 1 + E * 2 * I:]
            a = ops.ew(F.silu, ge[..., :I].contiguous()) * ge[..., I:]
            a = (a * wfull[:, :E, None]).reshape(N, E * I)
            sa = ops.ew(F.silu, gs[:, :Is].contiguous()) * gs[:, Is:] * wfull[:, E:]
            a = torch.cat([a, sa], 1)
        else:
            a = ops.ew(F.silu, gu[..., :I].contiguous()) * gu[..., I:]
            a = (a * wfull[:, :, None]).reshape(N, (E + 1) * I)
        return ops.lin(a, w2)

    def forward_one(self, x):
        """One row, only the picked experts' weights read (drafting: a memory-bound CPU pays for
        every expert matrix it touches). Plain numerics. x [1, H] -> [1, H]."""
        w, idx = self.route(x)  # [1, k]
        out = torch.sigmoid(plain_linear(x, self.shared_gate)) * self.shared(x)
        for j, e in enumerate(idx[0].tolist()):
            gu = F.linear(x, self.gate_up[e])  # [1, 2I]
            out = out + w[:, j:j + 1] * F.linear(F.silu(gu[:, :self.I]) * gu[:, self.I:], self.down[e])
        return out

    def forward(self, x, ops: Ops = PLAIN):  # x [N, H] -> [N, H]
        if ops is FEW_ROWS and x.shape[0] == 1 and isinstance(self.gate_up, torch.Tensor):
            return self.forward_one(x)
        if ops is not PLAIN:
            f = self._fused()
            if f is not None:
                return self.forward_dense(x, f[0], f[1], ops)
        N, H = x.shape
        w, idx = self.route(x, ops)
        buf = x.new_zeros(N, self.top_k, H)
        for e in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == e)
            gu = ops.lin(x[tok], self.gate_up[e])
            y = ops.lin(ops.ew(F.silu, gu[:, : self.I]) * gu[:, self.I:], self.down[e])
            buf.index_put_((tok, slot), y * w[tok, slot, None])
        out = buf[:, 0]
        for j in range(1, self.top_k):  # fixed rank order: a token's sum ignores its neighbours
            out = out + buf[:, j]
        sh = self.shared(x, ops)
        return out + ops.ew(torch.sigmoid, ops.lin(x, self.shared_gate)) * sh


# ---- decoder layer and model -----------------------------------------------------------------


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str, moe: bool):
        super().__init__()
        self.is_attn = layer_type == FULL_ATTENTION
        self.eps = cfg.rms_norm_eps
        self.input_norm = nn.Parameter(torch.ones(cfg.hidden_size, dtype=torch.float32))
        self.post_norm = nn.Parameter(torch.ones(cfg.hidden_size, dtype=torch.float32))
        self.mixer = Attention(cfg) if self.is_attn else GatedDeltaNet(cfg)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.tp = None  # tensor parallel (tp_comm.TensorParallel): mixer and MLP give partial sums

    def _sum(self, h: torch.Tensor) -> torch.Tensor:
        """A block's output: this rank's partial sum summed over the tensor-parallel ranks."""
        return h if self.tp is None else self.tp.all_reduce(h)

    def forward(self, x, rope, pos0=0, cache=None, mlp_ops: Ops = PLAIN):  # parallel: x [B, T, H]
        h = rms_norm(x, self.input_norm, self.eps)
        h = self.mixer(h, rope, pos0, cache) if self.is_attn else self.mixer(h, cache)
        x = x + self._sum(h)
        h = rms_norm(x, self.post_norm, self.eps)
        B, T, H = h.shape
        return x + self._sum(self.mlp(h.reshape(B * T, H), mlp_ops)).reshape(B, T, H)

    def step(self, x, rope, pos0, cache, ops: Ops = EXACT):  # exact: x [T, H]
        return self.step_many(x, rope, [(pos0, x.shape[0])], [cache], ops)

    def forward_many(self, x, rope, spans, caches, mlp_ops: Ops = PLAIN):  # parallel, attention only: x [N, H]
        h = self.mixer.forward_many(rms_norm(x, self.input_norm, self.eps), rope, spans, caches)
        x = x + self._sum(h)
        return x + self._sum(self.mlp(rms_norm(x, self.post_norm, self.eps), mlp_ops))

    def step_many(self, x, rope, spans, caches, ops: Ops = EXACT):  # exact: x [sum T_i, H]
        h = ops.norm(x, self.input_norm, self.eps)
        if self.is_attn:
            h = self.mixer.step_many(h, rope, spans, caches, ops)
        else:
            h = self.mixer.step_many(h, [T for _, T in spans], caches, ops)
        x = x + self._sum(h)
        return x + self._sum(self.mlp(ops.norm(x, self.post_norm, self.eps), ops))


class Qwen35Model(nn.Module):
    """The target model (+ optional MTP head in `self.mtp`). Build it with `loader.load_torch_model`
    or `Qwen35Model(cfg)` + `load_canonical_state`."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        self.eps = cfg.rms_norm_eps
        H, V = cfg.hidden_size, cfg.vocab_size
        self.embed = nn.Parameter(torch.empty(V, H))
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, cfg.layer_types[i], cfg.layer_is_moe(i)) for i in range(cfg.num_hidden_layers)
        )
        self.norm = nn.Parameter(torch.ones(H, dtype=torch.float32))
        self.tied = cfg.tie_word_embeddings
        self.lm_head = None if self.tied else nn.Parameter(torch.empty(V, H))
        self.rope = Rope(cfg)
        self.mtp = None  # MtpHead, attached by the loader when the checkpoint has one
        self.mtp_hidden = "post"  # which target hidden feeds the head: "post" | "pre" final norm
        self.kernel = "torch"  # exact path: "torch" (row padding) | "rowmm" (compiled ops) | "fused" (compiled step)
        self.batch_threads = None  # torch threads of a batched verify (set_batch_threads), None: as decode
        self.prefill_threads = None  # torch threads of prefill blocks, None: as decode (loader.apply_default_threads)
        self.tp = None  # tensor parallel (tp_comm.TensorParallel): this model is one rank's shard

    # -- helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def head_weight(self) -> torch.Tensor:
        return self.embed if self.lm_head is None else self.lm_head

    def logits(self, h: torch.Tensor, lin=plain_linear) -> torch.Tensor:  # [..., H] -> [..., V]
        lead = h.shape[:-1]
        out = lin(h.reshape(-1, h.shape[-1]), self.head_weight())
        if self.tp is not None:  # this rank's vocab slice -> the whole vocab on rank 0 (None elsewhere)
            out = self.tp.gather_vocab(out, self.cfg.vocab_size)
            if out is None:
                return None
        return out.reshape(*lead, -1)

    # -- parallel path (training, prompts)
    def forward_hidden(self, ids: torch.Tensor, cache=None, pos0: int = 0, logits: str = "all"):
        """ids [B, T] -> (hidden_post [B, T, H], hidden_pre [B, T, H], logits [B, T, V] | [B, V] | None).
        Autograd-safe when cache is None. logits: "all", "last" or "none"."""
        x = F.embedding(ids, self.embed)
        for i, layer in enumerate(self.layers):
            x = layer(x, self.rope, pos0, None if cache is None else cache.layers[i])
        post = rms_norm(x, self.norm, self.eps)
        out = None
        if logits == "all":
            out = self.logits(post)
        elif logits == "last":
            out = self.logits(post[:, -1])
        return post, x, out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> logits [B, T, V]
        return self.forward_hidden(ids)[2]

    @torch.inference_mode()
    def prompt_logits(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, V] (parallel path, no cache)
        logits = self.forward_hidden(ids[None])[2]
        return None if logits is None else logits[0]

    def prefill(self, ids: torch.Tensor, cache):
        """ids [T] after cache.length positions -> (post [T, H], pre [T, H], last logits [V]);
        commits the T positions to the cache."""
        pos0 = cache.length
        cache.ensure(pos0 + ids.shape[0])
        post, pre, last = self.forward_hidden(ids[None], cache, pos0, logits="last")
        cache.length = pos0 + ids.shape[0]
        return post[0], pre[0], (None if last is None else last[0])  # None: a tensor-parallel worker

    # -- exact path (decode and verify)
    def step(self, ids: torch.Tensor, cache):
        """ids [T] at positions cache.length.. -> (post [T, H], pre [T, H], logits [T, V]).
        Positions stay pending until cache.keep(m)."""
        return self.step_many(ids, [ids.shape[0]], [cache])

    def step_many(self, ids: torch.Tensor, lengths: list[int], caches: list):
        """The exact step of several sequences in one forward: ids [sum T_i] (sequence i's T_i
        ids at positions caches[i].length..) -> (post, pre [sum T_i, H], logits [sum T_i, V]).
        Every kernel is row-invariant and attention / recurrence stay per sequence, so each
        sequence's rows are bit-identical to its own `step`."""
        spans = []
        for T, cache in zip(lengths, caches):
            cache.ensure(cache.length + T)
            spans.append((cache.length, T))
        if self.kernel == "fused":
            return fused.target_step(self, ids, spans, caches)
        ops = KERNELS[self.kernel]
        x = F.embedding(ids, self.embed)
        for i, layer in enumerate(self.layers):
            x = layer.step_many(x, self.rope, spans, [c.layers[i] for c in caches], ops)
        post = ops.norm(x, self.norm, self.eps)
        return post, x, self.logits(post, ops.lin)

    def set_kernel(self, kernel: str) -> str:
        """Choose the exact-path kernel: "torch" (pure torch, row padding), "rowmm" (compiled
        fixed-order matmuls and fused ops, orchestrated from Python), "fused" (the whole step in
        one compiled call, fused.py) or "auto" (fused where the model allows it, else rowmm, on a
        CPU with AVX-512 or AVX2 where the kernel builds; else torch). Set it before creating
        sessions: the kernels give different bits, so a session must not change kernels
        mid-sequence. Returns the kernel in use."""
        if kernel == "auto":
            if self.device.type != "cpu" or kernels.get_rowmm() is None:
                kernel = "torch"
            else:
                kernel = "fused" if fused.unsupported(self) is None else "rowmm"
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be 'torch', 'rowmm', 'fused' or 'auto', got {kernel!r}")
        if kernel in ("rowmm", "fused") and (self.device.type != "cpu" or kernels.get_rowmm() is None):
            raise RuntimeError(f"the {kernel} kernel is unavailable: {kernels.kernel_error() or 'not a CPU model'}")
        why = fused.unsupported(self) if kernel == "fused" else None
        if why is not None:
            raise RuntimeError(f"the fused kernel cannot run this model: {why} (use --kernel rowmm)")
        self.kernel = kernel
        fused.reset(self)
        if self.mtp is not None:
            fused.reset(self.mtp)
        return kernel

    def set_batch_threads(self, threads: int | None) -> int | None:
        """Let a verify forward of several sequences run on `threads` torch threads (decode keeps
        the current count: a small model decodes faster on one). Only when the exact step is
        measured to give the same bits on that many threads (`check_thread_invariance`); returns
        the count in use (None: as decode)."""
        base = torch.get_num_threads()
        if not threads or threads <= base or self.device.type != "cpu":
            self.batch_threads = None
            return None
        with torch.inference_mode():
            failures = check_thread_invariance(self, threads)
        self.batch_threads = None if failures else int(threads)
        return self.batch_threads

    def new_cache(self, max_len: int):
        from .cache import ModelCache

        return ModelCache(self, max_len)

    def new_head_cache(self, max_len: int):  # the MTP head's KV cache of one session
        from .cache import AttnCache

        return AttnCache(self.cfg.num_key_value_heads, self.cfg.head_dim, self.dtype, self.device, max_len)

    def new_session(self, max_context: int | None = None, hidden_source: str | None = None, **options):
        from .session import TorchSession

        return TorchSession(self, max_context=max_context, hidden_source=hidden_source, **options)


def check_thread_invariance(model: Qwen35Model, threads: int, rows=(1, 4, 13)) -> list[str]:
    """Measure, on this machine, that the exact step gives the same bits with `threads` torch
    threads as with the current count: sessions prefilled alike (at the current count), then
    verify rows at either count. A batched verify may run on more threads than decode only when
    this holds (mtplx/decoding/batch.py). Returns a list of failures (empty: invariant)."""
    base = torch.get_num_threads()
    gen = torch.Generator().manual_seed(1)
    V = model.cfg.vocab_size
    bad = []
    for n in rows:
        prompt = torch.randint(0, V, (70,), generator=gen).tolist()
        feed = torch.randint(0, V, (n,), generator=gen).tolist()
        outs = []
        for t in (base, threads):
            s = model.new_session()
            s.prefill(prompt)
            s.last = feed[0]
            torch.set_num_threads(t)
            try:
                outs.append(s.verify(feed[1:]))
            finally:
                torch.set_num_threads(base)
        if not torch.equal(outs[0], outs[1]):
            bad.append(f"{n} rows: {threads} threads differ from {base}")
    return bad


def check_row_invariance(model: Qwen35Model, max_rows: int = 8) -> list[str]:
    """Measure, on this machine and thread count, that exact_linear gives bit-identical rows for
    1..max_rows rows on every distinct weight shape of `model`. Returns a list of failures."""
    shapes: dict[tuple, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.ndim == 2 and p.dtype == model.dtype:
            shapes.setdefault(tuple(p.shape), p)
        elif p.ndim == 3:
            shapes.setdefault(tuple(p.shape[1:]), p[0])
    bad = []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for shape, w in shapes.items():
            x = torch.randn(max_rows, shape[1], generator=gen).to(w.dtype)
            lin = KERNELS[model.kernel].lin
            ref = lin(x[:1], w)[0]
            for m in range(2, max_rows + 1):
                for pos in (0, m - 1):
                    xx = torch.randn(m, shape[1], generator=gen).to(w.dtype)
                    xx[pos] = x[0]
                    if not torch.equal(lin(xx, w)[pos], ref):
                        bad.append(f"{tuple(shape)} {w.dtype}: row {pos} of {m} differs from 1 row")
    return bad


__all__ = [
    "ROW_GROUP", "exact_linear", "exact_ew", "Ops", "PLAIN", "EXACT", "EXACT_ROWMM", "KERNELS", "rms_norm", "Rope", "Attention", "GatedDeltaNet", "MLP", "MoE",
    "DecoderLayer", "Qwen35Model", "chunk_gated_delta", "causal_conv", "check_row_invariance",
    "check_thread_invariance",
]
