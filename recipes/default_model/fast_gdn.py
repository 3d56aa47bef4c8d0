"""A faster CPU training path for transformers' chunked GatedDeltaNet (same math).

transformers' torch fallback `torch_chunk_gated_delta_rule` solves the chunk's unit lower
triangular system with `torch.linalg.solve_triangular`, which is very slow on CPU for many
small batched systems (~170 ms per call at our shapes, forward and backward). Here the
inverse of L = I + N (N strictly lower, nilpotent: N^C = 0) is built by repeated squaring,
L^-1 = (I - N)(I + N^2)(I + N^4)..., a handful of batched matmuls, differentiable. Everything
else is the reference algorithm. `install()` swaps it (and `grouped_experts_forward`) into the
transformers module; both match the reference to float rounding (checked by `python fast_gdn.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _l2norm(x, dim=-1, eps=1e-6):
    return x * torch.rsqrt((x * x).sum(dim=dim, keepdim=True) + eps)


def fast_chunk_gated_delta_rule(query, key, value, g, beta, chunk_size: int = 32, initial_state=None,
                                output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                                **kwargs):
    initial_dtype = query.dtype
    B, T, nk, dk = key.shape
    nv, dv = value.shape[-2:]
    if nk != nv:
        query = query.repeat_interleave(nv // nk, dim=2)
        key = key.repeat_interleave(nv // nk, dim=2)
    query, key, value, beta, decay = [x.transpose(1, 2).to(torch.float32).contiguous()
                                      for x in (query, key, value, beta, g)]
    if use_qk_l2norm_in_kernel:
        query = _l2norm(query)
        key = _l2norm(key)
    query = query * dk ** -0.5
    C = chunk_size
    pad = (C - T % C) % C
    query, key, value = (F.pad(x, (0, 0, 0, pad)) for x in (query, key, value))
    beta, decay = (F.pad(x, (0, pad)) for x in (beta, decay))
    v_beta = value * beta.unsqueeze(-1)
    k_beta = key * beta.unsqueeze(-1)
    query, key, k_beta, v_beta = [x.reshape(B, nv, -1, C, x.shape[-1]) for x in (query, key, k_beta, v_beta)]
    decay = decay.reshape(B, nv, -1, C)
    n_chunks = decay.shape[2]
    upper = torch.ones(C, C, dtype=torch.bool, device=query.device).triu(1)
    strict_lower = torch.ones(C, C, dtype=torch.bool, device=query.device).tril(-1)
    cum = decay.cumsum(dim=3)
    pair = (cum.unsqueeze(4) - cum.unsqueeze(3)).masked_fill(upper, float("-inf")).exp()
    ut = (k_beta @ key.transpose(-1, -2)) * pair
    intra = (query @ key.transpose(-1, -2)) * pair
    decayed_k_beta = k_beta * cum.exp().unsqueeze(-1)
    # (I + N)^-1 with N the strictly lower part of ut, by squaring: prod_j (I + (-N)^(2^j))
    eye = torch.eye(C, dtype=ut.dtype, device=ut.device)
    P = -(ut * strict_lower)
    inv = eye + P
    k = 2
    while k < C:
        P = P @ P
        inv = inv + inv @ P
        k *= 2
    new_values = inv @ v_beta
    k_cumdecay = inv @ decayed_k_beta
    state = (torch.zeros(B, nv, dk, dv, dtype=new_values.dtype, device=new_values.device)
             if initial_state is None else initial_state.to(new_values))
    query = query * cum.exp().unsqueeze(-1)
    key = key * (cum[..., -1:] - cum).exp().unsqueeze(-1)
    chunk_decay = cum[..., -1].exp()[..., None, None]
    outs = []
    for i in range(n_chunks):
        v_new = new_values[:, :, i] - k_cumdecay[:, :, i] @ state
        outs.append(query[:, :, i] @ state + intra[:, :, i] @ v_new)
        state = state * chunk_decay[:, :, i] + key[:, :, i].transpose(-1, -2) @ v_new
    out = torch.stack(outs, dim=2).reshape(B, nv, -1, dv)[:, :, :T]
    out = out.transpose(1, 2).contiguous().to(initial_dtype)
    return out, (state if output_final_state else None)


def dense_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Qwen3_5MoeExperts.forward computed for all experts at once (batched matmuls, no
    gather/scatter loop), weighted by the same renormalised top-k weights (zero elsewhere).
    Same function as the per-expert loop; several times cheaper on a CPU for small experts."""
    # hidden_states [N, H]; top_k_index [N, k]; top_k_weights [N, k]
    E = self.num_experts
    w = torch.zeros(hidden_states.shape[0], E, dtype=top_k_weights.dtype, device=hidden_states.device)
    w = w.scatter(1, top_k_index, top_k_weights)                      # [N, E]
    gu = torch.einsum("nh,eih->eni", hidden_states, self.gate_up_proj)  # [E, N, 2I]
    gate, up = gu.chunk(2, dim=-1)
    act = self.act_fn(gate) * up                                      # [E, N, I]
    out = torch.einsum("eni,ehi->enh", act, self.down_proj)           # [E, N, H]
    return torch.einsum("enh,ne->nh", out, w.to(out.dtype))


