"""numpy MLX-affine quantization: bit-identical to mlx.core.quantize / dequantize."""

import ml_dtypes
import numpy as np
import pytest

from mtplx.checkpoint.quant import dequantize, pack, quantize, unpack


def test_pack_roundtrip():
    rng = np.random.default_rng(0)
    for bits in (2, 4, 8):
        codes = rng.integers(0, 1 << bits, size=(3, 64)).astype(np.uint32)
        p = pack(codes, bits)
        assert p.shape == (3, 64 * bits // 32) and p.dtype == np.uint32
        np.testing.assert_array_equal(unpack(p, bits), codes)
    assert pack(np.array([[1, 2, 3, 4, 5, 6, 7, 8]]), 4)[0, 0] == 0x87654321


def test_matches_mlx():
    mx = pytest.importorskip("mlx.core")
    rng = np.random.default_rng(1)
    for dt, mdt in ((np.float32, mx.float32), (ml_dtypes.bfloat16, mx.bfloat16), (np.float16, mx.float16)):
        for bits in (4, 8):
            for gs in (32, 64, 128):
                w = (rng.standard_normal((8, 256)) * 0.05).astype(dt)
                w[0, :gs] = 0.0  # a constant group
                p, s, b = quantize(w, gs, bits)
                mw = mx.array(w.astype(np.float32)).astype(mdt)
                mp, ms, mb = mx.quantize(mw, group_size=gs, bits=bits)
                np.testing.assert_array_equal(p, np.array(mp))
                np.testing.assert_array_equal(s.astype(np.float32), np.array(ms.astype(mx.float32)))
                np.testing.assert_array_equal(b.astype(np.float32), np.array(mb.astype(mx.float32)))
                md = mx.dequantize(mp, ms, mb, group_size=gs, bits=bits).astype(mx.float32)
                np.testing.assert_array_equal(dequantize(p, s, b, gs, bits).astype(np.float32), np.array(md))
