"""Lazy tensor store: layouts, head locations, and one-line errors on damaged files."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from mtplx.checkpoint.errors import CheckpointError
from mtplx.checkpoint.store import open_store, read_safetensors_header, save_safetensors
from mtplx.checkpoint.synthetic import write_synthetic_checkpoint


def test_save_and_memmap_all_dtypes(tmp_path):
    arrs = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16),
        "c": np.array([1, 2], dtype=np.uint32),
        "d": np.array([-1], dtype=np.int64),
        "e": np.zeros((0, 4), dtype=np.float16),
    }
    (tmp_path / "config.json").write_text("{}")
    save_safetensors(tmp_path / "model.safetensors", arrs, {"format": "pt"})
    st = open_store(tmp_path)
    assert set(st) == set(arrs) and len(st) == 5
    for k, v in arrs.items():
        assert st[k].dtype == v.dtype and st[k].shape == v.shape
        np.testing.assert_array_equal(np.asarray(st[k]).astype(np.float64), v.astype(np.float64))
    assert isinstance(st["a"], np.memmap)
    assert st.dtype("b") == "BF16" and st.shape("a") == (2, 3)
    # and the safetensors library reads our files
    from safetensors.numpy import load_file
    assert load_file(str(tmp_path / "model.safetensors"))["a"].tolist() == arrs["a"].tolist()


@pytest.mark.parametrize("head", ["embedded", "sidecar_file", "sidecar_dir", "mlx_sidecar", "none"])
def test_head_locations(tmp_path, head):
    ck = write_synthetic_checkpoint(tmp_path, "qwen3.5-0.8b", head=head, shards=2)
    st = open_store(tmp_path)
    mtp = [k for k in st if k.startswith("mtp.")]
    if head == "none":
        assert st.head is None and not mtp
    else:
        assert st.head.kind == head and len(mtp) == 15
        assert "mtp.fc.weight" in st and st.shape("mtp.fc.weight") == (64, 128)
    if head == "mlx_sidecar":
        assert st.head.declared_norm_convention == "one_plus_w"
        assert st.info("mtp.fc.weight").file_key == "fc.weight"  # prefix added by the store


def test_sidecar_name_model_mtp(tmp_path):
    write_synthetic_checkpoint(tmp_path, "qwen3.5-0.8b", head="sidecar_file", sidecar_name="model-mtp.safetensors")
    st = open_store(tmp_path)
    assert st.head.kind == "sidecar_file" and st.head.path.name == "model-mtp.safetensors"


def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_truncated_file(tmp_path):
    write_synthetic_checkpoint(tmp_path, "qwen3.5-0.8b", head="none")
    p = tmp_path / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as e:
        open_store(tmp_path)
    assert "truncated" in _one_line(e)


def test_garbage_header(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 16)
    with pytest.raises(CheckpointError) as e:
        read_safetensors_header(p)
    assert "garbage" in _one_line(e)
    p.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(CheckpointError) as e:
        read_safetensors_header(p)
    assert "corrupt" in _one_line(e)


def test_index_names_missing_shard(tmp_path):
    write_synthetic_checkpoint(tmp_path, "qwen3.5-0.8b", shards=3)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        open_store(tmp_path)
    assert "model-00002-of-00003.safetensors" in _one_line(e) and "missing" in _one_line(e)


def test_index_maps_tensor_to_wrong_shard(tmp_path):
    write_synthetic_checkpoint(tmp_path, "qwen3.5-0.8b", shards=2)
    idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    k = next(iter(idx["weight_map"]))
    idx["weight_map"][k] = "model-00002-of-00002.safetensors" if idx["weight_map"][k].startswith("model-00001") else "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError) as e:
        open_store(tmp_path)
    assert k in _one_line(e)
