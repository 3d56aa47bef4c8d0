"""Measure, on the running machine, what only that machine can show: is the MLX verify path
bit-identical to one-token decoding (the precondition of greedy MTP == depth 0)?

    python -m mtplx.backends.mlx.check MODEL_DIR [--dtype bfloat16] [--rows 4] [--row-bucket 4]

Prefills a random prompt, decodes `rows` tokens one at a time, verifies them in one pass on a
fresh session, and compares every row bit for bit; then runs greedy MTP at depth rows-1 against
depth 0. Exit status 0 when everything is identical.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def check_batch_invariance(model, rows: int = 4, prompt_len: int = 16, gen: int = 16, seed: int = 0) -> list[str]:
    """-> a list of failures (empty: verify == decode bit for bit, greedy MTP == depth 0)."""
    import mlx.core as mx

    from mtplx.decoding.params import SamplingParams

    V = model.cfg.vocab_size
    g = np.random.default_rng(seed)
    p = [int(x) for x in g.integers(0, V, prompt_len)]
    toks = [int(x) for x in g.integers(0, V, rows)]
    s = model.new_session()
    s.prefill(p)
    ref = []
    for t in toks:
        s.last = t
        ref.append(np.array(s.verify([])[0].astype(mx.float32)))
        s.commit(0, 0)
    s = model.new_session()
    s.prefill(p)
    s.last = toks[0]
    got = np.array(s.verify(toks[1:]).astype(mx.float32))
    fails = [f"verify row {i} of {rows} differs from decode (max |diff| {np.abs(got[i] - ref[i]).max():.3g})"
             for i in range(rows) if not np.array_equal(got[i], ref[i])]
    if model.head is not None:
        greedy = SamplingParams()

        def run(depth):
            s = model.new_session()
            rng = s.make_rng(0)
            s.prefill(p)
            out = [s.sample_first(greedy, rng)]
            while len(out) < gen:
                d, q = s.draft(depth, greedy, rng)
                r = s.verify(d)
                n, nxt = s.accept(r, d, q, greedy, rng)
                s.commit(n, nxt)
                out += d[:n] + [nxt]
            return out[:gen]

        base, mtp = run(0), run(rows - 1)
        if base != mtp:
            i = next(i for i, (a, b) in enumerate(zip(base, mtp)) if a != b)
            fails.append(f"greedy MTP depth {rows - 1} differs from depth 0 at token {i}")
    return fails


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mtplx.backends.mlx.check", description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--row-bucket", type=int, default=4, help="0 = no fixed row chunks (to see what they protect)")
    a = ap.parse_args(argv)
    from . import default_dtype, device_name, load_mlx_model

    m = load_mlx_model(a.model, a.dtype or default_dtype(), row_bucket=a.row_bucket or None)
    fails = check_batch_invariance(m, rows=a.rows)
    where = f"{device_name()}, {a.dtype or default_dtype()}, row_bucket={a.row_bucket or None}"
    if fails:
        print(f"NOT batch-invariant on this machine ({where}):\n  " + "\n  ".join(fails))
        return 1
    print(f"batch-invariant on this machine ({where}): verify == decode bit for bit, greedy MTP == depth 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
