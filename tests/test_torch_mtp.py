"""The MTP head against a plain step-by-step reference written from the formula:

    e = norm_emb(embed(x[t+1])); hh = norm_hid(h[t]); u = fc([e, hh]);
    u = full-attention decoder layer(u, position t, cache of earlier pairs); logits = lm_head(norm(u))

The reference below re-implements the decoder layer with plain tensor ops (no module code)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtplx.decoding.params import SamplingParams
from test_torch_common import our_model, prompt

torch.set_num_threads(1)


def rms(x, w, eps=1e-6):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def ref_layer(L, cfg, u, t, past):
    """One full-attention decoder layer for one row u [H] at position t; past: list of (k, v)."""
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rot = cfg.rotary_dim
    W = L.mixer.qkv.double()
    x = rms(u, L.input_norm)
    y = W @ x
    q = y[: nh * 2 * hd].reshape(nh, 2 * hd)
    q, gate = q[:, :hd], q[:, hd:].reshape(-1)
    k = y[nh * 2 * hd: nh * 2 * hd + nkv * hd].reshape(nkv, hd)
    v = y[nh * 2 * hd + nkv * hd:].reshape(nkv, hd)
    q, k = rms(q, L.mixer.q_norm), rms(k, L.mixer.k_norm)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    ang = torch.cat([t * inv, t * inv])

    def rope(a):
        r, p = a[:, :rot], a[:, rot:]
        rh = torch.cat([-r[:, rot // 2:], r[:, : rot // 2]], -1)
        return torch.cat([r * ang.cos() + rh * ang.sin(), p], -1)

    q, k = rope(q), rope(k)
    past.append((k, v))
    K = torch.stack([a for a, _ in past], 1)  # [nkv, S, hd]
    V = torch.stack([b for _, b in past], 1)
    o = []
    for h in range(nh):
        g = h // (nh // nkv)
        s = (K[g] @ q[h]) * hd ** -0.5
        o.append(torch.softmax(s, -1) @ V[g])
    o = torch.cat(o) * torch.sigmoid(gate)
    u = u.double() + L.mixer.o_proj.double() @ o
    x = rms(u, L.post_norm)
    mlp = L.mlp
    if hasattr(mlp, "router"):
        p = torch.softmax(mlp.router.double() @ x, -1)
        w, idx = torch.topk(p, mlp.top_k)
        w = w / w.sum()
        out = torch.zeros_like(x)
        for wi, e in zip(w, idx):
            gu = mlp.gate_up[e].double() @ x
            out += wi * (mlp.down[e].double() @ (F.silu(gu[: mlp.I]) * gu[mlp.I:]))
        gu = mlp.shared.gate_up.double() @ x
        sh = mlp.shared.down.double() @ (F.silu(gu[: mlp.shared.I]) * gu[mlp.shared.I:])
        out += torch.sigmoid(mlp.shared_gate.double() @ x) * sh
    else:
        gu = mlp.gate_up.double() @ x
        out = mlp.down.double() @ (F.silu(gu[: mlp.I]) * gu[mlp.I:])
    return u + out


def ref_head(m, hidden, next_ids):
    """hidden [T, H] (h[0..T-1]), next_ids [T] (x[1..T]) -> logits [T, V] (float64), step by step."""
    head, cfg = m.mtp, m.cfg
    past, out = [], []
    for t in range(hidden.shape[0]):
        e = rms(m.embed[next_ids[t]], head.norm_emb)
        hh = rms(hidden[t], head.norm_hid)
        u = head.fc.double() @ torch.cat([e, hh])
        u = ref_layer(head.layers[0], cfg, u, t, past)
        out.append(m.embed.double() @ rms(u, head.norm) if m.lm_head is None else m.lm_head.double() @ rms(u, head.norm))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["dense", "dense_untied", "moe"])
def test_head_forward_matches_formula(kind):
    m = our_model(kind)
    ids = prompt(10, seed=31)
    with torch.no_grad():
        post, _, _ = m.forward_hidden(torch.tensor([ids]))
        ref = ref_head(m, post[0, :-1], torch.tensor(ids[1:]))
        train = m.mtp.forward_train(post[:, :-1], torch.tensor([ids[1:]]))[0]
    assert torch.allclose(train.double(), ref, atol=1e-4), (train.double() - ref).abs().max()
    # inference path: cached rows, fed in pieces, gives the same logits
    from mtplx.backends.torch.cache import AttnCache

    cfg = m.cfg
    c = AttnCache(cfg.num_key_value_heads, cfg.head_dim, m.dtype, m.device, 64)
    with torch.no_grad():
        a = m.mtp.rows(post[0, :4], torch.tensor(ids[1:5]), 0, c)[2]
        b = m.mtp.rows(post[0, 4:9], torch.tensor(ids[5:10]), 4, c)[2]
    assert torch.allclose(torch.cat([a, b]).double(), ref, atol=1e-4)


def test_session_drafts_follow_formula():
    """draft(D) after a prefill and a few verify/commit cycles: the first draft comes from the
    verified hiddens (head cache rebuilt), later drafts feed the head's own post-norm output."""
    m = our_model("dense")
    assert m.mtp.set_draft_lm_head("full") == "full"  # the reference drafts with exact logits
    try:
        _check_session_drafts(m)
    finally:
        m.mtp.set_draft_lm_head("auto")


