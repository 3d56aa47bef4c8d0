"""Batch invariance and rollback on the exact path (bit-identical, not approximately equal).

- verify row i == the logits of a one-token decode at that position, dense and MoE (router with
  exact and near ties), fp32 and bf16;
- verify k, commit n (every n in 0..k): the following logits equal a fresh decode of the kept
  tokens bit for bit;
- greedy MTP at any depth emits the tokens of depth-0 decoding (oracle and random drafts);
- context limits raise ValueError.
"""

from __future__ import annotations

import pytest
import torch

from mtplx.decoding.params import SamplingParams
from test_torch_common import checkpoint, fused_available, our_model, prompt, rowmm_available

torch.set_num_threads(1)
GREEDY = SamplingParams()


def decode_chain(m, p, toks):
    """Prefill p, then decode toks one at a time (depth 0): logits [len(toks), V]."""
    s = m.new_session()
    s.prefill(p)
    out = []
    for i, t in enumerate(toks):
        s.last = t
        out.append(s.verify([])[0])
        s.commit(0, 0)
    return torch.stack(out), s


CASES = [("dense", None), ("moe", None), ("moe", 0.0), ("moe", 1e-7), ("next", None)]


def need_kernel(kernel):
    if kernel == "rowmm" and not rowmm_available():
        pytest.skip("no fixed-order kernel on this CPU / without a compiler")
    if kernel == "fused" and not fused_available():
        pytest.skip("no compiled step kernel on this CPU / without a compiler")


ROWMM_CASES = [("dense", None, torch.bfloat16), ("moe", 0.0, torch.float32)]
FUSED_CASES = [("dense", None, torch.float32), ("dense", None, torch.bfloat16), ("moe", 0.0, torch.float32),
               ("moe", 1e-7, torch.bfloat16), ("next", None, torch.float32), ("next", None, torch.bfloat16)]


@pytest.mark.parametrize("kind,ties,dtype,kernel",
                         [(k, t, d, "torch") for k, t in CASES for d in (torch.float32, torch.bfloat16)]
                         + [(k, t, d, "rowmm") for k, t, d in ROWMM_CASES]
                         + [(k, t, d, "fused") for k, t, d in FUSED_CASES])
def test_verify_rows_bit_identical_to_decode(kind, ties, dtype, kernel):
    need_kernel(kernel)
    m = our_model(kind, dtype, router_near_ties=ties, kernel=kernel)
    p = prompt(9, seed=5)
    toks = prompt(6, seed=6)
    ref, _ = decode_chain(m, p, toks)
    for k in (1, 3, 5):  # verify k+1 rows: [last, d1..dk] (2, 4 and 6 rows)
        s = m.new_session()
        s.prefill(p)
        s.last = toks[0]
        rows = s.verify(toks[1:k + 1])
        assert rows.shape[0] == k + 1
        for i in range(k + 1):
            assert torch.equal(rows[i], ref[i]), f"{kind} {dtype} verify {k + 1} rows: row {i} differs"


