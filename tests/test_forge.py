"""mtplx forge: self-distillation of an MTP head on a small synthetic checkpoint.

A random-weight MoE checkpoint without a head: forge trains a fresh MoE head for a few dozen
steps and teacher-forced acceptance must climb from ~chance (1/vocab) to clearly above it; the
written head passes inspect's tensor gate in the checkpoint's layout and drafts in generate with
greedy output identical to plain decoding. Plus the pieces: the depth-aware chain equals the
head's own teacher-forced forward at depth 1, and refreshing keeps an existing head's layout.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mtplx.checkpoint.inspect import inspect_checkpoint  # noqa: E402
from mtplx.checkpoint.synthetic import write_synthetic_checkpoint  # noqa: E402
from mtplx.forge import ForgeOptions, forge  # noqa: E402
from mtplx.forge.corpus import load_corpus  # noqa: E402
from mtplx.forge.head_train import acceptance_rates, chain_forward  # noqa: E402

CORPUS_TEXT = "\n".join(
    f"def f{i}(x, y):\n    return x * {i} + y - {i % 7}\n\nclass C{i}:\n    value = {i * 3}\n" for i in range(400)
)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for j in range(8):
        (d / f"m{j}.py").write_text(CORPUS_TEXT[j * 2000:(j + 1) * 2000 + 4000])
    return d


@pytest.fixture(scope="module")
def forged(tmp_path_factory, corpus_dir):
    root = tmp_path_factory.mktemp("forge")
    write_synthetic_checkpoint(root / "base", "qwen3.5-35b-a3b", head="none", tokenizer=True, seed=1)
    opts = ForgeOptions(steps=60, seq_len=64, batch=8, pool_windows=48, eval_windows=8, depth=2, lr=1e-2,
                        threads=1, seed=0, init="random")
    rep = forge(root / "base", str(corpus_dir), root / "out", opts)
    return root, rep


def test_forge_raises_acceptance_from_chance(forged):
    _, rep = forged
    assert rep.init == "random"
    assert rep.steps == 60
    chance = 1.0 / 512
    assert rep.before["by_depth"][0] < 0.02  # ~chance: a random head
    assert rep.after["by_depth"][0] > max(0.06, 20 * chance), rep.after
    assert rep.after["by_depth"][0] > rep.before["by_depth"][0] + 0.04
    assert rep.final_loss == rep.final_loss  # not NaN


def test_forged_head_passes_inspect_and_keeps_the_base(forged):
    root, rep = forged
    assert rep.written["kind"] == "embedded" and rep.written["experts"] == "per_expert"
    r = inspect_checkpoint(root / "out")
    assert r.exit_code == 0 and r.head_present, r.to_json()
    head = r.to_dict()
    assert "mtp" in json.dumps(head)
    # the base checkpoint is untouched (forge wrote a copy)
    assert not inspect_checkpoint(root / "base").head_present


def test_forged_head_runs_in_generate_with_greedy_parity(forged):
    import mtplx
    from mtplx.decoding.params import SamplingParams

    root, _ = forged
    model = mtplx.load(root / "out", backend="torch", dtype="float32")
    assert model.has_mtp
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    base = mtplx.generate(model, "def f1(x, y):\n", params, depth=0)
    for depth in (1, 2):
        out = mtplx.generate(model, "def f1(x, y):\n", params, depth=depth)
        assert out.token_ids == base.token_ids


def test_chain_depth1_equals_head_forward_train(tmp_path):
    from mtplx.backends.torch.loader import load_torch_model

    write_synthetic_checkpoint(tmp_path / "c", "qwen3.5-0.8b", head="embedded", seed=3)
    m = load_torch_model(tmp_path / "c", dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    post, _, _ = m.forward_hidden(ids, logits="none")
    chain = chain_forward(m, post, ids, 2, tokens="draft")
    ref = m.mtp.forward_train(post[:, :-1], ids[:, 1:])
    torch.testing.assert_close(chain[0], ref, rtol=1e-4, atol=1e-4)
    # depth 2 of start t, drafted from the head's own output, matches a step-by-step rebuild for t = 0
    g1 = m.mtp.forward_train(post[:, :1], ids[:, 1:2], return_hidden=True)[1]
    d1 = chain[0][:, :1].argmax(-1)
    head = m.mtp
    from mtplx.forge.head_train import _layer_multi
    x1 = head._fc_in(post[:, :1], ids[:, 1:2])
    x2 = head._fc_in(g1, d1)
    pos = [torch.arange(1), torch.arange(1) + 1]
    u = _layer_multi(head.layers[0], m.rope, [x1, x2], pos)
    from mtplx.backends.torch.model import rms_norm
    torch.testing.assert_close(m.logits(rms_norm(u, head.norm, head.eps))[:, 0], chain[1][:, 0], rtol=1e-4, atol=1e-4)


def test_refresh_keeps_a_fused_layout_in_place(tmp_path, corpus_dir):
    write_synthetic_checkpoint(tmp_path / "c", "qwen3.5-35b-a3b", layout="hf_fused", head="sidecar_file",
                               head_layout="hf_fused", tokenizer=True, seed=2)
    before = inspect_checkpoint(tmp_path / "c")
    assert before.head_present
    rep = forge(tmp_path / "c", str(corpus_dir), None,
                ForgeOptions(steps=2, seq_len=32, batch=2, pool_windows=4, eval_windows=2, depth=1, threads=1))
    assert rep.init == "existing" and rep.written["kind"] == "sidecar_file"
    after = inspect_checkpoint(tmp_path / "c")
    assert after.exit_code == 0 and after.head_present, after.to_json()


def test_corpus_split_is_deterministic(corpus_dir):
    a, b = load_corpus(str(corpus_dir)), load_corpus(str(corpus_dir))
    assert a.train == b.train and a.heldout == b.heldout and a.heldout
    with pytest.raises(FileNotFoundError):
        load_corpus(str(corpus_dir / "missing"))


def test_acceptance_rates_math():
    r = acceptance_rates([60, 20, 5], [100, 40, 10])
    assert r["by_depth"] == [0.6, 0.5, 0.5]
    assert r["cumulative"] == [0.6, 0.3, 0.15]
    assert np.isclose(r["tokens_per_verify"][2], 2.05)


def test_cli_forge_json_and_errors(tmp_path, corpus_dir, capsys):
    from mtplx.cli.main import main

    write_synthetic_checkpoint(tmp_path / "c", "qwen3.5-0.8b", head="none", tokenizer=True, seed=4)
    code = main(["forge", str(tmp_path / "c"), "--corpus", str(corpus_dir), "-o", str(tmp_path / "o"),
                 "--steps", "2", "--seq-len", "32", "--batch", "2", "--pool", "4", "--depth", "2",
                 "--threads", "1", "--json"])
    assert code == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["steps"] == 2 and rep["written"]["experts"] == "dense" and len(rep["after"]["by_depth"]) == 2
    assert rep["init"] == "trunk"  # a missing head starts from the target's last full-attention layer
    assert inspect_checkpoint(tmp_path / "o").head_present
    assert main(["forge", str(tmp_path / "c"), "--corpus", str(tmp_path / "nope"), "--steps", "1"]) == 1
    assert "no such file" in capsys.readouterr().err