def _check_session_drafts(m):
    greedy = SamplingParams()
    p = prompt(8, seed=41)
    s = m.new_session()
    rng = s.make_rng(0)
    s.prefill(p)
    toks = p + [s.sample_first(greedy, rng)]
    for _ in range(3):  # a few cycles with a partial commit
        d, q = s.draft(3, greedy, rng)
        rows = s.verify(d)
        s.commit(1, int(rows[1].argmax()))
        toks += [d[0], s.last]
    d, _ = s.draft(3, greedy, rng)
    # reference: target hiddens of every committed position, then the head step by step
    with torch.no_grad():
        post = m.forward_hidden(torch.tensor([toks]))[0][0]
        ref = ref_head(m, post, torch.tensor(toks[1:] + [0]))  # last row: pair (h[-2], last)
    lg = ref[len(toks) - 2]
    assert d[0] == int(lg.argmax())
    # deeper drafts: recompute with the head output as the hidden
    head = m.mtp
    past = []
    with torch.no_grad():
        for t in range(len(toks) - 1):
            e = rms(m.embed[toks[t + 1]], head.norm_emb)
            u = head.fc.double() @ torch.cat([e, rms(post[t], head.norm_hid)])
            u = ref_layer(head.layers[0], m.cfg, u, t, past)
        g = rms(u, head.norm)
        for j in range(1, 3):
            e = rms(m.embed[d[j - 1]], head.norm_emb)
            u = head.fc.double() @ torch.cat([e, rms(g, head.norm_hid)])
            u = ref_layer(head.layers[0], m.cfg, u, len(toks) - 2 + j, past)
            g = rms(u, head.norm)
            assert d[j] == int((m.embed.double() @ g).argmax())


def test_hidden_source_pre_differs_and_is_selectable():
    m = our_model("dense")
    s_post, s_pre = m.new_session(), m.new_session(hidden_source="pre")
    greedy = SamplingParams()
    p = prompt(8, seed=51)
    for s in (s_post, s_pre):
        s.prefill(p)
        s.sample_first(greedy, s.make_rng(0))
    assert s_pre.hidden_source == "pre"
    a = s_post._pend_h[0]
    b = s_pre._pend_h[0]
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError):
        m.new_session(hidden_source="middle")


