"""Shared helpers for the MLX-backend tests (no tests here). Tiny synthetic checkpoints from
mtplx.checkpoint.synthetic, loaded by the MLX loader (and, for parity, the torch loader)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mtplx.checkpoint.synthetic import write_synthetic_checkpoint  # noqa: E402
from mtplx.decoding.params import SamplingParams  # noqa: E402

_TMP = Path(tempfile.mkdtemp(prefix="mtplx_mlx_tests_"))
GREEDY = SamplingParams()

PRESETS = {"dense": "qwen3.5-0.8b", "dense_untied": "qwen3.5-9b", "moe": "qwen3.5-35b-a3b",
           "next": "qwen3-next-80b-a3b"}


@functools.lru_cache(maxsize=None)
def checkpoint(kind: str, layout: str = "hf", head: str = "embedded", head_layout: str | None = None,
               quantize: tuple | None = None, seed: int = 0, dtype: str = "float32"):
    name = f"{kind}-{layout}-{head}-{head_layout}-{quantize}-{seed}-{dtype}".replace(" ", "")
    return write_synthetic_checkpoint(_TMP / name, PRESETS[kind], layout=layout, head=head, head_layout=head_layout,
                                      quantize=quantize, seed=seed, dtype=dtype)


@functools.lru_cache(maxsize=None)
def mlx_model(kind: str, layout: str = "hf", head: str = "embedded", head_layout: str | None = None,
              quantize: tuple | None = None, seed: int = 0, row_bucket: int | None = 4):
    from mtplx.backends.mlx import load_mlx_model

    ck = checkpoint(kind, layout, head, head_layout, quantize, seed)
    return load_mlx_model(ck.path, "float32", row_bucket=row_bucket)


def prompt(n: int, seed: int = 0, vocab: int = 512) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(3, vocab, n)]


def arr(x) -> np.ndarray:
    return np.array(x.astype(mx.float32)) if x.dtype == mx.bfloat16 else np.array(x)


def decode_chain(m, p, toks):
    """Prefill p, then decode toks one at a time (depth 0): logits [len(toks), V] (numpy)."""
    s = m.new_session()
    s.prefill(p)
    out = []
    for t in toks:
        s.last = t
        out.append(arr(s.verify([])[0]))
        s.commit(0, 0)
    return np.stack(out), s


def generate(m, p, depth, n, drafts=None, params=GREEDY, seed=0):
    """The decoding loop by hand; `drafts(i, depth)` may override the head's drafts (oracle)."""
    s = m.new_session()
    rng = s.make_rng(seed)
    s.prefill(p)
    out = [s.sample_first(params, rng)]
    accepted = []
    while len(out) < n:
        d, q = s.draft(depth, params, rng)
        if drafts is not None:
            d, q = drafts(len(out), depth), None
        rows = s.verify(d)
        a, nxt = s.accept(rows, d, q, params, rng)
        s.commit(a, nxt)
        accepted.append(a)
        out += d[:a] + [nxt]
    return out[:n], accepted
