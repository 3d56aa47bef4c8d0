"""The MTP tensor gate: counts derived from the config, and one verdict per failure."""

import numpy as np
import pytest

from mtplx.checkpoint.inspect import inspect_checkpoint
from mtplx.checkpoint.store import open_store, save_safetensors
from mtplx.checkpoint.synthetic import PRESETS, write_synthetic_checkpoint

P122 = "qwen3.5-122b-a10b"


@pytest.fixture(scope="module")
def ck122(tmp_path_factory):
    # the real release: fused 3-D backbone experts, per-expert MTP head, sidecar file
    d = tmp_path_factory.mktemp("q122")
    write_synthetic_checkpoint(d, P122, layout="hf_fused", head_layout="hf", head="sidecar_file")
    return d


def _mtp(rep):
    return rep.gate.groups["mtp"]


def test_122b_per_expert_785(ck122):
    rep = inspect_checkpoint(ck122)
    g = _mtp(rep)
    assert rep.config.num_experts == 256
    assert (g.expected, g.found, g.format.experts) == (785, 785, "per_expert")
    assert rep.verdict == "runnable-with-mtp" and rep.exit_code == 0
    assert rep.elapsed_s < 1.0


@pytest.mark.parametrize("head_layout,n", [("hf_fused", 19), ("mlx", 20)])
def test_122b_other_head_layouts(tmp_path, head_layout, n):
    write_synthetic_checkpoint(tmp_path, P122, layout="hf_fused", head_layout=head_layout, head="embedded")
    rep = inspect_checkpoint(tmp_path)
    assert (_mtp(rep).expected, _mtp(rep).found, rep.verdict) == (n, n, "runnable-with-mtp")


def test_dense_head_15_and_two_layers_double(tmp_path):
    write_synthetic_checkpoint(tmp_path / "a", "qwen3.5-9b")
    assert _mtp(inspect_checkpoint(tmp_path / "a")).expected == 15
    write_synthetic_checkpoint(tmp_path / "b", "qwen3.5-9b", n_mtp_layers=2)
    rep = inspect_checkpoint(tmp_path / "b")
    assert _mtp(rep).expected == 4 + 2 * 11 and rep.verdict == "runnable-with-mtp"
    write_synthetic_checkpoint(tmp_path / "c", "qwen3.5-35b-a3b", layout="hf_fused", head_layout="hf", n_mtp_layers=2)
    rep = inspect_checkpoint(tmp_path / "c")
    assert _mtp(rep).expected == 4 + 2 * (8 + 5 + 3 * 16) and rep.verdict == "runnable-with-mtp"


def test_mlx_4bit_moe_head_folder_accepted(tmp_path):
    write_synthetic_checkpoint(tmp_path, "qwen3.5-35b-a3b", layout="hf_fused", head="mlx_sidecar", quantize=(4, 64))
    rep = inspect_checkpoint(tmp_path / "mtp")  # the head folder alone
    g = _mtp(rep)
    assert rep.verdict == "head-valid" and rep.exit_code == 0
    assert g.format.experts == "switch_mlp" and g.format.quantized and g.ok
    assert rep.norms["mtp"].convention == "one_plus_w" and rep.norms["mtp"].source == "declared"
    rep = inspect_checkpoint(tmp_path)  # and grafted beside its base
    assert rep.verdict == "runnable-with-mtp" and rep.store.head.kind == "mlx_sidecar"
    assert rep.norms["backbone"].convention == "zero_centered"


def _rewrite_head(ck_dir, edit):
    st = open_store(ck_dir)
    head = {st.info(k).file_key: np.array(st[k]) for k in st if k.startswith("mtp.")}
    edit(head)
    save_safetensors(ck_dir / "mtp.safetensors", head)


def _variant(tmp_path, name, edit):
    d = tmp_path / name
    write_synthetic_checkpoint(d, "qwen3.5-35b-a3b", layout="hf_fused", head_layout="hf", head="sidecar_file")
    _rewrite_head(d, edit)
    return inspect_checkpoint(d)


def test_missing_expert(tmp_path):
    bad = "mtp.layers.0.mlp.experts.7.up_proj.weight"
    rep = _variant(tmp_path, "m", lambda h: h.pop(bad))
    assert rep.verdict == "head-invalid" and rep.exit_code == 4 and rep.reason_code == "missing-tensors"
    assert _mtp(rep).missing == [bad] and bad in rep.reason


def test_extra_key(tmp_path):
    bad = "mtp.layers.0.mlp.experts.16.up_proj.weight"  # one expert too many
    rep = _variant(tmp_path, "e", lambda h: h.__setitem__(bad, np.zeros((32, 64), np.float32)))
    assert rep.verdict == "head-invalid" and rep.reason_code == "extra-tensors"
    assert _mtp(rep).extra == [bad] and bad in rep.reason


def test_wrong_shape(tmp_path):
    bad = "mtp.layers.0.self_attn.k_proj.weight"
    rep = _variant(tmp_path, "w", lambda h: h.__setitem__(bad, np.zeros((32, 64), np.float32)))
    assert rep.verdict == "head-invalid" and rep.reason_code == "wrong-shape"
    assert [w[0] for w in _mtp(rep).wrong_shape] == [bad] and bad in rep.reason


def test_head_of_other_hidden_size(tmp_path):
    write_synthetic_checkpoint(tmp_path, "qwen3.5-9b", head="sidecar_file", head_hidden_size=128)
    rep = inspect_checkpoint(tmp_path)
    assert rep.verdict == "head-invalid" and rep.reason_code == "hidden-size-mismatch"
    assert "mtp.fc.weight" in rep.reason and "128" in rep.reason


def test_norm_convention_statistics_and_warning(tmp_path):
    # a plain sidecar file has no declared format: statistics decide
    write_synthetic_checkpoint(tmp_path / "a", "qwen3.5-9b", head="sidecar_file", head_norm_convention="one_plus_w")
    rep = inspect_checkpoint(tmp_path / "a")
    assert rep.norms["mtp"].convention == "one_plus_w" and rep.norms["mtp"].source == "statistics"
    # an MLX sidecar still holding zero-centred norms: declared 1 + w, statistics disagree -> warning
    write_synthetic_checkpoint(tmp_path / "b", "qwen3.5-9b", head="mlx_sidecar", head_norm_convention="zero_centered")
    rep = inspect_checkpoint(tmp_path / "b")
    assert rep.norms["mtp"].convention == "one_plus_w" and rep.warnings


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != P122])
@pytest.mark.parametrize("layout,head", [("hf", "embedded"), ("mlx", "mlx_sidecar")])
def test_presets_round_trip(tmp_path, preset, layout, head):
    q = (4, 32) if layout == "mlx" else None
    write_synthetic_checkpoint(tmp_path, preset, layout=layout, head=head, quantize=q, shards=2)
    rep = inspect_checkpoint(tmp_path)
    assert rep.verdict == "runnable-with-mtp", rep.reason
    assert rep.config.model_type == PRESETS[preset].get("model_type")
    assert rep.gate.groups["backbone"].ok and _mtp(rep).ok
    assert (rep.config.quantization is not None) == (q is not None)


def test_no_head(tmp_path):
    write_synthetic_checkpoint(tmp_path, "qwen3-next-80b-a3b", head="none")
    rep = inspect_checkpoint(tmp_path)
    assert rep.verdict == "runnable-without-mtp" and rep.exit_code == 3
