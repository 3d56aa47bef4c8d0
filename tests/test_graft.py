"""`mtplx graft`: round trips between every head kind and trunk kind the synthetic writer makes,
greedy MTP == depth 0 on grafted models, norm-convention healing checked by the probe, refusals.

A head and its base come from two synthetic checkpoints with the same seed, so the head is the
base's own: after the graft, the torch model of OUT must hold the source head's weights (bf16
rounding aside) whatever layouts, prefixes, norm conventions and quantization were crossed.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mtplx.checkpoint.graft import GraftError, graft
from mtplx.checkpoint.inspect import inspect_checkpoint
from mtplx.checkpoint.store import open_store, save_safetensors
from mtplx.checkpoint.synthetic import preset_config, write_synthetic_checkpoint
from mtplx.decoding.loop import generate_steps
from mtplx.decoding.params import SamplingParams

torch.set_num_threads(1)
_TMP = Path(tempfile.mkdtemp(prefix="mtplx_graft_tests_"))
MOE = "qwen3.5-35b-a3b"
DENSE = "qwen3.5-9b"
TRUNKS = {  # name -> write_synthetic_checkpoint kwargs (no head)
    "hf": dict(layout="hf"),
    "hf_fused": dict(layout="hf_fused"),
    "mlx": dict(layout="mlx"),
    "mlx_q4": dict(layout="mlx", quantize=(4, 64)),
}
HEADS = {  # name -> (kwargs of the source checkpoint, path of HEAD inside it)
    "embedded": (dict(layout="hf", head="embedded"), ""),
    "sidecar_file": (dict(layout="hf_fused", head="sidecar_file"), "mtp.safetensors"),
    "sidecar_dir": (dict(layout="hf", head="sidecar_dir"), "mtp/weights.safetensors"),
    "mlx_sidecar": (dict(layout="hf", head="mlx_sidecar"), "mtp"),
    "mlx_sidecar_q4": (dict(layout="hf", head="mlx_sidecar", quantize=(4, 64)), "mtp"),
    "mlx_embedded_q8": (dict(layout="mlx", head="embedded", quantize=(8, 64)), ""),
}


@functools.lru_cache(maxsize=None)
def trunk(preset: str, name: str) -> Path:
    d = _TMP / f"trunk-{preset}-{name}"
    write_synthetic_checkpoint(d, preset, head="none", **TRUNKS[name])
    return d


@functools.lru_cache(maxsize=None)
def source(preset: str, name: str) -> tuple[Path, Path]:
    kw, rel = HEADS[name]
    d = _TMP / f"src-{preset}-{name}"
    write_synthetic_checkpoint(d, preset, **kw)
    return d, d / rel if rel else d


@functools.lru_cache(maxsize=None)
def load(path: Path):
    from mtplx.backends.torch.loader import load_torch_model

    return load_torch_model(path, dtype=torch.float32, progress=False)


def head_params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in model.mtp.named_parameters()}


def assert_same_head(out: Path, src: Path, exact: bool) -> None:
    a, b = head_params(load(out)), head_params(load(src))
    assert a.keys() == b.keys()
    for k in a:
        if exact or k.endswith("norm") or k.endswith(("norm_emb", "norm_hid", "input_norm", "post_norm")):
            assert torch.equal(a[k], b[k]), k
        else:  # bf16 rounding of an fp32 source: relative 2^-8
            assert torch.allclose(a[k], b[k], rtol=2 ** -8, atol=1e-6), (k, (a[k] - b[k]).abs().max())


@pytest.mark.parametrize("head_kind", list(HEADS))
@pytest.mark.parametrize("trunk_kind", list(TRUNKS))
def test_round_trip_every_head_onto_every_trunk(trunk_kind, head_kind, tmp_path):
    base = trunk(MOE, trunk_kind)
    src_dir, head = source(MOE, head_kind)
    out = tmp_path / "out"
    rep = graft(base, head, out)
    assert rep.inspect_verdict == "runnable-with-mtp"
    assert inspect_checkpoint(out).verdict == "runnable-with-mtp"
    # the base's weight files are linked, never copied
    for f in rep.linked:
        assert (out / f["file"]).is_symlink() or f["link"] == "hardlink"
    prov = json.loads((out / "mtplx_graft.json").read_text())
    assert prov["head_source"]["path"] == str(head) and prov["norms"]["written_as"] in ("zero_centered", "one_plus_w")
    expected_layout = {"hf": "per_expert", "hf_fused": "fused", "mlx": "switch_mlp", "mlx_q4": "switch_mlp"}[trunk_kind]
    assert rep.head_layout_out == expected_layout
    assert_same_head(out, src_dir, exact=False)


@pytest.mark.parametrize("head_kind", ["embedded", "mlx_sidecar_q4"])
def test_keep_dtype_is_exact_and_dense_heads(head_kind, tmp_path):
    """--head-dtype keep: float heads bit for bit, quantized heads keep their codes (same
    dequantized weights); dense models too."""
    for preset in (MOE, DENSE):
        src_dir, head = source(preset, head_kind)
        out = tmp_path / preset
        rep = graft(trunk(preset, "mlx"), head, out, head_dtype="keep")
        assert rep.inspect_verdict == "runnable-with-mtp"
        assert_same_head(out, src_dir, exact=True)


def _greedy(model, depth: int, n: int = 20) -> list[int]:
    p = [int(x) for x in np.random.default_rng(3).integers(3, model.cfg.vocab_size, 7)]
    steps = generate_steps(model.new_session(), p, SamplingParams(max_tokens=n, ignore_eos=True), depth)
    return [s.token_id for s in steps]


@pytest.mark.parametrize("preset,trunk_kind,head_kind,dtype", [
    (MOE, "mlx_q4", "mlx_sidecar_q4", "bf16"),
    (MOE, "hf_fused", "embedded", "q4"),
    (DENSE, "hf", "mlx_sidecar", "bf16"),
])
def test_grafted_greedy_mtp_equals_depth0(preset, trunk_kind, head_kind, dtype, tmp_path):
    out = tmp_path / "out"
    graft(trunk(preset, trunk_kind), source(preset, head_kind)[1], out, head_dtype=dtype)
    m = load(out)
    ref = _greedy(m, 0)
    for depth in (1, 3):
        assert _greedy(m, depth) == ref, f"depth {depth}"


# ---- norm convention: detected, healed, and checked by the probe ------------------------------
ALIGN_SCALE = np.float32(0.02)


@functools.lru_cache(maxsize=None)
def aligned_model() -> Path:
    """A checkpoint whose head really predicts its trunk (no training): the trunk's layer outputs
    are scaled down so its next token depends mostly on the current one, and the head's fc passes
    the embedding of x[t+1] through, so its draft for x[t+2] is the trunk's choice after x[t+1].
    Uses the shipped default model instead when it exists and its head's norm weights tell
    their convention clearly (the norm-healing tests read that evidence)."""
    from mtplx.api import default_model_path
    from mtplx.checkpoint.norms import norm_keys, norm_statistics

    dm = default_model_path()
    if dm is not None and inspect_checkpoint(dm).verdict == "runnable-with-mtp":
        st = open_store(dm)
        mean = norm_statistics(st, norm_keys(list(st), "mtp"))
        if mean is not None and abs(mean - 0.5) > 0.3:
            return dm
    raw = _TMP / "aligned-raw"
    write_synthetic_checkpoint(raw, MOE, layout="hf_fused", head_layout="hf", head="embedded")
    st = open_store(raw)
    tensors = {}
    for k in st:
        a = np.array(st[k])
        if k.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight", "experts.down_proj")):
            a = a * ALIGN_SCALE
        if k == "mtp.fc.weight":
            H = a.shape[0]
            a = np.concatenate([np.eye(H, dtype=a.dtype), np.zeros((H, H), a.dtype)], axis=1)
        tensors[st.info(k).file_key] = a
    d = _TMP / "aligned"
    d.mkdir()
    save_safetensors(d / "model.safetensors", tensors, {"format": "pt"})
    shutil.copy(raw / "config.json", d / "config.json")
    return d


def write_unshifted_mlx_head(model_dir: Path, out: Path) -> None:
    """The classic mistake: an MLX MTP folder (declares 1 + w) holding zero-centred norms."""
    from mtplx.checkpoint.canonical import load_canonical

    raw = json.loads((model_dir / "config.json").read_text())
    text = raw.get("text_config", raw)
    tensors = {}
    for name, a in load_canonical(model_dir):
        if not name.startswith("mtp."):
            continue
        rest = name[len("mtp."):]
        a = np.asarray(a)
        if rest.endswith(("norm.weight", "layernorm.weight", "pre_fc_norm_embedding.weight",
                          "pre_fc_norm_hidden.weight")):
            a = a.astype(np.float32) - np.float32(1.0)  # multiplier -> w: NOT the 1 + w MLX promises
        if ".experts." in rest:
            mlp, proj = rest.split(".experts.")
            rest = f"{mlp}.switch_mlp.{proj}.weight"
        tensors[rest] = a
    out.mkdir(parents=True)
    save_safetensors(out / "model.safetensors", tensors, {"format": "mlx"})
    cfg = {**{k: v for k, v in text.items() if k != "model_type"}, "model_type": "qwen3_5_mtp",
           "base_model_type": raw.get("model_type"), "mtp_num_hidden_layers": 1}
    (out / "config.json").write_text(json.dumps(cfg))


def _probe(path: Path):
    from mtplx.backends.torch.probe import probe, probe_ids

    m = load(path)
    tok = None
    if (path / "tokenizer.json").is_file():
        from mtplx.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(path)
    ids, src = probe_ids(tok, m.cfg.vocab_size, 160)
    return probe(m, ids, 1, src)


def test_flipped_norms_detected_healed_and_probe_agrees(tmp_path):
    model = aligned_model()
    orig = _probe(model)
    assert orig.rates[0] > 0.5, orig.render()
    bad_head = tmp_path / "unshifted-mlx-head"
    write_unshifted_mlx_head(model, bad_head)
    # trusting the declaration (what a naive graft does): everything loads, nothing is accepted
    naive = tmp_path / "naive"
    rep = graft(model, bad_head, naive, head_dtype="keep", head_norms="one_plus_w")
    assert rep.inspect_verdict == "runnable-with-mtp" and rep.warnings  # the contradiction is reported
    bad = _probe(naive)
    assert bad.rates[0] < 0.05 and not bad.ok, bad.render()
    # auto: the weights contradict the declared format -> healed, evidence recorded
    healed = tmp_path / "healed"
    rep = graft(model, bad_head, healed, head_dtype="keep")
    n = rep.norm
    assert n.healed and n.declared == "one_plus_w" and n.convention == "zero_centered" and n.source == "statistics"
    assert "never shifted" in n.evidence
    prov = json.loads((healed / "mtplx_graft.json").read_text())
    assert prov["norms"]["healed"] and any("healed" in c for c in prov["conversions"])
    good = _probe(healed)
    assert good.accepted == orig.accepted and good.reached == orig.reached, (good.render(), orig.render())
    assert_same_head(healed, model, exact=True)


def test_shifted_twice_sidecar_decided_by_weights(tmp_path):
    """An HF-style sidecar (no declared convention) holding 1 + w: statistics say so; the
    grafted head equals the original."""
    src_dir, _ = source(DENSE, "embedded")
    st = open_store(src_dir)
    head = {}
    for k in st:
        if k.startswith("mtp."):
            a = np.array(st[k])
            if k.endswith(("norm.weight", "layernorm.weight", "norm_embedding.weight", "norm_hidden.weight")):
                a = (np.float32(1.0) + a.astype(np.float32))
            head[k] = a
    save_safetensors(tmp_path / "mtp.safetensors", head, {"format": "pt"})
    rep = graft(trunk(DENSE, "hf"), tmp_path / "mtp.safetensors", tmp_path / "out", head_dtype="keep")
    assert rep.norm.convention == "one_plus_w" and rep.norm.source == "statistics" and not rep.norm.healed
    assert_same_head(tmp_path / "out", src_dir, exact=True)


# ---- refusals ---------------------------------------------------------------------------------
def _refused(tmp_path, code, **src_kw):
    preset = src_kw.pop("preset", MOE)
    overrides = src_kw.pop("overrides", None)
    cfg = preset_config(preset, **(overrides or {}))
    d = tmp_path / "src"
    write_synthetic_checkpoint(d, cfg, **src_kw)
    head = d / "mtp" if src_kw.get("head") == "mlx_sidecar" else d
    with pytest.raises(GraftError) as e:
        graft(trunk(MOE, "hf"), head, tmp_path / "out")
    assert e.value.code == code, str(e.value)
    assert not (tmp_path / "out").exists()
    return str(e.value)


def test_refuses_other_hidden_size(tmp_path):
    msg = _refused(tmp_path, "hidden-size-mismatch", head="sidecar_file", head_hidden_size=96)
    assert "96" in msg and "64" in msg and "use the MTP head" in msg


def test_refuses_other_hidden_size_quantized_mlx_head(tmp_path):
    msg = _refused(tmp_path, "hidden-size-mismatch", head="mlx_sidecar", quantize=(4, 32), head_hidden_size=96)
    assert "96" in msg


def test_refuses_other_expert_count(tmp_path):
    msg = _refused(tmp_path, "expert-count-mismatch", head="mlx_sidecar", overrides={"num_experts": 8})
    assert "8" in msg and "16" in msg


def test_refuses_other_vocab(tmp_path):
    msg = _refused(tmp_path, "vocab-mismatch", head="embedded", overrides={"vocab_size": 640})
    assert "640" in msg and "512" in msg


def test_refuses_dense_head_for_moe_base(tmp_path):
    d = tmp_path / "dense"
    write_synthetic_checkpoint(d, DENSE, head="sidecar_file")
    with pytest.raises(GraftError) as e:
        graft(trunk(MOE, "hf"), d / "mtp.safetensors", tmp_path / "out")
    assert e.value.code == "moe-mismatch" and "dense" in str(e.value)


def test_refuses_existing_out_and_force_replaces_only_graft_outputs(tmp_path):
    head = source(MOE, "embedded")[1]
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(GraftError) as e:
        graft(trunk(MOE, "hf"), head, out)
    assert e.value.code == "out-exists" and "--force" in str(e.value)
    with pytest.raises(GraftError) as e:
        graft(trunk(MOE, "hf"), head, out, force=True)  # not a graft output: never deleted
    assert e.value.code == "out-exists" and (out / "precious.txt").read_text() == "mine"
    out2 = tmp_path / "out2"
    graft(trunk(MOE, "hf"), head, out2)
    rep = graft(trunk(MOE, "hf"), head, out2, force=True, head_dtype="q8")
    assert rep.warnings and "MoE" in rep.warnings[0]  # quantizing an MoE head warns
    assert inspect_checkpoint(out2).verdict == "runnable-with-mtp"


def test_refuses_head_without_head_and_out_inside_base(tmp_path):
    with pytest.raises(GraftError) as e:
        graft(trunk(MOE, "hf"), trunk(MOE, "mlx"), tmp_path / "o")
    assert e.value.code == "no-head"
    with pytest.raises(GraftError) as e:
        graft(trunk(MOE, "hf"), source(MOE, "embedded")[1], trunk(MOE, "hf") / "sub")
    assert e.value.code == "out-overlaps"


def test_graft_replaces_base_embedded_head(tmp_path):
    """A base with its own (embedded) head: the index leaves the old mtp.* tensors out."""
    base, _ = source(DENSE, "embedded")
    src_dir, head = source(DENSE, "mlx_sidecar")
    rep = graft(base, head, tmp_path / "out", head_dtype="keep")
    st = open_store(tmp_path / "out")
    assert all(st.info(k).file.name == "mtplx-graft-mtp.safetensors" for k in st if k.startswith("mtp."))
    assert st.unlisted and all(k.startswith("mtp.") for k in st.unlisted)
    assert rep.inspect_verdict == "runnable-with-mtp"


def test_cli_graft_and_inspect_probe(tmp_path, capsys):
    from mtplx.cli.main import main

    base, head = trunk(DENSE, "hf"), source(DENSE, "sidecar_file")[1]
    assert main(["graft", str(base), str(head), "-o", str(tmp_path / "o"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ok"] and d["inspect"]["verdict"] == "runnable-with-mtp"
    assert main(["graft", str(base), str(head), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "out-exists" in err and "--force" in err
    assert main(["inspect", str(tmp_path / "o"), "--probe", "--probe-tokens", "48", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["verdict"] == "runnable-with-mtp" and d["probe"]["chains"] > 0
    assert len(d["probe"]["acceptance_by_depth"]) == 3
