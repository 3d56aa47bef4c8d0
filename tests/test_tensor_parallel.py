"""Tensor parallelism on CPU: 2 ranks over gloo (rank 0 here, rank 1 spawned), as `--tp 2` runs.

Exactness under TP: greedy MTP == depth 0 at every depth within the TP run, a batched
request == the same request alone, and TP logits within 1e-4 (relative) of one process in fp32.
Plus the shard rules (every rank's slices put back together give the tensor), the errors of
setups that cannot run, and a rank that dies (the other exits, nothing hangs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mtplx
from mtplx.checkpoint.config import ModelConfig
from mtplx.checkpoint.shard import TPError, check_tp, local_config, shard_rule, take_shard, valid_tp_sizes
from mtplx.checkpoint.synthetic import preset_config, random_canonical, write_synthetic_checkpoint
from mtplx.decoding.params import SamplingParams

torch_dist = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.skipif(not torch_dist.is_gloo_available(), reason="torch has no gloo")

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def _two_layers(**kw):
    return dict(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], **kw)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {
        "dense": write_synthetic_checkpoint(root / "dense", preset_config("qwen3.5-9b", **_two_layers()),
                                            tokenizer=True, seed=1).path,
        "moe": write_synthetic_checkpoint(root / "moe", preset_config("qwen3.5-35b-a3b", **_two_layers()),
                                          tokenizer=True, seed=2, router_near_ties=1e-4).path,
        "next": write_synthetic_checkpoint(root / "next", preset_config("qwen3-next-80b-a3b", **_two_layers()),
                                           tokenizer=True, seed=3).path,
        "default": mtplx.api.default_model_path(),
    }


@pytest.fixture(scope="module", params=["dense", "moe", "next", "default"])
def pair(request, ckpts):
    """(one-process model, the same checkpoint over 2 ranks), fp32."""
    path = ckpts[request.param]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    single = mtplx.load(path, backend="torch", dtype="float32")
    par = mtplx.load(path, backend="torch", dtype="float32", tp=2)
    yield request.param, single, par
    par.model.close()
    torch.set_num_threads(n)


def _prompt(model, n=23, seed=0):
    V = model.config.vocab_size
    return torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_logits_match_one_process(pair):
    name, single, par = pair
    ids = _prompt(single)
    rows = []
    for m in (single, par):
        s = m.new_session()
        s.prefill(ids)
        first = s.sample_first(GREEDY, None)
        rows.append((s._last_logits, s.verify([first, 5, 7])))  # a 4-row verify on the exact path
    for a, b in zip(rows[0], rows[1]):
        assert a.shape == b.shape
        rel = float((a - b).abs().max() / a.abs().max())
        assert rel < 1e-4, f"{name}: TP logits differ from one process by {rel:.2e} (relative)"


def test_long_prompt_under_tp(pair):
    """A prompt of several prefill blocks (messages past the channel's first transfer)."""
    name, single, par = pair
    if name != "default":
        pytest.skip("one checkpoint is enough")
    ids = _prompt(single, 600, seed=5)
    last = []
    for m in (single, par):
        s = m.new_session()
        s.prefill(ids)
        last.append(s._last_logits)
    assert float((last[0] - last[1]).abs().max() / last[0].abs().max()) < 1e-4
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    assert mtplx.generate(par, ids, p, depth=3).token_ids == mtplx.generate(par, ids, p, depth=0).token_ids


def test_greedy_mtp_equals_depth0_under_tp(pair):
    name, _, par = pair
    ids = _prompt(par, seed=1)
    plain = mtplx.generate(par, ids, GREEDY, depth=0).token_ids
    for depth in (1, 3):
        got = mtplx.generate(par, ids, GREEDY, depth=depth).token_ids
        assert got == plain, f"{name}: MTP depth {depth} under TP differs from depth 0"


def test_batched_equals_alone_under_tp(pair):
    name, _, par = pair
    prompts = [_prompt(par, 9 + 7 * i, seed=10 + i) for i in range(3)]
    batched = mtplx.generate(par, prompts, GREEDY, depth=2)
    for p, res in zip(prompts, batched):
        assert res.token_ids == mtplx.generate(par, p, GREEDY, depth=2).token_ids, f"{name}: batched != alone"


def test_sampled_run_repeats_under_tp(pair):
    name, _, par = pair
    if name != "moe":
        pytest.skip("one checkpoint is enough")
    p = SamplingParams(max_tokens=20, temperature=0.8, seed=7, ignore_eos=True)
    ids = _prompt(par, seed=2)
    assert mtplx.generate(par, ids, p, depth=2).token_ids == mtplx.generate(par, ids, p, depth=2).token_ids


def test_prefix_cache_on_equals_off_under_tp(pair):
    """Blocks stored with every rank's slice; a prompt sharing them restores them on every rank
    and generates exactly what a cache-off run does."""
    name, _, par = pair
    if name not in ("moe", "default"):
        pytest.skip("two checkpoints are enough")
    first = _prompt(par, 40, seed=3)
    second = first[:33] + _prompt(par, 9, seed=4)
    par.enable_prefix_cache(gb=0.1, block=8)
    try:
        for ids in (first, second):
            on = par.new_session()
            got = [r.token for r in mtplx.stream_generate(par, ids, GREEDY, 3, session=on)]
            off = par.new_session(prefix_cache=None, prefill_block=8)
            want = [r.token for r in mtplx.stream_generate(par, ids, GREEDY, 3, session=off)]
            assert got == want, f"{name}: prefix cache on != off under TP"
        assert on.cached_tokens == 32, f"{name}: the second prompt restored {on.cached_tokens} tokens, not 32"
    finally:
        par.prefix_cache.close()
        par.prefix_cache = None


# ---- shard rules (no processes) -----------------------------------------------------------------

@pytest.mark.parametrize("preset", ["qwen3.5-0.8b", "qwen3.5-9b", "qwen3.5-35b-a3b", "qwen3-next-80b-a3b"])
@pytest.mark.parametrize("world", [2, 4])
def test_shards_put_back_together(preset, world):
    """Every tensor: each rank's slice is the rows / columns its rule names, and the ranks
    together hold every element exactly once (KV heads replicated past nkv ranks: once per
    group of world / nkv ranks; replicated tensors whole on every rank)."""
    cfg = ModelConfig.from_dict(preset_config(preset))
    if world not in valid_tp_sizes(cfg):
        pytest.skip(f"{preset} does not split {world} ways")
    tensors = random_canonical(cfg, n_mtp_layers=1, seed=0)
    local = local_config(cfg, world)
    for name, arr in tensors.items():
        rules = [shard_rule(name, cfg, r, world) for r in range(world)]
        if rules[0] is None:
            assert all(take_shard(arr, None) is arr for _ in rules)
            continue
        dim = rules[0][0] % arr.ndim
        held = []
        for rule in rules:
            idx = np.concatenate([np.arange(a, b) for a, b in rule[1]])
            assert np.array_equal(take_shard(arr, rule), np.take(arr, idx, axis=dim)), name
            held.append(idx)
        if ("k_proj" in name or "v_proj" in name) and cfg.num_key_value_heads < world:
            held = held[::world // cfg.num_key_value_heads]
        assert np.array_equal(np.sort(np.concatenate(held)), np.arange(arr.shape[dim])), name
        if "q_proj" in name:
            assert take_shard(arr, rules[0]).shape[0] == local.num_attention_heads * 2 * cfg.head_dim


def test_tp_size_errors_say_what_fits():
    cfg = ModelConfig.from_dict(preset_config("qwen3.5-35b-a3b"))  # linear key heads 2
    with pytest.raises(TPError, match=r"linear_num_key_heads=2 is not divisible by 4.*takes: 2"):
        check_tp(cfg, 4)
    with pytest.raises(TPError, match="divisible by 3"):
        check_tp(cfg, 3)


def test_real_family_shapes_split():
    """The released shapes (reference section 4): the 2-KV-head MoE models take 2, 4, 8 ranks
    (KV heads replicated past 2)."""
    big = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=2, linear_num_key_heads=16,
               linear_num_value_heads=64, num_experts=512, num_experts_per_tok=10, moe_intermediate_size=1024,
               shared_expert_intermediate_size=1024)
    cfg = ModelConfig.from_dict(preset_config("qwen3.5-122b-a10b", **big))
    assert [n for n in (2, 4, 8, 16) if n in valid_tp_sizes(cfg)] == [2, 4, 8, 16]
    assert local_config(cfg, 8).num_key_value_heads == 1


def test_tp_refuses_mlx_here(ckpts):
    with pytest.raises(ValueError, match="mlx.launch"):
        mtplx.load(ckpts["dense"], backend="mlx", tp=2)


# ---- a rank that dies -----------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("victim", ["worker", "rank0"])
def test_a_dying_rank_stops_the_others(ckpts, victim):
    cmd = [sys.executable, "-m", "mtplx", "generate", "--model", str(ckpts["dense"]), "--tp", "2",
           "--prompt", "hello", "--max-tokens", "100000", "--ignore-eos", "--depth", "0", "--json"]
    env = dict(os.environ, MTPLX_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    try:
        workers = []
        deadline = time.monotonic() + 120
        while not workers and time.monotonic() < deadline:
            workers = [c for c in _children(proc.pid)
                       if b"tp_launch" in Path(f"/proc/{c}/cmdline").read_bytes()]
            time.sleep(0.2)
        assert workers, "rank 1 never started"
        time.sleep(8)  # loaded and generating
        assert proc.poll() is None, proc.stderr.read()
        if victim == "worker":
            os.kill(workers[0], signal.SIGKILL)
            proc.wait(timeout=30)
            assert proc.returncode != 0
            assert "rank 1 exited" in proc.stderr.read()
        else:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            end = time.monotonic() + 30
            while Path(f"/proc/{workers[0]}").exists() and time.monotonic() < end:
                try:  # a zombie until reaped: its state is Z
                    if (Path(f"/proc/{workers[0]}") / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                        break
                except OSError:
                    break
                time.sleep(0.2)
            assert time.monotonic() < end, "rank 1 outlived rank 0"
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- inspect --plan ---------------------------------------------------------------------------------

def test_plan_bytes_add_up():
    from mtplx.checkpoint.layout import canonical_shapes
    from mtplx.checkpoint.plan import plan_tp

    cfg = ModelConfig.from_dict(preset_config("qwen3.5-9b"))  # 8 heads, 2 KV heads
    whole = sum(int(np.prod(s)) for s in canonical_shapes(cfg, 1).values()) * 2
    one, two, four = (plan_tp(cfg, n, context=1000) for n in (1, 2, 4))
    assert one.total - one.kv_cache - one.states == whole and one.weights_sharded + one.weights_replicated == whole
    assert two.weights_replicated == one.weights_replicated
    assert two.weights_sharded * 2 == one.weights_sharded  # every split here is even
    assert two.kv_cache * 2 == one.kv_cache and two.states * 2 == one.states
    assert four.problems  # 2 linear key heads
    small = ModelConfig.from_dict(preset_config("qwen3.5-0.8b"))  # 4 linear key heads, 2 KV heads
    # 2 KV heads on 4 ranks: one head each (replicated), as on 2
    assert plan_tp(small, 4, context=1000).kv_cache == plan_tp(small, 2, context=1000).kv_cache
    assert plan_tp(cfg, 2, context=1000, memory=two.total).fits
    assert not plan_tp(cfg, 2, context=1000, memory=two.total - 1).fits


def test_inspect_plan_cli(ckpts, capsys):
    from mtplx.cli.main import main

    assert main(["inspect", str(ckpts["moe"]), "--plan", "--tp", "2", "--memory-gb", "1"]) == 0
    out = capsys.readouterr().out
    assert "tensor parallel over 2 ranks" in out and "fits in" in out
    assert main(["inspect", str(ckpts["moe"]), "--plan", "--tp", "4"]) == 8
    assert "linear_num_key_heads=2 is not divisible by 4" in capsys.readouterr().out


# ---- MLX: mx.distributed ring backend, 2 processes on loopback ------------------------------------

def _mlx_launch() -> str | None:
    import shutil

    try:
        import mlx.core as mx  # noqa: F401
        import mlx_lm  # noqa: F401
    except ImportError:
        return None
    return shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")


@pytest.mark.parametrize("name", ["dense", "moe", "next", "default"])
def test_mlx_ring_tp(ckpts, name, tmp_path):
    launch = _mlx_launch()
    if launch is None:
        pytest.skip("mlx, mlx-lm or mlx.launch is not installed")
    import json

    out = tmp_path / "result.json"
    script = Path(__file__).parent / "fixtures" / "mlx_tp_rank.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([launch, "--backend", "ring", "-n", "2", sys.executable, str(script), str(ckpts[name]),
                           str(out)], capture_output=True, text=True, timeout=600, env=env)
    if "ring" in proc.stderr and "not available" in proc.stderr:
        pytest.skip("this mlx build has no ring backend")
    assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["mtp"]["1"] == r["plain"] and r["mtp"]["3"] == r["plain"], f"{name}: MLX MTP under TP != depth 0"
    assert max(r["rel"]) < 1e-4, f"{name}: MLX TP logits differ from one process by {max(r['rel']):.2e}"
    assert all(x["same"] for x in r["prefix"]), f"{name}: MLX prefix cache on != off under TP"
    assert r["prefix"][1]["cached"] == 32


# ---- serve --tp 2: the real server over two ranks ------------------------------------------------

def test_serve_tp(ckpts):
    """`mtplx serve --tp 2`: concurrent requests through the OpenAI and Anthropic routes give
    the tokens of a one-at-a-time run, and a second turn restores its prefix from the cache."""
    httpx = pytest.importorskip("httpx")
    from concurrent.futures import ThreadPoolExecutor

    from mtplx.server.model_adapter import write_test_checkpoint
    from mtplx.server.testing import ServerProcess

    model_dir = write_test_checkpoint(Path(ckpts["dense"]).parent / "serve")
    args = ["mtplx", "serve", "--model", str(model_dir), "--tp", "2", "--depth", "2", "--cache-block", "16",
            "--log-level", "warning", "--threads", "1"]
    with ServerProcess(args, startup_timeout=180, env={"OMP_NUM_THREADS": "1"}) as srv:
        url = srv.base_url
        long_user = " ".join(f"word{i}" for i in range(40))

        def chat(content):
            body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 12,
                    "temperature": 0}
            return httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()

        alone = [chat(f"{long_user} question {i}") for i in range(3)]
        with ThreadPoolExecutor(3) as ex:
            together = list(ex.map(chat, [f"{long_user} question {i}" for i in range(3)]))
        for a, b in zip(alone, together):
            assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
        assert together[0]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        msg = httpx.post(url + "/v1/messages", json={"model": "m", "max_tokens": 8, "messages": [
            {"role": "user", "content": "hello"}]}, timeout=120).json()
        assert msg["type"] == "message" and msg["content"][0]["type"] == "text"


