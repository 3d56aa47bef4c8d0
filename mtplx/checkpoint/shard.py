"""Tensor-parallel sharding: which slice of every canonical tensor a rank holds (numpy only).

Megatron-style, one all-reduce per block (model.DecoderLayer._sum):
- column parallel (out rows split): attention q|gate (per query head), k, v (per KV head);
  GatedDeltaNet in_proj qkv (each of its q / k / v sections per key or value head), z, b, a,
  the conv kernel, A_log and dt_bias (per head); dense and expert gate / up (intermediate dim);
- row parallel (in columns split): o_proj, out_proj, down (dense, every expert, shared expert),
  so each rank's block output is a partial sum;
- MoE experts split along their intermediate dim (every rank holds every expert, 1/N of each):
  the router is replicated, every rank routes alike and works the same amount whatever the
  routing; the shared expert likewise;
- KV heads: split when N divides them, else (N a multiple of the KV head count, as the
  2-KV-head Qwen3.5 MoE models on 4 or 8 ranks) each KV head replicated on N / nkv ranks;
- vocab parallel lm_head (rows split, the last rank's slice shorter when N does not divide
  the vocab); the embedding, norms, router, shared-expert gate and the MTP fc are replicated.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from mtplx.checkpoint.config import ModelConfig


class TPError(ValueError):
    """A tensor-parallel setup this checkpoint cannot take (a user error: says what to change)."""


def split_dims(cfg: ModelConfig) -> dict[str, int]:
    """The dimensions tensor parallelism splits (name -> size), dense or MoE."""
    dims = {"num_attention_heads": cfg.num_attention_heads,
            "linear_num_key_heads": cfg.linear_num_key_heads,
            "linear_num_value_heads": cfg.linear_num_value_heads}
    if cfg.intermediate_size and (not cfg.is_moe or cfg.mlp_only_layers):
        dims["intermediate_size"] = cfg.intermediate_size
    if cfg.is_moe:
        dims["moe_intermediate_size"] = cfg.moe_intermediate_size
        dims["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
    return dims


def tp_problems(cfg: ModelConfig, world: int) -> list[str]:
    """Why `world` ranks cannot split this model ([] when they can)."""
    if world < 1:
        return [f"the rank count must be >= 1, got {world}"]
    bad = [f"{name}={n} is not divisible by {world}" for name, n in split_dims(cfg).items() if n % world]
    nkv = cfg.num_key_value_heads
    if nkv % world and world % nkv:
        bad.append(f"num_key_value_heads={nkv} neither divides nor is divided by {world}")
    return bad


def valid_tp_sizes(cfg: ModelConfig, upto: int = 64) -> list[int]:
    return [n for n in range(1, upto + 1) if not tp_problems(cfg, n)]


def check_tp(cfg: ModelConfig, world: int) -> None:
    bad = tp_problems(cfg, world)
    if bad:
        ok = [n for n in valid_tp_sizes(cfg) if n > 1][:6]
        hint = f"rank counts this model takes: {', '.join(map(str, ok))}" if ok else "this model takes no tensor parallelism"
        raise TPError(f"--tp {world}: {'; '.join(bad)} ({hint})")


def local_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The config of one rank's shard: heads and intermediate widths divided by `world`."""
    check_tp(cfg, world)
    d = world
    return dataclasses.replace(
        cfg,
        num_attention_heads=cfg.num_attention_heads // d,
        num_key_value_heads=max(1, cfg.num_key_value_heads // d),
        linear_num_key_heads=cfg.linear_num_key_heads // d,
        linear_num_value_heads=cfg.linear_num_value_heads // d,
        intermediate_size=cfg.intermediate_size // d if cfg.intermediate_size % d == 0 else cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size // d,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size // d,
    )


def vocab_slice(cfg: ModelConfig, rank: int, world: int) -> tuple[int, int, int]:
    """(start, stop, per-rank width) of rank's lm_head rows: ceil(V / world) rows each, the
    last rank's slice shorter (its logits are zero-padded to the width before the gather)."""
    V = cfg.vocab_size
    w = -(-V // world)
    return min(V, rank * w), min(V, (rank + 1) * w), w


_LAYER = re.compile(r"^(?:mtp\.)?layers\.\d+\.(.+)$")


def _even(n: int, rank: int, world: int) -> list[tuple[int, int]]:
    s = n // world
    return [(rank * s, (rank + 1) * s)]


def _kv_heads(cfg: ModelConfig, rank: int, world: int) -> list[tuple[int, int]]:
    """Rows of rank's KV heads in a k_proj / v_proj weight."""
    nkv, hd = cfg.num_key_value_heads, cfg.head_dim
    if nkv % world == 0:
        return _even(nkv * hd, rank, world)
    head = rank // (world // nkv)  # replicated: world // nkv ranks share one KV head
    return [(head * hd, (head + 1) * hd)]


def shard_rule(name: str, cfg: ModelConfig, rank: int, world: int):
    """(dim, [(start, stop), ...]) of canonical tensor `name` that `rank` holds (the ranges
    concatenated along `dim`, a negative dim so stacked and per-expert tensors agree), or None
    when every rank holds all of it."""
    if name == "lm_head.weight":
        a, b, _ = vocab_slice(cfg, rank, world)
        return -2, [(a, b)]
    m = _LAYER.match(name)
    if not m:
        return None  # embedding, final norm, mtp.fc and the head's norms
    rest = m[1]
    kd, vd, nv = cfg.linear_key_dim, cfg.linear_value_dim, cfg.linear_num_value_heads
    ev = lambda n: _even(n, rank, world)  # noqa: E731
    col = {
        "self_attn.q_proj.weight": ev(cfg.num_attention_heads * 2 * cfg.head_dim),
        "self_attn.k_proj.weight": _kv_heads(cfg, rank, world),
        "self_attn.v_proj.weight": _kv_heads(cfg, rank, world),
        "linear_attn.in_proj_z.weight": ev(vd),
        "linear_attn.in_proj_b.weight": ev(nv),
        "linear_attn.in_proj_a.weight": ev(nv),
        "linear_attn.A_log": ev(nv),
        "linear_attn.dt_bias": ev(nv),
    }
    if rest in col:
        return (-1 if rest.endswith(("A_log", "dt_bias")) else -2), col[rest]
    if rest in ("linear_attn.in_proj_qkv.weight", "linear_attn.conv1d.weight"):
        k, v = _even(kd, rank, world)[0], _even(vd, rank, world)[0]
        return -2, [k, (kd + k[0], kd + k[1]), (2 * kd + v[0], 2 * kd + v[1])]
    if rest == "self_attn.o_proj.weight":
        return -1, ev(cfg.num_attention_heads * cfg.head_dim)
    if rest == "linear_attn.out_proj.weight":
        return -1, ev(vd)
    if rest.startswith("mlp."):
        r = rest[len("mlp."):]
        if r in ("gate.weight", "shared_expert_gate.weight"):
            return None
        width = (cfg.moe_intermediate_size if r.startswith("experts.") else
                 cfg.shared_expert_intermediate_size if r.startswith("shared_expert.") else cfg.intermediate_size)
        if r.startswith(("experts.gate_proj", "experts.up_proj", "shared_expert.gate_proj", "shared_expert.up_proj",
                         "gate_proj", "up_proj")):
            return -2, ev(width)
        if r.startswith(("experts.down_proj", "shared_expert.down_proj", "down_proj")):
            return -1, ev(width)
    return None  # norms (q/k norm, the gated norm, layer norms)


def take_shard(arr, rule) -> np.ndarray:
    """arr's slice under `rule` (shard_rule); a view where one range suffices (a memory-mapped
    checkpoint then reads only those bytes)."""
    if rule is None:
        return arr
    dim, ranges = rule
    dim = dim % arr.ndim
    parts = [arr[(slice(None),) * dim + (slice(a, b),)] for a, b in ranges]
    return parts[0] if len(parts) == 1 else np.concatenate([np.asarray(p) for p in parts], axis=dim)


def rank_bytes(cfg: ModelConfig, world: int, dtype_bytes: int = 2, n_mtp_layers: int = 1) -> dict[str, int]:
    """Bytes of weights one rank holds: {"sharded", "replicated", "total"} (the largest rank)."""
    from mtplx.checkpoint.layout import canonical_shapes

    sharded = replicated = 0
    for name, shape in canonical_shapes(cfg, n_mtp_layers).items():
        n = math.prod(shape)
        rule = shard_rule(name, cfg, 0, world)
        if rule is None:
            replicated += n
        else:
            dim, ranges = rule
            sharded += n // shape[dim] * sum(b - a for a, b in ranges)
    return {"sharded": sharded * dtype_bytes, "replicated": replicated * dtype_bytes,
            "total": (sharded + replicated) * dtype_bytes}


__all__ = ["TPError", "check_tp", "tp_problems", "valid_tp_sizes", "split_dims", "local_config", "vocab_slice",
           "shard_rule", "take_shard", "rank_bytes"]