def test_moe_near_tie_router_picks_same_experts():
    """With duplicated router rows the top-k contains exact ties; routing of a token is the same
    whether it is alone or in a batch."""
    m = our_model("moe", torch.float32, router_near_ties=0.0)
    moe = m.layers[0].mlp
    from mtplx.backends.torch.model import EXACT, exact_linear

    x = torch.randn(6, m.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    w_all, idx_all = moe.route(x, EXACT)
    probs = torch.softmax(exact_linear(x, moe.router), -1, dtype=torch.float32)
    assert (probs[:, 0::2] == probs[:, 1::2]).any()  # the ties are real
    for i in range(6):
        w1, idx1 = moe.route(x[i:i + 1], EXACT)
        assert torch.equal(idx1[0], idx_all[i]) and torch.equal(w1[0], w_all[i])
        assert torch.equal(moe(x[i:i + 1], EXACT)[0], moe(x, EXACT)[i])


@pytest.mark.parametrize("kind,dtype,kernel", [
    ("dense", torch.float32, "torch"), ("dense", torch.bfloat16, "torch"), ("moe", torch.float32, "torch"),
    ("moe", torch.bfloat16, "torch"), ("dense", torch.float32, "rowmm"), ("moe", torch.bfloat16, "rowmm"),
    ("dense", torch.bfloat16, "fused"), ("moe", torch.float32, "fused"), ("next", torch.float32, "fused")])
def test_rollback_every_n(kind, dtype, kernel):
    need_kernel(kernel)
    m = our_model(kind, dtype, kernel=kernel)
    p = prompt(8, seed=11)
    seq = prompt(9, seed=12)  # last, 4 drafts, then continuation
    k = 4
    for n in range(k + 1):
        s = m.new_session()
        s.prefill(p)
        s.last = seq[0]
        s.verify(seq[1:k + 1])
        nxt = 300 + n  # a token the drafts did not contain
        s.commit(n, nxt)
        kept = seq[: n + 1] + [nxt] + seq[k + 1:k + 4]
        ref, r = decode_chain(m, p, kept)
        # continue both: decode the following tokens, compare bit for bit
        got = []
        for t in kept[n + 1:]:
            s.last = t
            got.append(s.verify([])[0])
            s.commit(0, 0)
        assert torch.equal(torch.stack(got), ref[n + 1:]), f"n={n}"
        for ca, cb in zip(s.cache.layers, r.cache.layers):
            if hasattr(ca, "state"):
                assert torch.equal(ca.state, cb.state) and torch.equal(ca.conv, cb.conv)
        assert s.cache.length == r.cache.length


def generate(m, p, depth, n, drafts=None):
    """Greedy loop; `drafts(pos_in_output)` may override the head's drafts (oracle drafting)."""
    s = m.new_session()
    rng = s.make_rng(0)
    s.prefill(p)
    out = [s.sample_first(GREEDY, rng)]
    accepted = []
    while len(out) < n:
        d, q = s.draft(depth, GREEDY, rng)
        if drafts is not None:
            d = drafts(len(out), depth)
        rows = s.verify(d)
        a, nxt = s.accept(rows, d, q, GREEDY, rng)
        s.commit(a, nxt)
        accepted.append(a)
        out += d[:a] + [nxt]
    return out[:n], accepted


@pytest.mark.parametrize("kind,dtype,kernel", [
    ("dense", torch.float32, "torch"), ("moe", torch.bfloat16, "torch"), ("moe", torch.float32, "rowmm"),
    ("dense", torch.bfloat16, "rowmm"), ("moe", torch.float32, "fused"), ("moe", torch.bfloat16, "fused"),
    ("dense", torch.float32, "fused"), ("next", torch.bfloat16, "fused")])
def test_greedy_mtp_equals_depth0(kind, dtype, kernel):
    need_kernel(kernel)
    m = our_model(kind, dtype, kernel=kernel)
    p = prompt(7, seed=21)
    base, _ = generate(m, p, 0, 16)
    assert generate(m, p, 3, 16)[0] == base
    # oracle drafts (the right tokens, sometimes corrupted): exercises every acceptance length
    def oracle(i, depth):
        d = list(base[i:i + depth]) + [5] * max(0, depth - len(base[i:]))
        if i % 3 == 0 and depth > 1:
            d[depth // 2] = (d[depth // 2] + 1) % m.cfg.vocab_size
        return d
    out, acc = generate(m, p, 4, 16, drafts=oracle)
    assert out == base
    assert max(acc) >= 3 and min(acc) < 4


def test_context_limit_errors():
    m = our_model("dense")
    s = m.new_session(max_context=12)
    assert s.max_context == 12
    with pytest.raises(ValueError, match="context"):
        s.prefill(prompt(12))
    s = m.new_session(max_context=12)
    s.prefill(prompt(9))
    rng = s.make_rng(0)
    s.sample_first(GREEDY, rng)
    with pytest.raises(ValueError, match="context"):
        s.verify([1, 2, 3])  # positions 9..12 > 12
    rows = s.verify([1, 2])
    s.commit(0, int(rows[0].argmax()))
    assert m.new_session().max_context == m.cfg.max_position_embeddings


def test_sessions_are_independent():
    m = our_model("dense")
    a, b = m.new_session(), m.new_session()
    a.prefill(prompt(5))
    b.prefill(prompt(7, seed=3))
    c = m.new_session()
    c.prefill(prompt(5))
    a.last = b.last = c.last = 9
    la, _, lc = a.verify([])[0], b.verify([])[0], c.verify([])[0]
    assert torch.equal(la, lc)


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)


def _kernel_weight(dt, N, K, g):
    """(weight, scale or None, the fp32 matrix it stands for)."""
    w = torch.randn(N, K, generator=g)
    if dt == torch.int8:
        q = (w * 40).round().clamp(-127, 127).to(torch.int8)
        scale = torch.rand(N, generator=g) + 0.5
        return q, scale, q.float() * scale[:, None]
    return w.to(dt), None, w.to(dt).float()


@pytest.mark.parametrize("dt", KERNEL_DTYPES, ids=str)
def test_rowmm_kernel_matches_linear_and_is_row_and_thread_invariant(dt):
    """Every row of an M-row call (M = 1..16) equals the same row alone, bit for bit, at 1 and 2
    threads and with a parallel split forced on small matrices; odd K and N (tails); the result
    agrees with F.linear within fp32 rounding."""
    if not rowmm_available():
        pytest.skip("no fixed-order kernel on this CPU / without a compiler")
    from mtplx.backends.torch import kernels

    f = kernels.get_rowmm()
    g = torch.Generator().manual_seed(0)
    prev, prev_par = torch.get_num_threads(), kernels.PAR_MIN_BYTES
    try:
        for N, K in ((37, 96), (41, 101), (9, 7), (260, 515)):
            w, scale, ref = _kernel_weight(dt, N, K, g)
            x = torch.randn(16, K, generator=g)
            torch.set_num_threads(1)
            y = f(x, w, scale)
            assert torch.allclose(y, x @ ref.T, atol=2e-4 * K ** 0.5, rtol=1e-4), (dt, N, K)
            alone = torch.stack([f(x[r:r + 1].contiguous(), w, scale)[0] for r in range(16)])
            assert torch.equal(y, alone), (dt, N, K)
            for m in range(1, 17):
                assert torch.equal(f(x[:m].contiguous(), w, scale), y[:m]), (dt, N, K, m)
            torch.set_num_threads(2)
            for par in (prev_par, 1):  # 1 byte: every 8-column block its own parallel chunk
                kernels.PAR_MIN_BYTES = par
                fn = kernels._state.pop("fn"), kernels._state.pop("isa")
                try:
                    f2 = kernels.get_rowmm()
                    for m in (1, 3, 4, 5, 16):
                        assert torch.equal(f2(x[:m].contiguous(), w, scale), y[:m]), (dt, N, K, m, par)
                finally:
                    kernels._state["fn"], kernels._state["isa"] = fn
    finally:
        torch.set_num_threads(prev)
        kernels.PAR_MIN_BYTES = prev_par


@pytest.mark.parametrize("kind", ["dense", "moe", "next"])
def test_compiled_kernels_match_torch_path_and_verify_equals_decode(kind):
    """Both compiled exact paths, "rowmm" (fixed-order matmuls and fused ops, op by op) and
    "fused" (the whole step in one call, sparse MoE), compute the same function as the pure-torch
    one (fp32 logits within 1e-4), and each keeps a 6-row verify equal to six one-token decodes,
    bit for bit."""
    if not fused_available():
        pytest.skip("no fixed-order kernel on this CPU / without a compiler")
    p, toks = prompt(20, seed=3), prompt(6, seed=4)
    got = {}
    for kernel in ("torch", "rowmm", "fused"):
        m = our_model(kind, torch.float32, kernel=kernel)
        s = m.new_session()
        s.prefill(p)
        s.last = toks[0]
        got[kernel] = s.verify(toks[1:])
    for kernel in ("rowmm", "fused"):
        ref, _ = decode_chain(our_model(kind, torch.float32, kernel=kernel), p, toks)
        for i in range(6):
            assert torch.equal(got[kernel][i], ref[i]), (kind, kernel, i)
        err = (got[kernel] - got["torch"]).abs().max()
        assert torch.allclose(got[kernel], got["torch"], atol=1e-4, rtol=1e-4), (kernel, err)


def test_fused_kernel_choice_and_fallbacks():
    """auto picks the fused step on a plain CPU model; a model it cannot run (int8 weights, tensor
    parallel) gets rowmm from auto and a clear error when asked for fused by name."""
    if not fused_available():
        pytest.skip("no compiled step kernel on this CPU / without a compiler")
    from mtplx.backends.torch import tp
    from mtplx.backends.torch.loader import load_torch_model

    path = checkpoint("dense").path  # fresh models: our_model's are shared between tests
    assert load_torch_model(path, dtype=torch.float32, progress=False, kernel="auto").kernel == "fused"
    q = load_torch_model(path, dtype=torch.float32, progress=False, quantize="int8", kernel="auto")
    assert q.kernel == "rowmm"
    with pytest.raises(RuntimeError, match="fused kernel cannot run this model: .* is int8-quantized"):
        q.set_kernel("fused")
    m = load_torch_model(path, dtype=torch.float32, progress=False, kernel="fused")
    tp.attach(m, object())  # a shard model sums its blocks over ranks: op by op
    assert m.kernel == "rowmm"


def test_fused_step_sessions_on_two_threads_equal_alone():
    """The fused step runs with the GIL released: sessions of one model decoding on two Python
    threads at once get the tokens they get alone."""
    if not fused_available():
        pytest.skip("no compiled step kernel on this CPU / without a compiler")
    import threading

    m = our_model("moe", torch.float32, kernel="fused")
    prompts = [prompt(9, seed=40 + i) for i in range(4)]
    alone = [generate(m, p, 2, 24)[0] for p in prompts]
    got = [None] * len(prompts)

    def run(i):
        got[i] = generate(m, prompts[i], 2, 24)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone


def test_fused_step_thread_invariant(monkeypatch):
    """The fused step split across threads (every matmul's columns, here even the tiny ones) gives
    the bits of one thread: set_batch_threads measures it and turns on."""
    if not fused_available():
        pytest.skip("no compiled step kernel on this CPU / without a compiler")
    from mtplx.backends.torch import kernels
    from mtplx.backends.torch.model import check_thread_invariance

    monkeypatch.setattr(kernels, "PAR_MIN_BYTES", 1)
    for kind, dtype in (("moe", torch.float32), ("moe", torch.bfloat16), ("next", torch.float32)):
        m = our_model(kind, dtype, kernel="fused")  # MoE: experts split across the threads
        assert check_thread_invariance(m, 2) == [], (kind, dtype)


def test_rowmm_bf16_dot_path_row_and_thread_invariant():
    """The AVX512-BF16 build's bf16 x bf16 matmul (what a bf16 model's exact path uses there):
    rows of 1..16-row calls equal the row alone at 1 and 2 threads, odd K and N, close to fp32."""
    if not rowmm_available():
        pytest.skip("no fixed-order kernel on this CPU / without a compiler")
    from mtplx.backends.torch import kernels

    dot = kernels.rowmm_bf16_fn()
    if dot is None:
        pytest.skip("this CPU has no AVX512-BF16")
    g = torch.Generator().manual_seed(5)
    prev = torch.get_num_threads()
    try:
        for N, K in ((37, 96), (41, 101), (9, 7), (300, 1030)):
            w = torch.randn(N, K, generator=g).bfloat16()
            x = torch.randn(16, K, generator=g).bfloat16()
            torch.set_num_threads(1)
            y = dot(x, w)
            assert torch.allclose(y, x.float() @ w.float().T, atol=1e-4 * K ** 0.5, rtol=1e-4)
            for m in range(1, 17):
                assert torch.equal(dot(x[:m].contiguous(), w), y[:m]), (N, K, m)
            assert torch.equal(torch.stack([dot(x[r:r + 1].contiguous(), w)[0] for r in range(16)]), y)
            torch.set_num_threads(2)
            assert torch.equal(dot(x, w), y)
    finally:
        torch.set_num_threads(prev)


def test_kernel_builds_where_the_cpu_and_a_compiler_allow():
    """On an x86 CPU with AVX2 or AVX-512 and a C++ compiler the kernel must build (a silent
    fallback would hide a broken kernel source behind skipped tests)."""
    import os
    import shutil

    from mtplx.backends.torch import kernels

    if kernels.kernel_isa() is None or shutil.which("c++") is None or os.environ.get("MTPLX_NO_KERNEL"):
        pytest.skip("no supported instruction set or no compiler here")
    assert kernels.get_rowmm() is not None, kernels.kernel_error()
    assert kernels.get_fused() is not None


def test_rowmm_isa_choice_and_fallback(monkeypatch):
    """MTPLX_KERNEL_ISA picks the build (a CPU without it gets none), MTPLX_NO_KERNEL turns the
    kernel off, and a model asking for "auto" then runs the pure-torch exact path."""
    from mtplx.backends.torch import kernels

    flags = kernels._cpu_flags()
    monkeypatch.setenv("MTPLX_KERNEL_ISA", "avx2")
    assert kernels.kernel_isa() == ("avx2" if {"avx2", "fma", "f16c"} <= flags else None)
    monkeypatch.setenv("MTPLX_KERNEL_ISA", "neon")
    assert kernels.kernel_isa() is None
    monkeypatch.delenv("MTPLX_KERNEL_ISA")
    saved = dict(kernels._state)
    kernels._state.clear()
    monkeypatch.setenv("MTPLX_NO_KERNEL", "1")
    try:
        assert kernels.get_rowmm() is None and "MTPLX_NO_KERNEL" in kernels.kernel_error()
        from test_torch_common import checkpoint

        from mtplx.backends.torch.loader import load_torch_model

        m = load_torch_model(checkpoint("dense", 0, None, None).path, dtype=torch.float32, progress=False)
        assert m.kernel == "torch"
        with pytest.raises(RuntimeError, match="unavailable"):
            m.set_kernel("rowmm")
    finally:
        kernels._state.clear()
        kernels._state.update(saved)


def test_rowmm_avx2_build_when_forced():
    """The AVX2 build (what an AVX2-only CPU gets) in a fresh process: row invariant and close to
    the AVX-512 one. Skipped where the CPU lacks AVX2 or the kernel cannot build."""
    import subprocess
    import sys

    from mtplx.backends.torch import kernels

    if not {"avx2", "fma", "f16c"} <= kernels._cpu_flags() or not rowmm_available():
        pytest.skip("no AVX2 or no compiler")
    code = ("import torch; from mtplx.backends.torch import kernels as k; f = k.get_rowmm(); "
            "assert k.active_isa() == 'avx2', k.kernel_error(); g = torch.Generator().manual_seed(1); "
            "w = torch.randn(19, 45, generator=g).bfloat16(); x = torch.randn(6, 45, generator=g); y = f(x, w); "
            "assert all(torch.equal(f(x[i:i+1].contiguous(), w)[0], y[i]) for i in range(6)); "
            "assert torch.allclose(y, x @ w.float().T, atol=1e-4); print('ok')")
    env = {**__import__("os").environ, "MTPLX_KERNEL_ISA": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


_BITS_CODE = (
    "import sys, torch; from mtplx.backends.torch import kernels as k; f = k.get_rowmm(); "
    "assert f is not None, k.kernel_error(); bf = k.rowmm_bf16_fn(); g = torch.Generator().manual_seed(3); out = []\n"
    "for N, K in [(37, 67), (300, 1024), (1029, 96), (256, 128)]:\n"
    "    w = torch.randn(N, K, generator=g); x = torch.randn(5, K, generator=g)\n"
    "    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8); sc = torch.rand(N, generator=g)\n"
    "    for M in range(1, 6):\n"
    "        xm = x[:M].contiguous()\n"
    "        out += [f(xm, w), f(xm, w.bfloat16()), f(xm, w.half()), f(xm, q, sc)]\n"
    "        if bf is not None: out.append(bf(xm.bfloat16(), w.bfloat16()))\n"
    "for nh, nkv, hd, pos0 in [(8, 2, 64, 50), (4, 1, 32, 20), (2, 2, 16, 7)]:\n"
    "    K, V = torch.randn(2, nkv, 64, hd, generator=g); q = torch.randn(3, nh, hd, generator=g)\n"
    "    for dt in (torch.float32, torch.bfloat16):\n"
    "        out.append(k.get_fused().attend_rows(q, K.to(dt).contiguous(), V.to(dt).contiguous(), pos0, hd ** -0.5))\n"
    "torch.save(out, sys.argv[1])")


def _kernel_bits(tmp_path, tag: str, **env) -> list:
    """rowmm's outputs (fp32 / bf16 / fp16 / int8 weights, 1..5 rows, odd shapes) and attend_rows'
    (fp32 / bf16 caches, GQA groups) from a build made in its own process with these settings."""
    import os
    import subprocess
    import sys

    path = tmp_path / f"{tag}.pt"
    run = subprocess.run([sys.executable, "-c", _BITS_CODE, str(path)], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return torch.load(path)


def test_prefetch_builds_give_the_same_bits(tmp_path, monkeypatch):
    """The two weight-prefetch builds (MTPLX_KERNEL_PREFETCH=l1 / l2: cache level, distance, and on
    l2 the sequential one-row bf16 stream) change only timing: each, in its own process, gives the
    same bits for fp32, bf16, fp16 and int8 weights, 1..5 rows, odd shapes. A bad value is a clear error."""
    from mtplx.backends.torch import kernels

    if not rowmm_available():
        pytest.skip("no supported instruction set or no compiler here")
    l1 = _kernel_bits(tmp_path, "l1", MTPLX_KERNEL_PREFETCH="l1")
    l2 = _kernel_bits(tmp_path, "l2", MTPLX_KERNEL_PREFETCH="l2")
    assert len(l1) == len(l2) >= 80
    assert all(torch.equal(a, b) for a, b in zip(l1, l2))
    monkeypatch.setenv("MTPLX_KERNEL_PREFETCH", "l3")
    with pytest.raises(ValueError, match="must be one of l1, l2"):
        kernels.prefetch_level()


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_transposed_horizontal_sums_give_the_same_bits(tmp_path, monkeypatch, isa):
    """The horizontal sums of a tile's accumulators, done LANES at a time by shuffles across
    vectors (hsum_lanes: a matmul tile's, or attention's scores of LANES keys), follow the one-vector
    sum's tree exactly: a build that sums every accumulator on its own (HSUM_TRANSPOSED=0) gives the
    same bits, on AVX-512 and on AVX2."""
    from mtplx.backends.torch import kernels

    if not rowmm_available():
        pytest.skip("no supported instruction set or no compiler here")
    env = {} if isa == "default" else {"MTPLX_KERNEL_ISA": isa}
    if isa != "default":
        monkeypatch.setenv("MTPLX_KERNEL_ISA", isa)
        if kernels.kernel_isa() != isa:
            pytest.skip(f"this CPU has no {isa}")
    fast = _kernel_bits(tmp_path, f"{isa}-lanes", **env)
    one_by_one = _kernel_bits(tmp_path, f"{isa}-single", MTPLX_KERNEL_DEFINES="HSUM_TRANSPOSED=0", **env)
    assert len(fast) == len(one_by_one) >= 80
    assert all(torch.equal(a, b) for a, b in zip(fast, one_by_one))
    monkeypatch.setenv("MTPLX_KERNEL_DEFINES", "1BAD")
    with pytest.raises(ValueError, match="not NAME or NAME=VALUE"):
        kernels.extra_defines()


def test_kernel_argmax_matches_torch_max():
    """The greedy choice's kernel (argmax_rows) returns what torch's max(dim).indices does: the first
    index of the maximum, the first NaN when there is one, for fp32 / bf16 / fp16 rows of any leading
    shape; sampling.argmax uses it once a model loaded the kernel."""
    from mtplx.backends.torch import kernels, sampling

    if not rowmm_available():
        pytest.skip("no supported instruction set or no compiler here")
    mod = kernels.get_fused()
    g = torch.Generator().manual_seed(0)
    nan, inf = float("nan"), float("inf")
    cases = [torch.randn(4104, generator=g), torch.randn(3, 5, 4104, generator=g), torch.tensor([1.0, 3.0, 3.0]),
             torch.tensor([1.0, nan, 3.0, nan]), torch.tensor([nan, nan]), torch.tensor([-inf, -inf]),
             torch.tensor([1.0, inf, inf, 2.0]), torch.tensor([7.0]),
             torch.randint(0, 3, (6, 50), generator=g).float()]  # many ties
    for x in cases:
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            y = x.to(dt)
            want = y.max(dim=-1).indices
            assert torch.equal(mod.argmax_rows(y), want), (x, dt)
            assert torch.equal(sampling.argmax(y), want)
    assert kernels.loaded() is mod


# ---- batched exact-path pieces: attention key tiles, dense MoE, padded elementwise ops -------


@pytest.mark.parametrize("kind,dtype", [("dense", torch.float32), ("dense", torch.bfloat16),
                                        ("moe", torch.float32), ("moe", torch.bfloat16)])
def test_verify_rows_across_attention_tile_boundary(kind, dtype):
    """Verify rows straddling a key tile (model.ATTN_TILE = 64: rows at positions 61..66 run in
    two groups with different padded key lengths) equal one-token decodes bit for bit."""
    from mtplx.backends.torch.model import ATTN_TILE

    m = our_model(kind, dtype)
    p = prompt(ATTN_TILE - 3, seed=31)
    toks = prompt(6, seed=32)
    ref, _ = decode_chain(m, p, toks)
    for k in (2, 3, 5):
        s = m.new_session()
        s.prefill(p)
        s.last = toks[0]
        rows = s.verify(toks[1:k + 1])
        for i in range(k + 1):
            assert torch.equal(rows[i], ref[i]), f"{kind} {dtype} verify {k + 1} rows: row {i} differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ties", [0.0, 1e-7])
def test_dense_moe_rows_invariant_and_matches_sparse(dtype, ties):
    """MoE.forward_dense (all experts, fused matmuls): row i of an N-row call equals a 1-row call
    for N = 1..8 with exact and near router ties, and agrees with the sparse per-expert path."""
    import mtplx.backends.torch.model as M

    m = our_model("moe", dtype, router_near_ties=ties)
    moe = m.layers[0].mlp
    assert moe._fused() is not None
    x = torch.randn(8, m.cfg.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.inference_mode():
        one = [moe(x[i:i + 1], M.EXACT)[0] for i in range(8)]
        for n in range(2, 9):
            y = moe(x[:n], M.EXACT)
            for i in range(n):
                assert torch.equal(y[i], one[i]), f"{n} rows: row {i} differs"
        old = M.DENSE_MOE_MAX_EI
        try:
            M.DENSE_MOE_MAX_EI = 0
            sparse = moe(x, M.EXACT)
        finally:
            M.DENSE_MOE_MAX_EI = old
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(torch.stack(one).float(), sparse.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_moe_path_still_exact(dtype, monkeypatch):
    """Blocks above DENSE_MOE_MAX_EI keep the per-expert loop: verify rows == decode there too."""
    import mtplx.backends.torch.model as M

    monkeypatch.setattr(M, "DENSE_MOE_MAX_EI", 0)
    m = our_model("moe", dtype, router_near_ties=0.0)
    p = prompt(9, seed=5)
    toks = prompt(6, seed=6)
    ref, _ = decode_chain(m, p, toks)
    s = m.new_session()
    s.prefill(p)
    s.last = toks[0]
    rows = s.verify(toks[1:6])
    for i in range(6):
        assert torch.equal(rows[i], ref[i]), f"row {i} differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [1, 4, 63, 64, 100, 128])
def test_exact_ew_rows_invariant(dtype, width):
    import torch.nn.functional as F

    from mtplx.backends.torch.model import exact_ew

    x = (torch.randn(7, width, generator=torch.Generator().manual_seed(2)) * 4).to(dtype)
    for fn in (torch.exp, torch.sigmoid, F.silu, F.softplus):
        full = exact_ew(fn, x)
        for i in range(7):
            assert torch.equal(exact_ew(fn, x[i:i + 1])[0], full[i])
        assert torch.allclose(full.float(), fn(x).float(), atol=1e-2, rtol=1e-2)


def test_attend_rows_gqa_groups_and_threads_change_no_bit():
    """The attention kernel runs the query heads of one KV head together (each K / V row read once
    for the group): every head gets the bits it gets alone (the same cache with its KV head
    repeated, so no grouping), whatever the row count, the context length or the threads; head
    dims that are not a multiple of the vector lanes take the per-head path. Close to softmax
    attention in fp32."""
    if not rowmm_available():
        pytest.skip("no fixed-order kernel on this CPU / without a compiler")
    from mtplx.backends.torch import kernels

    attend = kernels.get_fused().attend_rows
    g = torch.Generator().manual_seed(11)
    prev = torch.get_num_threads()
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for hd, nh, nkv in ((64, 4, 1), (32, 8, 1), (128, 8, 2), (256, 8, 2), (64, 6, 2), (80, 4, 2)):
                pos0, T = 700, 5
                K = torch.randn(nkv, pos0 + T + 2, hd, generator=g).to(dtype)
                V = torch.randn(nkv, pos0 + T + 2, hd, generator=g).to(dtype)
                q = torch.randn(T, nh, hd, generator=g)
                torch.set_num_threads(1)
                y = attend(q, K, V, pos0, hd ** -0.5)  # [T, nh * hd]
                rep = nh // nkv
                alone = attend(q, K.repeat_interleave(rep, 0).contiguous(), V.repeat_interleave(rep, 0).contiguous(),
                               pos0, hd ** -0.5)
                assert torch.equal(y, alone), (dtype, hd, nh, nkv)
                for t in range(T):  # a row alone == the row in the batch
                    assert torch.equal(attend(q[t:t + 1], K, V, pos0 + t, hd ** -0.5)[0], y[t]), (hd, t)
                torch.set_num_threads(2)
                assert torch.equal(attend(q, K, V, pos0, hd ** -0.5), y)
                kf, vf = K.float().repeat_interleave(rep, 0), V.float().repeat_interleave(rep, 0)
                for t in range(T):
                    s = torch.einsum("hd,hkd->hk", q[t], kf[:, :pos0 + t + 1]) * hd ** -0.5
                    ref = torch.einsum("hk,hkd->hd", torch.softmax(s, -1), vf[:, :pos0 + t + 1]).reshape(-1)
                    assert torch.allclose(y[t].float(), ref, atol=1e-4, rtol=1e-4), (dtype, hd, t)
    finally:
        torch.set_num_threads(prev)


def test_attend_rows_softmax_weights_underflow_and_nan():
    """The vectorized softmax weights: a key whose score is more than 87 below the best one weighs
    exactly 0 (one dominant key returns its value row bit for bit), every context length (the
    partial last vector of keys included) stays close to fp32 softmax, and a NaN score gives NaN,
    never a silently finite output."""
    if not rowmm_available():
        pytest.skip("no fixed-order kernel on this CPU / without a compiler")
    from mtplx.backends.torch import kernels

    attend = kernels.get_fused().attend_rows
    g = torch.Generator().manual_seed(5)
    hd, nh = 64, 4
    for n in (1, 7, 16, 17, 33, 250):
        K = torch.randn(1, n, hd, generator=g)
        V = torch.randn(1, n, hd, generator=g)
        q = torch.randn(1, nh, hd, generator=g)
        y = attend(q, K, V, n - 1, hd ** -0.5)[0].view(nh, hd)
        s = torch.einsum("hd,kd->hk", q[0], K[0]) * hd ** -0.5
        ref = torch.softmax(s, -1) @ V[0]
        assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5), n
        big = K.clone()
        big[0, n // 2] = q[0, 0] * 1e3  # head 0: this key's score is far above every other one
        y = attend(q, big, V, n - 1, hd ** -0.5)[0].view(nh, hd)
        assert torch.equal(y[0], V[0, n // 2]), n
        qn = q.clone()
        qn[0, 1, 3] = float("nan")
        y = attend(qn, K, V, n - 1, hd ** -0.5)[0].view(nh, hd)
        assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any(), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K", [(37, 67), (256, 128), (1000, 300)])
def test_exact_linear_rows_independent_of_row_count(dtype, N, K):
    """The pure-torch fallback's matmul: a row's result is the same bits for 1..16 rows, wherever
    the row sits among the others (MKL's fp32 kernel differs by row count, 8 rows included on
    Intel CPUs: exact_linear runs fp32 rows in calls of exactly ROW_GROUP rows)."""
    from mtplx.backends.torch.model import exact_linear

    g = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=g).to(dtype)
    x = torch.randn(1, K, generator=g).to(dtype)
    ref = exact_linear(x, w)[0]
    for m in range(2, 17):
        for pos in sorted({0, m // 2, m - 1}):
            xx = torch.randn(m, K, generator=g).to(dtype)
            xx[pos] = x[0]
            y = exact_linear(xx, w)
            assert y.shape == (m, N)
            assert torch.equal(y[pos], ref), f"{dtype} {N}x{K}: row {pos} of {m} differs from 1 row"
    torch.testing.assert_close(ref.float(), (x.float() @ w.float().T)[0], rtol=2e-2, atol=2e-2)
