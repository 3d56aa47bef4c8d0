"""MLX-affine quantized trunks on the torch backend: 4/8-bit, group sizes 32/64/128, per-module
overrides (the writer quantizes routers 8-bit g64 whatever the default), dequantized at load.

- every quantized module lands in the model as exactly `mtplx.checkpoint.quant.dequantize` of
  its file tensors, with bits and group size read per module;
- an 8-bit trunk's logits stay close to the bf16 trunk's (KL printed, `-s` shows it);
- greedy MTP == depth 0 on a quantized model.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mtplx.checkpoint.quant import dequantize
from mtplx.checkpoint.synthetic import preset_config, write_synthetic_checkpoint
from mtplx.decoding.loop import generate_steps
from mtplx.decoding.params import SamplingParams

torch.set_num_threads(1)
_TMP = Path(tempfile.mkdtemp(prefix="mtplx_quant_tests_"))
# hidden 128 so that group size 128 applies to the H-input linears; expert/shared width 64
CFG = preset_config("qwen3.5-35b-a3b", hidden_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64)


@functools.lru_cache(maxsize=None)
def ck(quant: tuple[int, int] | None, dtype: str = "bfloat16"):
    d = _TMP / f"q-{quant}-{dtype}"
    return write_synthetic_checkpoint(d, CFG, layout="mlx", head="embedded", quantize=quant, dtype=dtype, seed=1)


@functools.lru_cache(maxsize=None)
def model(quant, load_dtype=torch.float32):
    from mtplx.backends.torch.loader import load_torch_model

    return load_torch_model(ck(quant).path, dtype=load_dtype, progress=False)


@pytest.mark.parametrize("bits,gs", [(4, 32), (4, 64), (4, 128), (8, 64), (8, 128)])
def test_quantized_modules_dequantize_exactly(bits, gs):
    from mtplx.backends.torch.loader import _slot

    c = ck((bits, gs))
    m = model((bits, gs))
    q = c.config.quantization
    seen = {"router_override": 0, "default": 0}
    for name, scales in c.canonical.items():
        if not name.endswith(".scales"):
            continue
        mod = name[: -len(".scales")]
        w, b = c.canonical[mod + ".weight"], c.canonical[mod + ".biases"]
        tgt = mod if mod.split(".")[-1] in ("gate_proj", "up_proj", "down_proj") and ".experts." in mod else mod + ".weight"
        K = _slot(m, tgt).shape[-1]
        g = K // scales.shape[-1]
        nb = w.shape[-1] * 32 // K
        ref = dequantize(np.asarray(w), np.asarray(scales), np.asarray(b), g, nb, dtype=np.float32)
        got = _slot(m, tgt).detach().numpy()
        assert np.array_equal(got, ref), tgt
        seen["router_override" if (nb, g) != (bits, gs) else "default"] += 1
    assert seen["default"] > 10
    if (bits, gs) != (8, 64):  # routers and shared-expert gates: 8-bit g64 overrides, read per module
        assert seen["router_override"] >= 4
    assert q.bits == bits and q.group_size == gs and q.overrides


def _kl(p_logits, q_logits):
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def test_8bit_trunk_logits_close_to_bf16(capsys):
    ids = torch.tensor([[int(x) for x in np.random.default_rng(0).integers(3, 512, 48)]])
    with torch.no_grad():
        ref = model(None).forward_hidden(ids)[2][0]
        kl8 = _kl(ref, model((8, 64)).forward_hidden(ids)[2][0])
        kl4 = _kl(ref, model((4, 64)).forward_hidden(ids)[2][0])
        top8 = (ref.argmax(-1) == model((8, 64)).forward_hidden(ids)[2][0].argmax(-1)).float().mean()
    with capsys.disabled():
        print(f"\nKL(bf16 || mlx-8bit-g64) mean {kl8.mean():.2e} max {kl8.max():.2e}, top-1 agreement {top8:.3f}; "
              f"KL(bf16 || mlx-4bit-g64) mean {kl4.mean():.2e}")
    # Weights: 8-bit g64 leaves ~0.7% relative error per matrix (4-bit ~11%). A random 4-layer MoE
    # amplifies it ~17x by the last hidden (router top-k flips), so the bounds are loose; the
    # ratio is the robust part: every extra bit quarters the KL.
    assert kl8.mean() < 2e-2 and kl8.max() < 0.2
    assert kl4.mean() > 10 * kl8.mean()
    assert top8 > 0.8


def _greedy(m, depth, n=20):
    p = [int(x) for x in np.random.default_rng(4).integers(3, 512, 9)]
    return [s.token_id for s in generate_steps(m.new_session(), p, SamplingParams(max_tokens=n, ignore_eos=True), depth)]


@pytest.mark.parametrize("quant,load_dtype", [((4, 32), torch.float32), ((8, 128), torch.bfloat16)],
                         ids=["q4g32-fp32", "q8g128-bf16"])
def test_greedy_mtp_equals_depth0_on_quantized_trunk(quant, load_dtype):
    m = model(quant, load_dtype)
    ref = _greedy(m, 0)
    for depth in (1, 2, 4):
        assert _greedy(m, depth) == ref, f"depth {depth}"


def test_int8_on_load_keeps_verify_equal_decode_and_greedy_parity():
    """Weight-only int8 (`quantize="int8"`): rows of a verify are bit-identical to one-token
    decodes (the kernel is row-invariant), so greedy MTP == depth 0; logits stay near bf16's."""
    from mtplx.backends.torch.int8 import Int8Weight
    from mtplx.backends.torch.loader import load_torch_model

    m = load_torch_model(ck(None).path, dtype=torch.bfloat16, progress=False, quantize="int8")
    assert isinstance(m.layers[0].mlp.gate_up, Int8Weight) and isinstance(m.mtp.layers[0].mixer.qkv, Int8Weight)
    assert isinstance(m.layers[0].mlp.router, torch.Tensor)  # routing stays in the model dtype
    p = [int(x) for x in np.random.default_rng(2).integers(3, 512, 8)]
    toks = [int(x) for x in np.random.default_rng(3).integers(3, 512, 5)]
    s = m.new_session()
    s.prefill(p)
    ref = []
    for t in toks:
        s.last = t
        ref.append(s.verify([])[0])
        s.commit(0, 0)
    s = m.new_session()
    s.prefill(p)
    s.last = toks[0]
    rows = s.verify(toks[1:])
    for i in range(len(toks)):
        assert torch.equal(rows[i], ref[i]), f"row {i}"
    want = _greedy(m, 0)
    assert _greedy(m, 3) == want
    ids = torch.tensor([p])
    with torch.no_grad():
        kl = _kl(model(None, torch.bfloat16).forward_hidden(ids)[2][0], m.forward_hidden(ids)[2][0])
    assert kl.mean() < 0.05
