"""Canonical weights: every layout of the same random weights gives identical canonical tensors."""

import subprocess
import sys

import numpy as np
import pytest

from mtplx.checkpoint.canonical import canonical_dict, load_canonical, split_ba, split_qkvz
from mtplx.checkpoint.config import load_config
from mtplx.checkpoint.errors import CheckpointError
from mtplx.checkpoint.quant import dequantize
from mtplx.checkpoint.store import open_store
from mtplx.checkpoint.synthetic import write_synthetic_checkpoint


def _canon(path):
    return canonical_dict(open_store(path), load_config(path))


def _same(a, b):
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


@pytest.mark.parametrize("preset", ["qwen3.5-35b-a3b", "qwen3-next-80b-a3b", "qwen3.5-9b"])
def test_all_layouts_agree(tmp_path, preset):
    """per-expert vs fused vs switch_mlp, HF zero-centred vs MLX 1 + w, every head location."""
    combos = [("hf", "embedded"), ("hf_fused", "sidecar_file"), ("mlx", "embedded"), ("hf", "mlx_sidecar"),
              ("mlx", "sidecar_dir")]
    ref = None
    for layout, head in combos:
        d = tmp_path / f"{layout}-{head}"
        ck = write_synthetic_checkpoint(d, preset, layout=layout, head=head, shards=2, seed=3)
        got = _canon(d)
        _same(got, ck.canonical)
        if ref is None:
            ref = got
        else:
            _same(got, ref)
    # canonical contract spot checks
    cfg = load_config(tmp_path / "hf-embedded")
    assert ref["layers.0.linear_attn.conv1d.weight"].shape == (cfg.linear_conv_dim, 4)
    assert ref["mtp.norm.weight"].dtype == np.float32 and abs(float(ref["mtp.norm.weight"].mean()) - 1) < 0.1
    assert ref["layers.0.linear_attn.A_log"].dtype == np.float32
    if cfg.is_moe:
        assert ref["mtp.layers.0.mlp.experts.gate_proj"].shape == (cfg.num_experts, cfg.moe_intermediate_size, 64)
        assert ref["layers.0.mlp.experts.down_proj"].shape == (cfg.num_experts, 64, cfg.moe_intermediate_size)


def test_plain_dict_and_prefixes(tmp_path):
    """canonical_weights takes a plain dict (e.g. a transformers state_dict); visual keys skipped."""
    ck = write_synthetic_checkpoint(tmp_path, "qwen3.5-0.8b", head="embedded")
    st = open_store(tmp_path)
    d = {k: np.array(st[k]) for k in st}
    d["model.visual.blocks.0.attn.qkv.weight"] = np.zeros((3, 3), np.float32)
    _same(canonical_dict(d, ck.config), ck.canonical)
    assert "lm_head.weight" not in ck.canonical  # tied
    # explicit conventions override detection
    wrong = canonical_dict(d, ck.config, source_norm_convention="one_plus_w")
    assert abs(float(wrong["norm.weight"].mean())) < 0.1


