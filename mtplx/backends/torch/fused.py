"""The "fused" exact-path kernel: a whole decode / verify step in one compiled call.

`csrc/step.cpp`'s `Step` holds pointers to a decoder stack's weights (no copies of the matrices:
in-place updates are seen) and runs the exact step of one or more sequences, embedding to logits, in
C++: the ~900 torch calls of a default-model step become one. Its arithmetic is its own fixed
per-row order (see step.cpp), so verify rows equal decode rows and a batched sequence equals
itself alone, as on the other kernels; bits differ from the "rowmm" kernel's (it rounds and
routes differently), which is why a model picks one kernel for its whole life.

The target's step (`target_step`) and the MTP head's rows (`head_rows`) each get a Step, built on
first use and kept in the module's __dict__.
"""

from __future__ import annotations

import torch

from . import kernels
from .int8 import Int8Weight

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported(model) -> str | None:
    """Why `model` cannot run the fused kernel (None: it can)."""
    if kernels.get_fused() is None or not hasattr(kernels.get_fused(), "Step"):
        return kernels.kernel_error() or "the compiled kernel is unavailable"
    if model.device.type != "cpu":
        return "not a CPU model"
    if model.tp is not None:
        return "tensor parallel (the fused step has no collectives)"
    for name, p in list(model.named_parameters()) + [("lm_head", model.head_weight())]:
        if not isinstance(p, torch.Tensor) or p.dtype not in _DTYPES:
            return f"{name} is not a plain fp32 / bf16 / fp16 tensor"
        if not p.is_contiguous():
            return f"{name} is not contiguous"
    for name, mod in model.named_modules():  # quantized weights are attributes, not parameters
        for k, v in vars(mod).items():
            if isinstance(v, Int8Weight):
                return f"{name}.{k} is int8-quantized"
    return None


def _add_layers(step, layers, rope_dim: int) -> None:
    for layer in layers:
        m = layer.mixer
        if layer.is_attn:
            step.add_attention(layer.input_norm, layer.post_norm, m.qkv, m.o_proj, m.q_norm, m.k_norm,
                               m.nh, m.nkv, m.hd, rope_dim)
        else:
            step.add_gdn(layer.input_norm, layer.post_norm, m.in_proj, m.conv_w, m.A_log, m.dt_bias, m.gnorm,
                         m.out_proj, m.nk, m.dk, m.nv, m.dv)
        mlp = layer.mlp
        if hasattr(mlp, "router"):
            step.set_moe(mlp.router, mlp.shared_gate, mlp.shared.gate_up, mlp.gate_up, mlp.down, mlp.shared.down,
                         mlp.top_k, bool(mlp.norm_topk))
        else:
            step.set_dense_mlp(mlp.gate_up, mlp.down)


def _step_for(owner, layers, target, fc=None):
    step = owner.__dict__.get("_fused_step")
    if step is None:
        layers = layers()
        Step = kernels.get_fused().Step
        step = Step(target.cfg.hidden_size, target.eps, target.embed, owner.norm, kernels.PAR_MIN_BYTES)
        if fc is not None:
            step.set_fc(*fc)
        _add_layers(step, layers, target.rope.dim)
        owner.__dict__["_fused_step"] = step
    return step


def reset(module) -> None:
    """Drop a built Step (after set_kernel or a weight replacement)."""
    module.__dict__.pop("_fused_step", None)


_EMPTY = torch.empty(0)


def _run(step, rope, ids, hidden, spans, caches, head_w, head_scale, logit_rows):
    """caches[i]: (attention caches, GatedDeltaNet caches) of sequence i, in layer order."""
    rope._grow(max(p0 + T for p0, T in spans))
    kv, gdn = [], []
    for attn, lin in caches:
        for c in attn:
            kv += (c.k, c.v)
        for c in lin:
            gdn += (c.conv, c.state if c.state.is_contiguous() else c.state.contiguous())
    return step.run(ids, hidden, [p0 for p0, _ in spans], [T for _, T in spans], kv, gdn, rope._cos, rope._sin,
                    head_w, head_scale, logit_rows)


def _record(out, spans, caches) -> None:
    """Hand each GatedDeltaNet cache its states and conv windows after every position (keep(m))."""
    n_gdn = len(caches[0][1])
    n = n_gdn * len(spans)
    states, convs = out[3:3 + n], out[3 + n:3 + 2 * n]
    for i, (_, lin) in enumerate(caches):
        for j, c in enumerate(lin):
            c.record(None, states[i * n_gdn + j], convs[i * n_gdn + j])


def target_step(model, ids: torch.Tensor, spans, caches) -> tuple:
    """The exact step of several sequences (Qwen35Model.step_many's contract): ids [sum T_i],
    spans [(pos0_i, T_i)], caches: their ModelCaches (ensured) -> (post, pre, logits [sum T_i, V])."""
    step = _step_for(model, lambda: model.layers, model)
    attn = model.__dict__.get("_fused_attn")
    if attn is None:  # which layers are attention (the rest GatedDeltaNet), once
        attn = model.__dict__["_fused_attn"] = [layer.is_attn for layer in model.layers]
    split = [([c for c, a in zip(mc.layers, attn) if a], [c for c, a in zip(mc.layers, attn) if not a])
             for mc in caches]
    out = _run(step, model.rope, ids.contiguous(), _EMPTY, spans, split, model.head_weight(), _EMPTY, [])
    _record(out, spans, split)
    return out[0], out[1], out[2]


def _head_step(head, draft: bool) -> tuple:
    """The MTP head's Step and its lm_head (weight, int8 scale or empty): the draft one when drafting."""
    step = _step_for(head, lambda: head.layers[:1], head.target, fc=(head.norm_emb, head.norm_hid, head.fc))
    lm = head._draft_lm if draft else None
    if lm is None:
        return step, head.target.head_weight(), _EMPTY
    return (step, lm, _EMPTY) if isinstance(lm, torch.Tensor) else (step, lm.q, lm.scale_f32)


def head_rows(head, hidden: torch.Tensor, next_ids: torch.Tensor, spans, caches, logit_rows: list[int],
              draft: bool) -> tuple:
    """The MTP head's rows of several sequences (AttnCache each) -> (g, u, logits of `logit_rows`,
    all rows when empty); draft: through the draft lm_head."""
    target = head.target
    step, w, scale = _head_step(head, draft)
    for (p0, T), c in zip(spans, caches):
        c.ensure(p0 + T)
    out = _run(step, target.rope, next_ids.contiguous(), hidden, spans, [([c], []) for c in caches], w, scale,
               logit_rows)
    return out[0], out[1], out[2]


def draft_chain(head, hidden: torch.Tensor, next_ids: torch.Tensor, pos0: int, cache, depth: int,
                use_post: bool) -> list[int]:
    """`depth` greedy drafts in one compiled call: the pending pairs (hidden [T, H], next_ids [T]) at
    head positions pos0.., then each draft's own row, as `depth` head_rows(draft=True) calls and an
    argmax after each would make them (draft-time cache entries at pos0 + T ..)."""
    target = head.target
    step, w, scale = _head_step(head, True)
    T = hidden.shape[0]
    end = pos0 + T + depth - 1  # positions written: pos0 .. end - 1
    cache.ensure(end)
    target.rope._grow(end)
    out = step.draft_chain(next_ids.contiguous(), hidden, pos0, [cache.k, cache.v], target.rope._cos, target.rope._sin,
                           w, scale, depth, use_post)
    return out.tolist()


__all__ = ["unsupported", "target_step", "head_rows", "draft_chain", "reset"]