@pytest.mark.parametrize("layout,quantize", [("hf", None), ("hf_fused", None), ("mlx", (8, 32))])
def test_sharded_load_equals_slices_of_the_whole(tmp_path, layout, quantize):
    """A rank's load (per-expert files sliced before stacking, MLX-quantized modules after
    dequantizing) gives exactly its slices of the one-process model's tensors."""
    from mtplx.backends.torch.loader import load_torch_model

    cfg = preset_config("qwen3.5-35b-a3b", **_two_layers())
    ck = write_synthetic_checkpoint(tmp_path / layout, cfg, layout=layout, quantize=quantize, seed=5)
    whole = dict(load_torch_model(ck.path, dtype="float32", kernel="torch").named_parameters())
    I = whole["layers.0.mlp.gate_up"].shape[1] // 2
    for r in range(2):
        part = dict(load_torch_model(ck.path, dtype="float32", kernel="torch", shard=(r, 2)).named_parameters())
        assert part.keys() == whole.keys()
        for name, p in part.items():
            if p.shape == whole[name].shape:
                assert torch.equal(p, whole[name]), name
        gu, h = whole["layers.0.mlp.gate_up"], I // 2
        want = torch.cat([gu[:, r * h:(r + 1) * h], gu[:, I + r * h:I + (r + 1) * h]], 1)
        assert torch.equal(part["layers.0.mlp.gate_up"], want)
        assert torch.equal(part["layers.0.mlp.down"], whole["layers.0.mlp.down"][..., r * h:(r + 1) * h])


