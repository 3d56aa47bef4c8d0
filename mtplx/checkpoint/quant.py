"""MLX affine quantization in numpy, bit-compatible with `mlx.core.quantize` (mode "affine").

Per row, per contiguous group of `group_size` input columns: w ~ scales * q + biases with
q in [0, 2^bits - 1]. The group's larger-magnitude edge is represented exactly:
    scale = +-(max - min) / n_bins (signed so that edge / scale >= 0), q0 = round(edge / scale),
    scale = edge / q0 if q0 != 0, bias = edge (or 0 when q0 == 0).
Rounding is half to even (np.rint; checked bit for bit against mlx 0.32 on CPU); codes are computed in fp32, then scales/biases are cast to
the weight's dtype. Codes are packed little-endian into uint32 along the last axis
(32 // bits codes per word, the first code in the lowest bits).

Shapes: w [..., N, K] -> packed [..., N, K * bits / 32] uint32, scales/biases [..., N, K / gs].
"""

from __future__ import annotations

import numpy as np

SUPPORTED_BITS = (2, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


def _check(bits: int, group_size: int, k: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"quantization bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size <= 0 or k % group_size:
        raise ValueError(f"last dimension {k} is not a multiple of group_size {group_size}")


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [..., K] (ints in [0, 2^bits)) -> uint32 [..., K * bits / 32]."""
    per = 32 // bits
    c = codes.astype(np.uint32).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = (np.arange(per, dtype=np.uint32) * bits).astype(np.uint32)
    return np.bitwise_or.reduce(c << shifts, axis=-1).astype(np.uint32)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint32 [..., W] -> codes uint32 [..., W * 32 / bits]."""
    per = 32 // bits
    p = np.asarray(packed, dtype=np.uint32)[..., None]
    shifts = (np.arange(per, dtype=np.uint32) * bits).astype(np.uint32)
    codes = (p >> shifts) & np.uint32((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def quantize(w: np.ndarray, group_size: int = 64, bits: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [..., K] (float) -> (packed uint32, scales, biases) as mx.quantize does."""
    w = np.asarray(w)
    k = w.shape[-1]
    _check(bits, group_size, k)
    out_dtype = w.dtype if w.dtype != np.float64 else np.dtype(np.float32)
    g = w.astype(np.float32).reshape(*w.shape[:-1], k // group_size, group_size)
    n_bins = np.float32((1 << bits) - 1)
    w_max = g.max(axis=-1, keepdims=True)
    w_min = g.min(axis=-1, keepdims=True)
    mask = np.abs(w_min) > np.abs(w_max)
    scales = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7)).astype(np.float32)
    scales = np.where(mask, scales, -scales)
    edge = np.where(mask, w_min, w_max)
    with np.errstate(divide="ignore", invalid="ignore"):
        q0 = np.rint(edge / scales)
        scales = np.where(q0 != 0, edge / np.where(q0 != 0, q0, 1), scales).astype(np.float32)
    biases = np.where(q0 == 0, np.float32(0), edge).astype(np.float32)
    q = np.clip(np.rint((g - biases) / scales), 0, n_bins).astype(np.uint32)
    packed = pack(q.reshape(w.shape), bits)
    return packed, scales[..., 0].astype(out_dtype), biases[..., 0].astype(out_dtype)


def dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int = 64,
               bits: int = 4, dtype=None) -> np.ndarray:
    """(packed [..., N, W], scales/biases [..., N, G]) -> w [..., N, W*32/bits] in `dtype`
    (default: the scales' dtype), computed as scales * q + biases in that dtype."""
    dtype = np.dtype(dtype or scales.dtype)
    q = unpack(packed, bits)
    k = q.shape[-1]
    _check(bits, group_size, k)
    qg = q.reshape(*q.shape[:-1], k // group_size, group_size).astype(dtype)
    s = np.asarray(scales).astype(dtype)[..., None]
    b = np.asarray(biases).astype(dtype)[..., None]
    return (qg * s + b).astype(dtype).reshape(*q.shape[:-1], k)


def infer_bits(weight_shape: tuple[int, ...], scales_shape: tuple[int, ...], group_size: int) -> int | None:
    """bits from packed weight [.., N, K*bits/32] and scales [.., N, K/gs] shapes, or None."""
    if not weight_shape or not scales_shape:
        return None
    k = scales_shape[-1] * group_size
    if k == 0 or (weight_shape[-1] * 32) % k:
        return None
    b = weight_shape[-1] * 32 // k
    return b if b in SUPPORTED_BITS or b in (3, 5, 6) else None