@pytest.mark.parametrize("kind", ["dense", "moe", "next"])
def test_few_rows_drafting_path_matches_parallel_path(kind, monkeypatch):
    """The lean drafting path (one row: only the picked experts; a few rows: fused dense MoE)
    computes the same function as the parallel path, row by row and in small groups."""
    from mtplx.backends.torch import mtp as mtp_mod
    from mtplx.backends.torch.cache import AttnCache

    m = our_model(kind)
    cfg = m.cfg
    ids = prompt(12, seed=61)
    with torch.no_grad():
        post = m.forward_hidden(torch.tensor([ids]))[0][0]
    outs = {}
    for few_max in (0, mtp_mod.FEW_ROWS_MAX):
        monkeypatch.setattr(mtp_mod, "FEW_ROWS_MAX", few_max)
        c = AttnCache(cfg.num_key_value_heads, cfg.head_dim, m.dtype, m.device, 64)
        rows, pos = [], 0
        with torch.inference_mode():
            for n in (5, 1, 1, 3, 1):  # prompt pairs, then drafting-sized groups
                rows.append(m.mtp.rows(post[pos:pos + n], torch.tensor(ids[pos + 1:pos + n + 1]), pos, c))
                pos += n
        outs[few_max] = [torch.cat(x) for x in zip(*rows)]  # g, u, logits over the 11 pairs
    for a, b in zip(outs[0], outs[mtp_mod.FEW_ROWS_MAX]):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-5), (a - b).abs().max()


def test_int8_draft_lm_head_tracks_full_precision():
    """The int8 draft lm_head ("auto" on CPU) drafts nearly the same tokens as full precision;
    a bad mode is refused; greedy MTP output is depth 0's whatever the draft precision."""
    from mtplx.decoding.loop import generate_steps

    m = our_model("moe")
    assert m.mtp.set_draft_lm_head("auto") == "int8" and m.mtp.draft_lm_head == "int8"
    g = torch.randn(256, m.cfg.hidden_size) * 3
    with torch.no_grad():
        full = m.logits(g)
        q8 = m.mtp._draft_logits(g)
    agree = (full.argmax(-1) == q8.argmax(-1)).float().mean().item()
    assert agree > 0.95, agree
    assert (full - q8).abs().max() < 0.05 * full.abs().max()
    with pytest.raises(ValueError, match="draft_lm_head"):
        m.mtp.set_draft_lm_head("fp4")
    ids = prompt(12, seed=71)
    outs = {}
    try:
        for mode in ("full", "int8"):
            m.mtp.set_draft_lm_head(mode)
            for depth in (0, 3):
                steps = generate_steps(m.new_session(), ids, SamplingParams(max_tokens=24, ignore_eos=True), depth)
                outs[mode, depth] = [st.token_id for st in steps]
    finally:
        m.mtp.set_draft_lm_head("auto")
    assert outs["full", 3] == outs["full", 0] == outs["int8", 3] == outs["int8", 0]


def test_adaptive_draft_length_keeps_greedy_output():
    """draft_cutoff stops doubtful drafting paths early: fewer drafts reach the deep positions,
    and greedy output stays exactly depth 0's."""
    from mtplx.decoding.loop import generate_steps

    m = our_model("moe")
    ids = prompt(12, seed=81)
    runs = {}
    for depth, cutoff in ((0, 0.0), (4, 0.0), (4, 0.5)):
        steps = list(generate_steps(m.new_session(), ids, SamplingParams(max_tokens=32, ignore_eos=True,
                                                                          draft_cutoff=cutoff), depth))
        runs[depth, cutoff] = ([st.token_id for st in steps], steps[-1].stats)
    assert runs[4, 0.5][0] == runs[4, 0.0][0] == runs[0, 0.0][0]
    full, cut = runs[4, 0.0][1], runs[4, 0.5][1]
    assert sum(cut.drafted) < sum(full.drafted)
    with pytest.raises(ValueError, match="draft_cutoff"):
        SamplingParams(draft_cutoff=1.5).validate()