def test_quantized_passthrough_and_stacking(tmp_path):
    ck = write_synthetic_checkpoint(tmp_path / "q", "qwen3.5-35b-a3b", layout="mlx", head="mlx_sidecar",
                                    quantize=(4, 32), seed=5)
    got = _canon(tmp_path / "q")
    _same(got, ck.canonical)
    w = got["mtp.layers.0.mlp.experts.gate_proj.weight"]
    assert w.dtype == np.uint32 and w.shape == (16, 32, 64 * 4 // 32)
    # dequantized tensors approximate the unquantized ones of the same seed
    ref = write_synthetic_checkpoint(tmp_path / "f", "qwen3.5-35b-a3b", layout="hf", head="embedded", seed=5).canonical
    deq = dequantize(w, got["mtp.layers.0.mlp.experts.gate_proj.scales"], got["mtp.layers.0.mlp.experts.gate_proj.biases"],
                     32, 4)
    err = np.abs(deq - ref["mtp.layers.0.mlp.experts.gate_proj"]).max()
    assert err < 0.1


def _hf_fix_query_key_value_ordering(mixed_qkvz, mixed_ba, nk, nv, dk, dv):
    """numpy port of transformers' Qwen3NextGatedDeltaNet.fix_query_key_value_ordering (5.24):
    view [.., nk, 2dk + 2dv*nv/nk] then split; importing transformers costs ~15 s here."""
    r = nv // nk
    qkvz = mixed_qkvz.reshape(*mixed_qkvz.shape[:-1], nk, 2 * dk + 2 * dv * r)
    ba = mixed_ba.reshape(*mixed_ba.shape[:-1], nk, 2 * r)
    q, k, v, z = np.split(qkvz, np.cumsum([dk, dk, r * dv]), axis=-1)
    b, a = np.split(ba, [r], axis=-1)
    v = v.reshape(*v.shape[:-2], -1, dv)
    z = z.reshape(*z.shape[:-2], -1, dv)
    return q, k, v, z, b.reshape(*b.shape[:-2], nv), a.reshape(*a.shape[:-2], nv)


def test_qwen3_next_split_matches_transformers_ordering():
    """Our qkvz/ba split (rows [q heads | k heads | v heads]) equals transformers' grouping."""
    from mtplx.checkpoint.config import ModelConfig
    from mtplx.checkpoint.synthetic import preset_config

    cfg = ModelConfig.from_dict(preset_config("qwen3-next-80b-a3b"))
    nk, dk, nv, dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_num_value_heads, cfg.linear_value_head_dim
    w = np.random.default_rng(0).standard_normal((2 * nk * dk + 2 * nv * dv, 8)).astype(np.float32)
    wba = np.random.default_rng(1).standard_normal((2 * nv, 8)).astype(np.float32)
    x = np.eye(8, dtype=np.float32)[None]  # [1, T=8, H=8]: projected outputs are weight columns
    q, k, v, z, b, a = _hf_fix_query_key_value_ordering(x @ w.T, x @ wba.T, nk, nv, dk, dv)
    qkv, zz = split_qkvz(w, cfg)
    bb, aa = split_ba(wba, cfg)
    ref_qkv = np.concatenate([q.reshape(1, 8, -1), k.reshape(1, 8, -1), v.reshape(1, 8, -1)], -1)[0].T
    np.testing.assert_array_equal(qkv, ref_qkv)
    np.testing.assert_array_equal(zz, z.reshape(1, 8, -1)[0].T)
    np.testing.assert_array_equal(bb, b[0].T)
    np.testing.assert_array_equal(aa, a[0].T)


def test_load_canonical(tmp_path):
    ck = write_synthetic_checkpoint(tmp_path / "ok", "qwen3.5-9b")
    _same(dict(load_canonical(tmp_path / "ok")), ck.canonical)
    write_synthetic_checkpoint(tmp_path / "bad", "qwen3.5-9b", head="sidecar_file")
    from mtplx.checkpoint.store import save_safetensors, open_store as o
    side = o(tmp_path / "bad")
    keep = {side.info(k).file_key: np.array(side[k]) for k in side if k.startswith("mtp.") and "q_norm" not in k}
    save_safetensors(tmp_path / "bad" / "mtp.safetensors", keep)
    with pytest.raises(CheckpointError, match="q_norm"):
        list(load_canonical(tmp_path / "bad"))
    names = [n for n, _ in load_canonical(tmp_path / "bad", include_mtp=False)]
    assert names and not any(n.startswith("mtp.") for n in names)


def test_checkpoint_package_imports_no_torch_or_mlx():
    code = ("import sys, mtplx.checkpoint, mtplx.checkpoint.canonical, mtplx.checkpoint.synthetic, "
            "mtplx.checkpoint.inspect, mtplx.checkpoint.quant, mtplx.cli.inspect_cmd; "
            "bad=[m for m in sys.modules if m.split('.')[0] in ('torch','mlx','transformers')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
