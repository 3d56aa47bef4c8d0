"""`mtplx inspect MODEL --plan --tp N`: the memory of one tensor-parallel rank, from the config alone.

Per rank: weights (its shards plus what every rank holds whole), the attention KV cache and the
GatedDeltaNet states of `sequences` sequences at `context` tokens (target and MTP head), whether
that fits `memory` bytes, and which of the model's dimensions decide the rank counts it takes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .config import FULL_ATTENTION, ModelConfig
from .shard import local_config, rank_bytes, split_dims, tp_problems, valid_tp_sizes

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class TPPlan:
    tp: int
    dtype: str
    context: int
    sequences: int
    problems: list[str] = field(default_factory=list)  # why tp ranks cannot split the model
    valid_tp: list[int] = field(default_factory=list)
    limiting: list[str] = field(default_factory=list)  # the dimensions that bound the largest valid tp
    weights_sharded: int = 0  # bytes per rank
    weights_replicated: int = 0
    kv_cache: int = 0
    states: int = 0
    memory: int | None = None

    @property
    def total(self) -> int:
        return self.weights_sharded + self.weights_replicated + self.kv_cache + self.states

    @property
    def fits(self) -> bool | None:
        return None if self.memory is None else self.total <= self.memory

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "fits": self.fits}


def plan_tp(cfg: ModelConfig, tp: int, *, context: int, sequences: int = 1, dtype: str = "bfloat16",
            memory: int | None = None, n_mtp_layers: int = 1) -> TPPlan:
    b = DTYPE_BYTES[dtype]
    valid = valid_tp_sizes(cfg)
    plan = TPPlan(tp, dtype, context, sequences, tp_problems(cfg, tp), valid, _limiting(cfg, max(valid)), memory=memory)
    if plan.problems:
        return plan
    w = rank_bytes(cfg, tp, b, n_mtp_layers)
    plan.weights_sharded, plan.weights_replicated = w["sharded"], w["replicated"]
    loc = local_config(cfg, tp)
    n_attn = sum(t == FULL_ATTENTION for t in cfg.layer_types) + n_mtp_layers
    n_lin = cfg.num_hidden_layers - (n_attn - n_mtp_layers)
    per_token = 2 * loc.num_key_value_heads * cfg.head_dim * b
    plan.kv_cache = n_attn * per_token * context * sequences
    state = loc.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
    conv = (cfg.linear_conv_kernel_dim - 1) * loc.linear_conv_dim * b
    plan.states = n_lin * (state + conv) * sequences
    return plan


def _limiting(cfg: ModelConfig, largest: int) -> list[str]:
    """The split dimensions that twice the largest valid rank count would not divide."""
    nxt = 2 * largest
    bad = [f"{k}={v}" for k, v in split_dims(cfg).items() if v % nxt]
    nkv = cfg.num_key_value_heads
    if nkv % nxt and nxt % nkv:
        bad.append(f"num_key_value_heads={nkv}")
    return bad


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def render_plan(plan: TPPlan) -> str:
    head = f"tensor parallel over {plan.tp} rank{'s' if plan.tp > 1 else ''} ({plan.dtype}"
    head += f", {plan.sequences} sequence{'s' if plan.sequences > 1 else ''} at {plan.context} tokens)"
    lines = [head]
    sizes = ", ".join(map(str, plan.valid_tp))
    lines.append(f"  rank counts this model takes: {sizes} (the next is bounded by {', '.join(plan.limiting) or '-'})")
    if plan.problems:
        lines.append(f"  --tp {plan.tp} cannot run: {'; '.join(plan.problems)}")
        return "\n".join(lines)
    lines += [f"  weights per rank: {_gb(plan.weights_sharded + plan.weights_replicated)} "
              f"({_gb(plan.weights_sharded)} sharded + {_gb(plan.weights_replicated)} on every rank)",
              f"  KV cache per rank: {_gb(plan.kv_cache)}; GatedDeltaNet states: {_gb(plan.states)}",
              f"  total per rank: {_gb(plan.total)}"]
    if plan.memory is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"  {verdict} in {_gb(plan.memory)} per rank"
                     + ("" if plan.fits else ": raise --tp, shorten the context or quantize"))
    return "\n".join(lines)


__all__ = ["TPPlan", "plan_tp", "render_plan", "DTYPE_BYTES"]
