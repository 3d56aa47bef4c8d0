"""Optional CPU kernel for the exact path: a few-row matmul whose per-row arithmetic is fixed.

`rowmm(x [M, K] fp32, w [N, K] fp32|bf16|fp16) -> y [M, N] fp32`: every output y[r, n] is ONE
fixed sequence of 8-lane FMAs over K followed by a fixed horizontal sum, whatever M, the other
rows, the blocking or the thread split. So verify rows are bit-identical to decode by
construction, and the weight matrix is streamed once for up to M rows (verify costs about what
decode costs while memory-bound). bf16/fp16 weights are widened in registers (AVX2 + FMA + F16C).

Built on first use with torch.utils.cpp_extension (needs a C++ compiler and ninja); when that
is not possible, or the CPU lacks AVX2/FMA, `get_rowmm()` returns None and the model keeps the
pure-torch exact path (row padding, see model.ROW_GROUP). Disable with MTPLX_NO_KERNEL=1.
"""

from __future__ import annotations

import os
import threading

import torch

_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

static inline __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 ld8(const at::BFloat16* p) {
  __m256i i = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(i, 16));
}
static inline __m256 ld8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// NB output columns x R rows; acc[j][r] is the whole dot product of w row n0+j and x row r.
template <typename W, int NB, int R>
static inline void tile(const float* x, int64_t K, const W* w, float* y, int64_t n0, int64_t ldy) {
  __m256 acc[NB][R];
  for (int j = 0; j < NB; j++) for (int r = 0; r < R; r++) acc[j][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 xv[R];
    for (int r = 0; r < R; r++) xv[r] = _mm256_loadu_ps(x + r * K + k);
    for (int j = 0; j < NB; j++) {
      __m256 wv = ld8(w + (n0 + j) * K + k);
      for (int r = 0; r < R; r++) acc[j][r] = _mm256_fmadd_ps(wv, xv[r], acc[j][r]);
    }
  }
  for (int j = 0; j < NB; j++) for (int r = 0; r < R; r++) y[r * ldy + n0 + j] = hsum8(acc[j][r]);
}

// Row tiles of 4 (2 columns at a time: 8 accumulators + 4 x + 1 w registers), then 3, 2 or 1.
// The tiling only decides which (n, r) pairs share a pass over w; each pair's arithmetic is the same.
template <typename W, int NB>
static inline void col_block(const float* x, int64_t M, int64_t K, const W* w, float* y, int64_t n0, int64_t N) {
  int64_t r = 0;
  for (; r + 4 <= M; r += 4) {
    if (NB % 2 == 0) { for (int j = 0; j < NB; j += 2) tile<W, 2, 4>(x + r * K, K, w, y + r * N, n0 + j, N); }
    else { for (int j = 0; j < NB; j++) tile<W, 1, 4>(x + r * K, K, w, y + r * N, n0 + j, N); }
  }
  if (M - r == 3) tile<W, NB, 3>(x + r * K, K, w, y + r * N, n0, N);
  else if (M - r == 2) tile<W, NB, 2>(x + r * K, K, w, y + r * N, n0, N);
  else if (M - r == 1) tile<W, NB, 1>(x + r * K, K, w, y + r * N, n0, N);
}

template <typename W>
static void run(const float* x, int64_t M, int64_t K, const W* w, float* y, int64_t N) {
  const int64_t NBLK = 4;
  int64_t nb = (N + NBLK - 1) / NBLK;
  at::parallel_for(0, nb, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
      int64_t n0 = b * NBLK;
      int64_t left = N - n0;
      if (left >= 4) col_block<W, 4>(x, M, K, w, y, n0, N);
      else for (int64_t j = 0; j < left; j++) col_block<W, 1>(x, M, K, w, y, n0 + j, N);
    }
  });
}

torch::Tensor rowmm(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "rowmm: x must be contiguous fp32 [M, K]");
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2 && w.size(1) == x.size(1), "rowmm: w must be contiguous [N, K]");
  TORCH_CHECK(x.size(1) % 8 == 0, "rowmm: K must be a multiple of 8");
  int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  if (w.dtype() == torch::kFloat32) run<float>(x.data_ptr<float>(), M, K, w.data_ptr<float>(), y.data_ptr<float>(), N);
  else if (w.dtype() == torch::kBFloat16) run<at::BFloat16>(x.data_ptr<float>(), M, K, w.data_ptr<at::BFloat16>(), y.data_ptr<float>(), N);
  else if (w.dtype() == torch::kFloat16) run<at::Half>(x.data_ptr<float>(), M, K, w.data_ptr<at::Half>(), y.data_ptr<float>(), N);
  else TORCH_CHECK(false, "rowmm: unsupported weight dtype");
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("rowmm", &rowmm, "fixed-order few-row matmul"); }
"""

_NAME = "mtplx_rowmm_v2"
_lock = threading.Lock()
_state: dict = {}


def _cpu_ok() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return all(f in flags for f in (" avx2", " fma", " f16c"))


def get_rowmm():
    """The compiled rowmm function, or None (no compiler / CPU support / disabled)."""
    with _lock:
        if "fn" in _state:
            return _state["fn"]
        fn = None
        if os.environ.get("MTPLX_NO_KERNEL", "") not in ("1", "true") and _cpu_ok():
            try:
                from torch.utils.cpp_extension import load_inline

                mod = load_inline(_NAME, cpp_sources=_SRC, functions=None,
                                  extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c"], verbose=False)
                fn = mod.rowmm
            except Exception as e:  # no compiler, no ninja, ...
                _state["error"] = f"{type(e).__name__}: {e}"
                fn = None
        _state["fn"] = fn
        return fn


def is_built() -> bool:
    """Whether the extension is already compiled in torch's extension cache (no build)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        d = _get_build_directory(_NAME, False)
        return any(f.endswith(".so") for f in os.listdir(d))
    except Exception:
        return False


def kernel_error() -> str | None:
    return _state.get("error")
