"""`mtplx inspect` through the real CLI: verdict exit codes, --json, one-line errors."""

import json
import struct
import subprocess
import sys

import pytest

from mtplx.checkpoint.synthetic import write_synthetic_checkpoint


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "mtplx", *map(str, args)], capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout, r.stderr


def _assert_one_line_error(rc, out, err, expect_rc, *needles):
    assert rc == expect_rc, (rc, out, err)
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_json_and_human(tmp_path):
    write_synthetic_checkpoint(tmp_path, "qwen3.5-35b-a3b", layout="hf_fused", head_layout="hf", shards=2)
    rc, out, err = _cli("inspect", tmp_path, "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["verdict"] == "runnable-with-mtp" and d["exit_code"] == 0 and d["schema_version"] == 1
    assert d["gate"]["mtp"]["expected"] == 3 * 16 + 17 and d["gate"]["mtp"]["layout"] == "per_expert"
    assert d["model"]["experts"] == 16 and d["mtp_head"]["kind"] == "embedded"
    assert d["norms"]["mtp"]["convention"] == "zero_centered"
    rc, out, err = _cli("inspect", tmp_path)
    assert rc == 0 and "runnable-with-mtp" in out and "65/65" in out


def _main(capsys, *args):
    """The same dispatcher in-process (saves a ~1 s interpreter start per case)."""
    from mtplx.cli.main import main

    rc = main([str(a) for a in args])
    c = capsys.readouterr()
    return rc, c.out, c.err


def test_bad_inputs_one_line_errors(tmp_path, capsys):
    # missing config.json
    (tmp_path / "empty").mkdir()
    _assert_one_line_error(*_cli("inspect", tmp_path / "empty"), 6, "config.json")
    # not there at all
    _assert_one_line_error(*_main(capsys, "inspect", tmp_path / "nope"), 6, "no such file")
    # unknown model_type
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    _assert_one_line_error(*_cli("inspect", tmp_path / "llama"), 5, "llama")
    # truncated safetensors
    d = tmp_path / "trunc"
    write_synthetic_checkpoint(d, "qwen3.5-0.8b", head="none")
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-64])
    _assert_one_line_error(*_cli("inspect", d), 6, "truncated")
    # garbage header
    d = tmp_path / "garbage"
    write_synthetic_checkpoint(d, "qwen3.5-0.8b", head="none")
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 12) + b"\x00garbage\xff!!" + b"\0" * 64)
    _assert_one_line_error(*_main(capsys, "inspect", d), 6, "garbage")
    # index naming a missing shard
    d = tmp_path / "shard"
    write_synthetic_checkpoint(d, "qwen3.5-0.8b", shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    _assert_one_line_error(*_main(capsys, "inspect", d), 6, "model-00002-of-00002.safetensors")
    # --json still answers with the verdict
    rc, out, err = _main(capsys, "inspect", d, "--json")
    assert rc == 6 and json.loads(out)["verdict"] == "unreadable"


def test_dispatcher(capsys):
    from mtplx.cli.main import main

    assert main(["inspect", "/definitely/not/here"]) == 6
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert main([]) == 2
