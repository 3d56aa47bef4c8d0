"""Target-model parity with transformers' own classes on identical random weights (fp32), the
training entry points (autograd), and the loader's error paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_torch_common import checkpoint, hf_model, our_model, prompt

torch.set_num_threads(1)
TOL = 2e-4  # fp32; measured max abs diff ~5e-5 on logits of magnitude up to ~50


@pytest.mark.parametrize("kind", ["dense", "dense_untied", "moe", "next"])
def test_logits_parity_with_transformers(kind):
    from transformers import DynamicCache

    m, hf = our_model(kind), hf_model(kind)
    p, cont = prompt(13), prompt(5, seed=1)
    ids = torch.tensor([p + cont])
    with torch.no_grad():
        ref_full = hf(ids).logits[0]
        cache = DynamicCache(config=hf.config)
        refs = [hf(torch.tensor([p]), cache=cache, use_cache=True).logits[0, -1]]
        for t in cont:
            refs.append(hf(torch.tensor([[t]]), cache=cache, use_cache=True).logits[0, -1])
        _, _, full = m.forward_hidden(ids)
    diffs = {"parallel": (full[0] - ref_full).abs().max().item()}
    s = m.new_session()
    s.prefill(p)
    mine = [s._last_logits]
    s.last = cont[0]
    for i, t in enumerate(cont):
        mine.append(s.verify([])[0])
        s.commit(0, cont[i + 1] if i + 1 < len(cont) else 0)
    diffs["prefill+decode"] = max((a - b).abs().max().item() for a, b in zip(refs, mine))
    print(f"{kind}: max abs diff vs transformers {diffs}")
    assert max(diffs.values()) < TOL, diffs


def test_forward_hidden_returns_pre_and_post_norm():
    m = our_model("dense")
    ids = torch.tensor([prompt(9)])
    with torch.no_grad():
        post, pre, logits = m.forward_hidden(ids)
    from mtplx.backends.torch.model import rms_norm

    assert torch.equal(post, rms_norm(pre, m.norm, m.eps))
    assert torch.allclose(logits, post @ m.embed.T, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_training_entry_points_backprop(kind):
    m = our_model(kind)
    head = m.mtp
    ids = torch.tensor([prompt(11), prompt(11, seed=3)])  # B = 2
    params = list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.no_grad():
            post, pre, _ = m.forward_hidden(ids)
        logits = head.forward_train(post[:, :-1], ids[:, 1:])  # predicts x[t+2]
        assert logits.shape == (2, 10, m.cfg.vocab_size)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1))
        loss.backward()
        grads = [p.grad for p in params]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert head.fc.grad.abs().sum() > 0
        # the target's own parallel path is differentiable too (chunked GatedDeltaNet, SDPA)
        m.layers[0].mixer.in_proj.requires_grad_(True)
        _, _, lg = m.forward_hidden(ids)
        lg.float().logsumexp(-1).mean().backward()
        assert torch.isfinite(m.layers[0].mixer.in_proj.grad).all()
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        m.layers[0].mixer.in_proj.requires_grad_(False)
        m.layers[0].mixer.in_proj.grad = None
    # head params are only the head's own tensors (embedding / lm_head are borrowed)
    assert not any(n.startswith("embed") for n, _ in head.named_parameters())


def test_chunked_prefill_state_matches_recurrence():
    """Prefill (chunked GDN, > 64 tokens to cross a chunk) leaves the same state as feeding
    the prompt token by token on the exact path (up to fp32 rounding)."""
    m = our_model("dense")
    p = prompt(70)
    a = m.new_session()
    a.prefill(p)
    b = m.new_session()
    b.prefill(p[:1])
    for i in range(1, len(p)):
        b.last = p[i]
        b.verify([])
        b.commit(0, 0)
    for ca, cb in zip(a.cache.layers, b.cache.layers):
        if hasattr(ca, "state"):
            assert torch.allclose(ca.state, cb.state, atol=1e-5)
            assert torch.allclose(ca.conv.float(), cb.conv.float(), atol=1e-4)
    b.last = a.last = 7
    assert torch.allclose(a.verify([])[0], b.verify([])[0], atol=1e-4)


def test_load_from_canonical_iterator_and_dtypes():
    from mtplx.backends.torch.loader import load_torch_model
    from mtplx.checkpoint.canonical import canonical_dict

    ck = checkpoint("moe")
    m = load_torch_model(iter(canonical_dict(open_store_(ck.path), ck.config, source_norm_convention="zero_centered").items()),
                         dtype=torch.bfloat16, config=ck.config)
    assert m.embed.dtype == torch.bfloat16 and m.layers[0].input_norm.dtype == torch.float32
    assert m.layers[0].mixer.A_log.dtype == torch.float32
    ref = our_model("moe")
    assert torch.equal(m.layers[0].mlp.gate_up.float(), ref.layers[0].mlp.gate_up.to(torch.bfloat16).float())
    m16 = load_torch_model(ck.path, dtype="float16", progress=False)
    with torch.no_grad():
        lg = m16.forward_hidden(torch.tensor([prompt(6)]))[2]
    assert lg.dtype == torch.float16 and torch.isfinite(lg).all()


def open_store_(path):
    from mtplx.checkpoint.store import open_store

    return open_store(path)


def test_load_rejects_what_inspect_rejects(tmp_path):
    from mtplx.backends.torch.loader import load_torch_model
    from mtplx.checkpoint.errors import CheckpointError

    with pytest.raises(CheckpointError):
        load_torch_model(tmp_path / "nope", dtype=torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError):
        load_torch_model(tmp_path / "empty", dtype=torch.float32)


def test_load_mlx_quantized_layout(tmp_path):
    """MLX layout (norms 1 + w, switch_mlp experts, 4-bit): loads through dequantization and
    runs; the unquantized MLX layout gives the HF layout's logits."""
    from mtplx.backends.torch.loader import load_torch_model
    from mtplx.checkpoint.synthetic import write_synthetic_checkpoint

    ck = write_synthetic_checkpoint(tmp_path / "q", "qwen3.5-35b-a3b", layout="mlx", quantize=(4, 64))
    m = load_torch_model(ck.path, dtype=torch.float32, progress=False)
    ids = torch.tensor([prompt(5)])
    with torch.no_grad():
        assert torch.isfinite(m.forward_hidden(ids)[2]).all()
    plain = our_model("moe", layout="mlx")
    with torch.no_grad():
        a = plain.forward_hidden(ids)[2]
        b = our_model("moe").forward_hidden(ids)[2]
    assert torch.allclose(a, b, atol=1e-5)


def test_default_threads_small_model(monkeypatch):
    """Small CPU models default to 1 torch thread (spin-waiting OpenMP workers on a loaded
    machine cost 10x); MTPLX_THREADS overrides, OMP_NUM_THREADS leaves torch's choice."""
    from mtplx.backends.torch.loader import default_threads
    from test_torch_common import our_model

    m = our_model("dense")
    monkeypatch.delenv("MTPLX_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads(m) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert default_threads(m) is None
    monkeypatch.setenv("MTPLX_THREADS", "3")
    assert default_threads(m) == 3
