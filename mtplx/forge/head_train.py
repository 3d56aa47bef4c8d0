"""Depth-aware teacher-forced forward of an MTP head, the self-distillation loss, and
teacher-forced acceptance.

Notation (docs/architecture.md): h[t] is the target's hidden at position t (after the final
norm by default), L[t] its logits (they predict x[t+1]). The head's depth-1 draft from
(h[t], x[t+1]) at RoPE position t predicts x[t+2], so its teacher is softmax(L[t+1]).

At inference the head drafts a chain from the last verified position t:
    depth 1: (h[t], x[t+1])  at position t      -> d1   (teacher L[t+1])
    depth k: (g_{k-1}, d_{k-1}) at position t+k-1 -> dk (teacher L[t+k])
where g is the head's own output after mtp.norm and d the token it just drafted (greedy). The
head's KV cache holds the depth-1 entries of every verified position <= t, plus the chain's own
entries. `chain_forward` reproduces that for every start t of a sequence at once:
stream k (the depth-k drafts of all starts) attends causally to the depth-1 stream's keys
(positions <= t) and to the keys of streams 2..k of the SAME start (a diagonal), so training
sees what drafting sees. Gradients flow through the recursion (through g, not through the
argmax tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtplx.backends.torch.model import PLAIN, rms_norm


def _layer_multi(layer, rope, xs: list[torch.Tensor], positions: list[torch.Tensor]) -> torch.Tensor:
    """The head's full-attention decoder layer on the LAST stream of xs (each [B, n, H], at
    positions[k] [n]): it attends to stream 0 causally and to streams 1..last diagonally."""
    attn = layer.mixer
    nh, nkv, hd = attn.nh, attn.nkv, attn.hd
    rep = nh // nkv
    projs = []
    for x, pos in zip(xs, positions):
        h = rms_norm(x, layer.input_norm, layer.eps)
        q, k, v, gate = attn._project(h, rope, pos, PLAIN)  # q [B,n,nh,hd] k/v [B,n,nkv,hd]
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
        projs.append((q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), gate))  # [B,nh,n,hd]
    q0, k0, v0, _ = projs[0]
    n = q0.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q0.device).tril()
    j = len(xs) - 1
    x, (q, _k, _v, gate) = xs[j], projs[j]
    s0 = (q @ k0.transpose(-1, -2)) * attn.scale  # [B, nh, n, n]
    s0 = s0.masked_fill(~causal, float("-inf"))
    diag = [((q * projs[i][1]).sum(-1) * attn.scale)[..., None] for i in range(1, j + 1)]  # [B,nh,n,1]
    s = torch.cat([s0] + diag, dim=-1).float()
    p = torch.softmax(s, dim=-1).to(q.dtype)
    o = p[..., :n] @ v0
    for i in range(1, j + 1):
        o = o + p[..., n + i - 1:n + i] * projs[i][2]
    B = o.shape[0]
    o = o.transpose(1, 2).reshape(B, n, nh * hd)
    y = x + attn._out(o, gate, PLAIN)
    hpost = rms_norm(y, layer.post_norm, layer.eps)
    return y + layer.mlp(hpost.reshape(-1, hpost.shape[-1])).reshape(hpost.shape)


def chain_forward(model, hidden: torch.Tensor, ids: torch.Tensor, depth: int,
                  tokens: str = "draft") -> list[torch.Tensor]:
    """hidden [B, T, H] = h[0..T-1] of the frozen target, ids [B, T] = x[0..T-1].
    Returns logits per depth: out[k-1] [B, T-1, V], row t = the depth-k draft of start t
    (predicts x[t+k+1]; rows with t + k > T - 1 have no teacher and are ignored by callers).

    Depth k > 1 always takes the head's own output g as its hidden. Its token is, with
    tokens="draft", the token the head drafted one depth earlier (exactly inference); with
    tokens="text", the text token x[t+k] — the token the target's teacher L[t+k] is conditioned
    on. Training uses "text": on real text the draft often differs from x[t+k], and a draft
    token paired with a teacher computed after another token is a contradictory target; at
    inference a deeper draft only counts when the shallower ones were accepted, i.e. when the
    token IS the target's own choice, which is the case "text" trains for whenever the target's
    choice matches the text."""
    head = model.mtp
    B, T = ids.shape
    n = T - 1
    pos0 = torch.arange(n, device=ids.device)
    xs, positions, logits = [], [], []
    cur_hidden, cur_tok = hidden[:, :n], ids[:, 1:]
    for k in range(depth):
        xs.append(head._fc_in(cur_hidden, cur_tok))
        positions.append(pos0 + k)
        u = _layer_multi(head.layers[0], model.rope, xs, positions)
        g = rms_norm(u, head.norm, head.eps)
        lg = model.logits(g)
        logits.append(lg)
        if k + 1 < depth:
            cur_hidden = g if getattr(model, "mtp_hidden", "post") == "post" else u
            if tokens == "text":
                nxt = ids[:, k + 2:]
                cur_tok = torch.cat([nxt, nxt.new_zeros(B, n - nxt.shape[1])], dim=1)
            else:
                cur_tok = lg.detach().argmax(-1)
    return logits


def distill_loss(logits: list[torch.Tensor], teacher: torch.Tensor, weights: list[float]) -> tuple[torch.Tensor, list[float]]:
    """KL(target || head) per depth. teacher [B, T, V] = L[0..T-1]; logits[k-1] [B, T-1, V]
    (row t teaches with L[t+k]). Returns (weighted sum, per-depth KL values)."""
    T = teacher.shape[1]
    total = teacher.new_zeros(())
    per = []
    for k, lg in enumerate(logits, start=1):
        m = T - k  # starts t = 0 .. T-1-k
        if m <= 0:
            break
        p_log = F.log_softmax(teacher[:, k:k + m].float(), dim=-1)
        q_log = F.log_softmax(lg[:, :m].float(), dim=-1)
        kl = (p_log.exp() * (p_log - q_log)).sum(-1).mean()
        total = total + weights[k - 1] * kl
        per.append(float(kl.detach()))
    return total, per


@torch.no_grad()
def acceptance_counts(logits: list[torch.Tensor], teacher: torch.Tensor, ids: torch.Tensor) -> tuple[list[int], list[int]]:
    """Greedy teacher-forced acceptance of drafted chains (logits from tokens="draft").
    The depth-k draft of start t is accepted when it equals the target's argmax L[t+k] and the
    depth k-1 draft was accepted. The teacher L[t+k] is conditioned on the text, so depth k is
    only judged where the text agrees with the drafts before it (x[t+j+1] == d_j, j < k): there
    the prefix the target saw is the drafted one, as in greedy decoding.
    Returns (accepted counts per depth, eligible counts per depth)."""
    D = len(logits)
    T = teacher.shape[1]
    m = T - D
    tgt = teacher.argmax(-1)  # [B, T]
    ok = torch.ones(teacher.shape[0], m, dtype=torch.bool, device=teacher.device)
    acc, elig = [], []
    for k, lg in enumerate(logits, start=1):
        d = lg[:, :m].argmax(-1)
        elig.append(int(ok.sum()))
        ok = ok & (d == tgt[:, k:k + m])
        acc.append(int(ok.sum()))
        if k < D:
            ok = ok & (ids[:, k + 1:k + 1 + m] == d)
    return acc, elig


def acceptance_rates(accepted: list[int], eligible: list[int]) -> dict:
    """Conditional acceptance per depth (P(depth k accepted | depth k-1 accepted)), the
    cumulative rates (their running product) and the expected tokens per verify at each depth D
    (1 + sum of cumulative rates)."""
    cond = [a / e if e else 0.0 for a, e in zip(accepted, eligible)]
    cum, c = [], 1.0
    for x in cond:
        c *= x
        cum.append(c)
    tpv = [1.0 + sum(cum[:d]) for d in range(1, len(cum) + 1)]
    return {"by_depth": [round(x, 4) for x in cond], "cumulative": [round(x, 4) for x in cum],
            "tokens_per_verify": [round(x, 3) for x in tpv], "positions": eligible[0] if eligible else 0}