def test_under_torchrun(ckpts):
    """torchrun starts both ranks; rank 0 runs the command, rank 1 serves it and both exit 0."""
    import json
    import shutil

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    cmd = [torchrun, "--nproc-per-node", "2", "-m", "mtplx", "generate", "--model", str(ckpts["moe"]), "--tp", "2",
           "--prompt", "hello world", "--max-tokens", "12", "--ignore-eos", "--depth", "2", "--compare", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", MTPLX_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["compare"]["identical_tokens"] is True and len(out["token_ids"]) == 12


_FOUR_RANKS = """
import json, sys, torch
import mtplx
from mtplx.decoding.params import SamplingParams
path = sys.argv[1]
torch.set_num_threads(1)
single = mtplx.load(path, backend="torch", dtype="float32")
par = mtplx.load(path, backend="torch", dtype="float32", tp=4, tp_threads=1)
ids = list(range(5, 28))
s1, s4 = single.new_session(), par.new_session()
s1.prefill(ids); s4.prefill(ids)
rel = float((s1._last_logits - s4._last_logits).abs().max() / s1._last_logits.abs().max())
p = SamplingParams(max_tokens=6, ignore_eos=True)
d0 = mtplx.generate(par, ids, p, depth=0).token_ids
print(json.dumps({"rel": rel, "same": mtplx.generate(par, ids, p, depth=3).token_ids == d0}))
par.model.close()
"""


def test_four_ranks_replicate_kv_heads(tmp_path):
    """4 ranks on a model with 2 KV heads: each KV head replicated on 2 ranks (own process: one TP
    model per process, and the module's 2-rank model may still be alive)."""
    import json

    ck = write_synthetic_checkpoint(tmp_path / "kv2", preset_config("qwen3.5-0.8b", **_two_layers(tie_word_embeddings=False)),
                                    tokenizer=True, seed=6)
    proc = subprocess.run([sys.executable, "-c", _FOUR_RANKS, str(ck.path)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["rel"] < 1e-4 and r["same"], r


def test_end_process_closes_flushes_and_keeps_the_code():
    """A process that ran a group ends via end_process: models closed, buffered output kept,
    the exit code unchanged (a close that fails says so and turns 0 into 1)."""
    script = ("import sys, mtplx.backends.torch.tp_launch as t\n"
              "class M:\n"
              "    def __init__(self, fail): self.fail = fail\n"
              "    def close(self):\n"
              "        print('closed', self.fail, end=' ')\n"
              "        if self.fail: raise RuntimeError('peer gone')\n"
              "t._opened += [M(False), M(sys.argv[2] == 'fail')]\n"
              "t.end_process(int(sys.argv[1]))\n")
    for code, mode, want in [(3, "ok", 3), (0, "ok", 0), (0, "fail", 1), (2, "fail", 2)]:
        proc = subprocess.run([sys.executable, "-c", script, str(code), mode], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == want, proc.stderr
        assert proc.stdout == f"closed False closed {mode == 'fail'} "
        assert ("peer gone" in proc.stderr) == (mode == "fail")
