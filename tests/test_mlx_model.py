"""MLX backend: loading and logits parity.

- logits parity with the torch backend (itself tested against transformers) on the same
  synthetic checkpoint, fp32, dense / MoE / Qwen3-Next, parallel and exact paths;
- norm conventions: the same weights stored zero-centred (HF) and as 1 + w (MLX) give the same
  logits (canonical norms are multipliers, never shifted twice);
- the MTP head's experts: per-expert and fused HF inputs give identical stacked switch_mlp
  tensors and identical head logits; an MLX switch_mlp head too;
- MLX-quantized trunks load into mlx-lm's quantized modules and match a dequantized reference.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx.core")  # the suite passes without mlx
pytest.importorskip("mlx_lm")

from test_mlx_common import arr, checkpoint, mlx_model, mx, prompt

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

TOL = 2e-4  # fp32, different kernels and reduction orders (measured: ~3e-5 on logits ~40)


def torch_model(kind, layout="hf", head="embedded", head_layout=None, quantize=None):
    from mtplx.backends.torch.loader import load_torch_model

    ck = checkpoint(kind, layout, head, head_layout, quantize)
    return load_torch_model(ck.path, dtype=torch.float32, progress=False)


@pytest.mark.parametrize("kind", ["dense", "moe", "next"])
def test_logits_parity_with_torch(kind):
    m, t = mlx_model(kind), torch_model(kind)
    ids = prompt(11, seed=1)
    got = arr(m(mx.array([ids]))[0])
    with torch.no_grad():
        ref = t(torch.tensor([ids]))[0].numpy()
    diff = np.abs(got - ref).max()
    print(f"\n{kind}: max |mlx - torch| logits = {diff:.2e} (max |logit| {np.abs(ref).max():.1f})")
    assert diff < TOL * max(1.0, np.abs(ref).max())
    # exact path (prefill 6, verify 5) against the same reference rows
    s = m.new_session()
    s.prefill(ids[:6])
    s.last = ids[6]
    rows = arr(s.verify(ids[7:11]))
    assert np.abs(rows - ref[6:11]).max() < TOL * max(1.0, np.abs(ref).max())
    # the MTP head: teacher-forced head logits against the torch head
    hp, _ = m.forward_hidden(mx.array([ids]))
    from mlx_lm.models.cache import KVCache

    _, _, hl = m.head.rows(m, hp[0, :-1], mx.array(ids[1:]), KVCache())
    with torch.no_grad():
        post, _, _ = t.forward_hidden(torch.tensor([ids]))
        tl = t.mtp.forward_train(post[:, :-1], torch.tensor([ids[1:]]))[0].numpy()
    hdiff = np.abs(arr(hl) - tl).max()
    print(f"{kind}: max |mlx - torch| head logits = {hdiff:.2e}")
    assert hdiff < TOL * max(1.0, np.abs(tl).max())


def test_norm_convention_never_shifted_twice():
    """HF files store zero-centred w, MLX files 1 + w: both load to the same multipliers."""
    a = mlx_model("dense", layout="hf")
    b = mlx_model("dense", layout="mlx")
    wa = arr(a.model.layers[0].input_layernorm.weight)
    wb = arr(b.model.layers[0].input_layernorm.weight)
    assert np.allclose(wa, wb) and abs(float(wa.mean()) - 1.0) < 0.1  # multipliers near 1, not near 0 or 2
    assert np.allclose(arr(a.head.pre_fc_norm_hidden.weight), arr(b.head.pre_fc_norm_hidden.weight))
    ids = prompt(7, seed=2)
    la, lb = arr(a(mx.array([ids]))), arr(b(mx.array([ids])))
    assert np.abs(la - lb).max() < 1e-4


def test_head_expert_stacking_per_expert_and_fused():
    """The MoE head's experts: per-expert 2-D (HF release) and fused 3-D inputs, same weights ->
    identical switch_mlp tensors and identical logits; an MLX sidecar (switch_mlp) head too."""
    per = mlx_model("moe", layout="hf_fused", head_layout="hf")
    fused = mlx_model("moe", layout="hf_fused", head_layout="hf_fused")
    mlxh = mlx_model("moe", layout="hf_fused", head="mlx_sidecar")  # qwen3_5_mtp folder, switch_mlp, 1 + w
    for proj in ("gate_proj", "up_proj", "down_proj"):
        w = arr(getattr(per.head.layers[0].mlp.switch_mlp, proj).weight)
        assert np.array_equal(w, arr(getattr(fused.head.layers[0].mlp.switch_mlp, proj).weight))
        assert np.array_equal(w, arr(getattr(mlxh.head.layers[0].mlp.switch_mlp, proj).weight))
        assert w.shape[0] == per.cfg.num_experts
    ck = checkpoint("moe", "hf_fused", "embedded", "hf")
    assert np.array_equal(arr(per.head.layers[0].mlp.switch_mlp.gate_proj.weight),
                          ck.canonical["mtp.layers.0.mlp.experts.gate_proj"])
    from mlx_lm.models.cache import KVCache

    ids = prompt(6, seed=3)
    h, _ = per.forward_hidden(mx.array([ids]))
    outs = [arr(m.head.rows(m, h[0, :-1], mx.array(ids[1:]), KVCache())[2]) for m in (per, fused, mlxh)]
    assert np.array_equal(outs[0], outs[1]) and np.allclose(outs[0], outs[2], atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_moe_trunk_loads_into_quantized_modules(bits):
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    m = mlx_model("moe", layout="mlx", quantize=(bits, 64))
    layer = m.model.layers[0]
    assert isinstance(layer.mlp.switch_mlp.gate_proj, QuantizedSwitchLinear)
    assert layer.mlp.switch_mlp.gate_proj.bits == bits
    assert isinstance(layer.linear_attn.in_proj_qkv, mx.nn.QuantizedLinear) if hasattr(mx, "nn") else True
    import mlx.nn as nn

    assert isinstance(layer.linear_attn.in_proj_qkv, nn.QuantizedLinear)
    assert layer.mlp.gate.bits == 8  # the router override (8-bit) read off the shapes
    assert isinstance(m.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(m.head.fc, nn.QuantizedLinear)  # quantized head
    # against the torch backend, which dequantizes the same files
    t = torch_model("moe", layout="mlx", quantize=(bits, 64))
    ids = prompt(9, seed=4)
    got = arr(m(mx.array([ids]))[0])
    with torch.no_grad():
        ref = t(torch.tensor([ids]))[0].numpy()
    diff = np.abs(got - ref).max()
    print(f"\nmoe {bits}-bit: max |mlx - torch(dequantized)| = {diff:.2e}")
    assert diff < 1e-3 * max(1.0, np.abs(ref).max())


def test_sidecar_head_and_missing_tensors(tmp_path):
    """A qwen3_5_mtp sidecar folder (4-bit, switch_mlp, 1 + w norms) on an HF trunk."""
    m = mlx_model("moe", layout="hf_fused", head="mlx_sidecar", quantize=(4, 64))
    assert m.head is not None
    from mtplx.backends.mlx import load_mlx_model
    from mtplx.checkpoint.errors import CheckpointError

    ck = checkpoint("dense")
    items = [(k, v) for k, v in ck.canonical.items() if k != "layers.1.linear_attn.A_log"]
    with pytest.raises(CheckpointError, match="does not provide"):
        load_mlx_model(iter(items), config=ck.config)
    nohead = load_mlx_model(ck.path, include_mtp=False)
    assert nohead.head is None