def grouped_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Qwen3_5MoeExperts.forward with the routed tokens grouped by expert: one pair of matmuls
    per expert over its contiguous slice, then a weighted scatter-add back. Same function as
    the reference loop, k/E of the dense cost."""
    # hidden_states [N, H]; top_k_index [N, k]; top_k_weights [N, k]
    n_tokens, k = top_k_index.shape
    flat_expert = top_k_index.reshape(-1)                              # [N*k]
    order = flat_expert.argsort(stable=True)
    token = order // k                                                 # [N*k] source row
    counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
    x = hidden_states.index_select(0, token)                           # [N*k, H]
    outs, start = [], 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        gate, up = (x[start:start + c] @ self.gate_up_proj[e].t()).chunk(2, dim=-1)
        outs.append((self.act_fn(gate) * up) @ self.down_proj[e].t())  # [c, H]
        start += c
    y = torch.cat(outs) * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(hidden_states.dtype)
    return torch.zeros_like(hidden_states).index_add_(0, token, y)


def install() -> None:
    """Swap the faster training paths into transformers' Qwen3.5-MoE module."""
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as m

    m.torch_chunk_gated_delta_rule = fast_chunk_gated_delta_rule
    m.Qwen3_5MoeExperts.forward = grouped_experts_forward


if __name__ == "__main__":
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as m

    torch.manual_seed(0)
    B, T, nk, nv, d = 2, 150, 2, 4, 32
    q, k = torch.randn(B, T, nk, d), torch.randn(B, T, nk, d)
    v = torch.randn(B, T, nv, d)
    g = -torch.rand(B, T, nv)
    b = torch.rand(B, T, nv)
    ref, rs = m.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=b, output_final_state=True,
                                             use_qk_l2norm_in_kernel=True)
    out, s = fast_chunk_gated_delta_rule(q, k, v, g=g, beta=b, output_final_state=True,
                                         use_qk_l2norm_in_kernel=True)
    print("gated delta rule: max |out - ref|", (out - ref).abs().max().item(), "state", (s - rs).abs().max().item())

    import trunk  # the experts block of the default model's config, against transformers' own loop

    experts = m.Qwen3_5MoeExperts(trunk.hf_config())
    torch.nn.init.normal_(experts.gate_up_proj, std=0.05)
    torch.nn.init.normal_(experts.down_proj, std=0.05)
    x = torch.randn(300, experts.gate_up_proj.shape[-1])
    idx = torch.stack([torch.randperm(experts.num_experts)[:2] for _ in range(300)])
    w = torch.rand(300, 2)
    ref = m.Qwen3_5MoeExperts.forward(experts, x, idx, w)
    print("grouped experts: max |out - ref|", (grouped_experts_forward(experts, x, idx, w) - ref).abs().max().item())
