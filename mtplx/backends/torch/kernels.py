"""CPU kernel of the exact path: a few-row matmul whose per-row arithmetic is fixed.

`rowmm(x [M, K] fp32, w [N, K] fp32|bf16|fp16|int8, scale [N] fp32 or empty) -> y [M, N] fp32`:
every output y[r, n] is ONE fixed sequence of L-lane FMAs over K (a zero-padded last chunk when
K is not a multiple of L), then a fixed horizontal sum (then * scale[n] for int8), whatever M,
the other rows, the tiling or the thread split. So verify rows are bit-identical to decode by
construction, and each weight tile is read from memory once for all M rows (the other row
groups find it in cache): verify costs about what decode costs while memory-bound.

Builds of one source, chosen at run time from the CPU's flags:
  avx512bf16  the avx512 build + bf16 x bf16 matmuls by AVX512-BF16 dot products (`rowmm_bf16`,
              bf16 models: their activations are bf16, so no input is rounded);
  avx512      L = 16 (AVX-512 F/BW + FMA + F16C), 4 x 4 register tiles;
  avx2        L = 8 (AVX2 + FMA + F16C), 4 x 2 tiles.
The two give different bits from each other (lane count), never within one process.
`MTPLX_KERNEL_ISA=avx2` forces the AVX2 build; `MTPLX_NO_KERNEL=1` disables the kernel (the
model keeps the pure-torch exact path: row padding, model.ROW_GROUP); other CPUs (ARM, old
x86) get that fallback too.

Threads: columns are split across torch's intra-op threads (OpenMP), in chunks of at least
PAR_MIN_BYTES of weight, so the default model's tiny matrices stay on one thread (a fork costs
more than they do) while the 0.8B shape's matrices use every thread.

Built on first use with torch.utils.cpp_extension (a C++ compiler and ninja; ~40 s, cached in
torch's extension folder). Why not a prebuilt wheel: a torch C++ extension is tied to the exact
torch version it was built against, and mtplx accepts a range of torch versions.
"""

from __future__ import annotations

import os
import sys
import threading

import torch

PAR_MIN_BYTES = int(os.environ.get("MTPLX_KERNEL_PAR_BYTES", 256 << 10))

_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(MTPLX_AVX512)
typedef __m512 V;
#define LANES 16
#define NB4 4   // columns per tile when 4 rows share it (16 accumulators of 32 registers)
#define NB3 4
static inline V vzero() { return _mm512_setzero_ps(); }
static inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
static inline V ldx(const float* p) { return _mm512_loadu_ps(p); }
static inline V ldw(const float* p) { return _mm512_loadu_ps(p); }
static inline V ldw(const at::BFloat16* p) {
  __m512i i = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(i, 16));
}
static inline V ldw(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline V ldw(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
static inline __m256 fold(V v) { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)); }
#else
typedef __m256 V;
#define LANES 8
#define NB4 2   // 8 accumulators of 16 registers
#define NB3 2
static inline V vzero() { return _mm256_setzero_ps(); }
static inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
static inline V ldx(const float* p) { return _mm256_loadu_ps(p); }
static inline V ldw(const float* p) { return _mm256_loadu_ps(p); }
static inline V ldw(const at::BFloat16* p) {
  __m256i i = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(i, 16));
}
static inline V ldw(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline V ldw(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
static inline __m256 fold(V v) { return v; }
#endif

static inline float hsum(V v) {
  __m256 h = fold(v);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// NB columns x R rows. x rows are zero-padded to Kp (a multiple of LANES); a weight row's
// last partial chunk is copied into a zeroed buffer. acc[j][r] is the whole dot product.
template <typename W, int NB, int R>
static inline void tile(const float* x, int64_t Kp, int64_t K, const W* w, float* y, int64_t ldy, const float* scale) {
  V acc[NB][R];
  for (int j = 0; j < NB; j++) for (int r = 0; r < R; r++) acc[j][r] = vzero();
  const int64_t Km = K - K % LANES;
  for (int64_t k = 0; k < Km; k += LANES) {
    V xv[R];
    for (int r = 0; r < R; r++) xv[r] = ldx(x + r * Kp + k);
    for (int j = 0; j < NB; j++) {
      V wv = ldw(w + j * K + k);
      for (int r = 0; r < R; r++) acc[j][r] = vfma(wv, xv[r], acc[j][r]);
    }
  }
  if (Km < K) {
    V xv[R];
    for (int r = 0; r < R; r++) xv[r] = ldx(x + r * Kp + Km);
    for (int j = 0; j < NB; j++) {
      alignas(64) unsigned char buf[LANES * sizeof(W)] = {0};
      std::memcpy(buf, w + j * K + Km, (K - Km) * sizeof(W));
      V wv = ldw(reinterpret_cast<const W*>(buf));
      for (int r = 0; r < R; r++) acc[j][r] = vfma(wv, xv[r], acc[j][r]);
    }
  }
  for (int j = 0; j < NB; j++)
    for (int r = 0; r < R; r++) {
      float s = hsum(acc[j][r]);
      y[r * ldy + j] = scale ? s * scale[j] : s;
    }
}

// nc (<= 8) columns starting at w / y for R rows: tiles of NB columns, then single columns.
template <typename W, int NB, int R>
static inline void cols(const float* x, int64_t Kp, int64_t K, const W* w, float* y, int64_t ldy,
                        const float* scale, int64_t nc) {
  int64_t j = 0;
  for (; j + NB <= nc; j += NB) tile<W, NB, R>(x, Kp, K, w + j * K, y + j, ldy, scale ? scale + j : nullptr);
  for (; j < nc; j++) tile<W, 1, R>(x, Kp, K, w + j * K, y + j, ldy, scale ? scale + j : nullptr);
}

// Columns [c0, c1) for all M rows, 8 columns at a time: the 8 weight rows stay in cache while
// every row group passes over them.
template <typename W>
static void run_cols(const float* x, int64_t M, int64_t Kp, int64_t K, const W* w, float* y, int64_t N,
                     const float* scale, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; c += 8) {
    const int64_t nc = std::min<int64_t>(8, c1 - c);
    const W* wc = w + c * K;
    const float* sc = scale ? scale + c : nullptr;
    int64_t r = 0;
    for (; r + 4 <= M; r += 4) cols<W, NB4, 4>(x + r * Kp, Kp, K, wc, y + r * N + c, N, sc, nc);
    const int64_t left = M - r;
    if (left == 3) cols<W, NB3, 3>(x + r * Kp, Kp, K, wc, y + r * N + c, N, sc, nc);
    else if (left == 2) cols<W, 4, 2>(x + r * Kp, Kp, K, wc, y + r * N + c, N, sc, nc);
    else if (left == 1) cols<W, 8, 1>(x + r * Kp, Kp, K, wc, y + r * N + c, N, sc, nc);
  }
}

template <typename W>
static void run(const float* x, int64_t M, int64_t Kp, int64_t K, const W* w, float* y, int64_t N,
                const float* scale, int64_t par_bytes) {
  const int64_t blocks = (N + 7) / 8;
  const int64_t block_bytes = 8 * K * (int64_t)sizeof(W);
  const int64_t grain = std::max<int64_t>(1, par_bytes / std::max<int64_t>(block_bytes, 1));
  if (blocks <= grain || at::get_num_threads() == 1) {
    run_cols<W>(x, M, Kp, K, w, y, N, scale, 0, N);
    return;
  }
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    run_cols<W>(x, M, Kp, K, w, y, N, scale, b0 * 8, std::min<int64_t>(N, b1 * 8));
  });
}

torch::Tensor rowmm(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t par_bytes) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "rowmm: x must be fp32 [M, K]");
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2 && w.size(1) == x.size(1), "rowmm: w must be contiguous [N, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const int64_t Kp = (K + LANES - 1) / LANES * LANES;
  torch::Tensor xp = x.contiguous();
  if (Kp != K) xp = torch::constant_pad_nd(xp, {0, Kp - K}, 0.0);
  auto y = torch::empty({M, N}, x.options());
  const float* sc = nullptr;
  if (scale.numel()) {
    TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == N, "rowmm: scale must be fp32 [N]");
    sc = scale.data_ptr<float>();
  }
  const float* xd = xp.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  if (w.dtype() == torch::kFloat32) run<float>(xd, M, Kp, K, w.data_ptr<float>(), yd, N, sc, par_bytes);
  else if (w.dtype() == torch::kBFloat16) run<at::BFloat16>(xd, M, Kp, K, w.data_ptr<at::BFloat16>(), yd, N, sc, par_bytes);
  else if (w.dtype() == torch::kFloat16) run<at::Half>(xd, M, Kp, K, w.data_ptr<at::Half>(), yd, N, sc, par_bytes);
  else if (w.dtype() == torch::kInt8) run<int8_t>(xd, M, Kp, K, w.data_ptr<int8_t>(), yd, N, sc, par_bytes);
  else TORCH_CHECK(false, "rowmm: unsupported weight dtype");
  return y;
}

// ---- bf16 activations x bf16 weights with AVX512-BF16 dot products (bf16 models) ----
// Each output: one fixed sequence of vdpbf16ps over K in chunks of 32 (pairs of exact bf16
// products added to the fp32 lane in a fixed order), a zero-padded last chunk, then the same
// horizontal sum: as row-invariant as rowmm, with a third of its instructions per weight.
#if defined(MTPLX_AVX512BF16)
template <int NB, int R>
static inline void tile_dot(const at::BFloat16* x, int64_t Kp, int64_t K, const at::BFloat16* w, float* y, int64_t ldy) {
  __m512 acc[NB][R];
  for (int j = 0; j < NB; j++) for (int r = 0; r < R; r++) acc[j][r] = _mm512_setzero_ps();
  const int64_t Km = K - K % 32;
  for (int64_t k = 0; k < Km; k += 32) {
    __m512bh xv[R];
    for (int r = 0; r < R; r++) xv[r] = (__m512bh)_mm512_loadu_si512((const void*)(x + r * Kp + k));
    for (int j = 0; j < NB; j++) {
      __m512bh wv = (__m512bh)_mm512_loadu_si512((const void*)(w + j * K + k));
      for (int r = 0; r < R; r++) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], wv, xv[r]);
    }
  }
  if (Km < K) {
    __m512bh xv[R];
    for (int r = 0; r < R; r++) xv[r] = (__m512bh)_mm512_loadu_si512((const void*)(x + r * Kp + Km));
    for (int j = 0; j < NB; j++) {
      alignas(64) uint16_t buf[32] = {0};
      std::memcpy(buf, w + j * K + Km, (K - Km) * sizeof(uint16_t));
      __m512bh wv = (__m512bh)_mm512_loadu_si512((const void*)buf);
      for (int r = 0; r < R; r++) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], wv, xv[r]);
    }
  }
  for (int j = 0; j < NB; j++) for (int r = 0; r < R; r++) y[r * ldy + j] = hsum(acc[j][r]);
}

template <int NB, int R>
static inline void cols_dot(const at::BFloat16* x, int64_t Kp, int64_t K, const at::BFloat16* w, float* y,
                            int64_t ldy, int64_t nc) {
  int64_t j = 0;
  for (; j + NB <= nc; j += NB) tile_dot<NB, R>(x, Kp, K, w + j * K, y + j, ldy);
  for (; j < nc; j++) tile_dot<1, R>(x, Kp, K, w + j * K, y + j, ldy);
}

static void run_cols_dot(const at::BFloat16* x, int64_t M, int64_t Kp, int64_t K, const at::BFloat16* w, float* y,
                         int64_t N, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; c += 8) {
    const int64_t nc = std::min<int64_t>(8, c1 - c);
    const at::BFloat16* wc = w + c * K;
    int64_t r = 0;
    for (; r + 4 <= M; r += 4) cols_dot<4, 4>(x + r * Kp, Kp, K, wc, y + r * N + c, N, nc);
    const int64_t left = M - r;
    if (left == 3) cols_dot<4, 3>(x + r * Kp, Kp, K, wc, y + r * N + c, N, nc);
    else if (left == 2) cols_dot<4, 2>(x + r * Kp, Kp, K, wc, y + r * N + c, N, nc);
    else if (left == 1) cols_dot<8, 1>(x + r * Kp, Kp, K, wc, y + r * N + c, N, nc);
  }
}

torch::Tensor rowmm_bf16(torch::Tensor x, torch::Tensor w, int64_t par_bytes) {
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.dim() == 2, "rowmm_bf16: x must be bf16 [M, K]");
  TORCH_CHECK(w.dtype() == torch::kBFloat16 && w.is_contiguous() && w.size(1) == x.size(1), "rowmm_bf16: w bf16 [N, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), Kp = (K + 31) / 32 * 32;
  torch::Tensor xp = x.contiguous();
  if (Kp != K) xp = torch::constant_pad_nd(xp, {0, Kp - K}, 0.0);
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
  const at::BFloat16* xd = xp.data_ptr<at::BFloat16>();
  const at::BFloat16* wd = w.data_ptr<at::BFloat16>();
  float* yd = y.data_ptr<float>();
  const int64_t blocks = (N + 7) / 8, grain = std::max<int64_t>(1, par_bytes / std::max<int64_t>(8 * K * 2, 1));
  if (blocks <= grain || at::get_num_threads() == 1) run_cols_dot(xd, M, Kp, K, wd, yd, N, 0, N);
  else at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    run_cols_dot(xd, M, Kp, K, wd, yd, N, b0 * 8, std::min<int64_t>(N, b1 * 8));
  });
  return y;
}
#endif

// ---- the GatedDeltaNet step between its two projections, fused (decode / verify, one sequence) ----
// Per position t, in this fixed order: depthwise causal conv (K taps, oldest first) + SiLU; q / k
// L2-normalised per key head (q scaled by dk^-0.5); per value head: beta = sigmoid(b), decay =
// exp(-exp(A_log) * softplus(a + dt_bias)); S = decay * S; delta = (v - k S) * beta; S += k^T delta;
// o = q S; then o * rsqrt(mean(o^2) + eps) * gnorm * silu(z). Plain loops: sums run in index
// order (no -ffast-math, so no reassociation), so a position's bits never depend on T.
static inline float silu_f(float x) { return x / (1.0f + std::exp(-x)); }
static inline float softplus_f(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

std::vector<torch::Tensor> gdn_core(torch::Tensor mixed, torch::Tensor b, torch::Tensor a, torch::Tensor z,
                                    torch::Tensor conv_state, torch::Tensor conv_w, torch::Tensor A_log,
                                    torch::Tensor dt_bias, torch::Tensor S0, torch::Tensor gnorm,
                                    int64_t nk, int64_t dk, int64_t dv, double eps_d) {
  for (auto* t : {&mixed, &b, &a, &z, &conv_state, &conv_w, &A_log, &dt_bias, &S0, &gnorm})
    TORCH_CHECK(t->dtype() == torch::kFloat32 && t->is_contiguous(), "gdn_core: fp32 contiguous inputs");
  const int64_t T = mixed.size(0), C = mixed.size(1), K1 = conv_state.size(0), K = K1 + 1;
  const int64_t nv = A_log.size(0), r = nv / nk, key_dim = nk * dk;
  const float eps = (float)eps_d, qscale = 1.0f / std::sqrt((float)dk);
  auto y = torch::empty({T, nv * dv}, mixed.options());
  auto states = torch::empty({T, nv, dk, dv}, mixed.options());
  std::vector<float> act(C), qn(key_dim), kn(key_dim), ks(dv), o(dv);
  const float *X = mixed.data_ptr<float>(), *P = conv_state.data_ptr<float>(), *W = conv_w.data_ptr<float>();
  const float *B = b.data_ptr<float>(), *Aa = a.data_ptr<float>(), *Z = z.data_ptr<float>();
  const float *Al = A_log.data_ptr<float>(), *Dt = dt_bias.data_ptr<float>(), *G = gnorm.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  float* St = states.data_ptr<float>();
  const float* Sprev = S0.data_ptr<float>();
  for (int64_t t = 0; t < T; t++) {
    for (int64_t c = 0; c < C; c++) {  // window rows t..t+K-1 of [state; mixed]
      float acc = 0.0f;
      for (int64_t j = 0; j < K; j++) {
        const int64_t row = t + j;
        const float xv = row < K1 ? P[row * C + c] : X[(row - K1) * C + c];
        acc = j == 0 ? xv * W[c * K] : acc + xv * W[c * K + j];
      }
      act[c] = silu_f(acc);
    }
    for (int64_t h = 0; h < nk; h++) {
      float sq = 0.0f, sk = 0.0f;
      for (int64_t i = 0; i < dk; i++) { float q = act[h * dk + i], k = act[key_dim + h * dk + i]; sq += q * q; sk += k * k; }
      const float rq = 1.0f / std::sqrt(sq + 1e-6f), rk = 1.0f / std::sqrt(sk + 1e-6f);
      for (int64_t i = 0; i < dk; i++) { qn[h * dk + i] = act[h * dk + i] * rq * qscale; kn[h * dk + i] = act[key_dim + h * dk + i] * rk; }
    }
    float* Snow = St + t * nv * dk * dv;
    for (int64_t hv = 0; hv < nv; hv++) {
      const float* q = &qn[(hv / r) * dk];
      const float* k = &kn[(hv / r) * dk];
      const float* v = &act[2 * key_dim + hv * dv];
      const float beta = 1.0f / (1.0f + std::exp(-B[t * nv + hv]));
      const float decay = std::exp(-std::exp(Al[hv]) * softplus_f(Aa[t * nv + hv] + Dt[hv]));
      const float* S = Sprev + hv * dk * dv;
      float* Sn = Snow + hv * dk * dv;
      for (int64_t i = 0; i < dk * dv; i++) Sn[i] = S[i] * decay;
      for (int64_t j = 0; j < dv; j++) ks[j] = 0.0f;
      for (int64_t i = 0; i < dk; i++) for (int64_t j = 0; j < dv; j++) ks[j] += k[i] * Sn[i * dv + j];
      for (int64_t j = 0; j < dv; j++) ks[j] = (v[j] - ks[j]) * beta;  // delta
      for (int64_t i = 0; i < dk; i++) for (int64_t j = 0; j < dv; j++) Sn[i * dv + j] += k[i] * ks[j];
      for (int64_t j = 0; j < dv; j++) o[j] = 0.0f;
      for (int64_t i = 0; i < dk; i++) for (int64_t j = 0; j < dv; j++) o[j] += q[i] * Sn[i * dv + j];
      float ms = 0.0f;
      for (int64_t j = 0; j < dv; j++) ms += o[j] * o[j];
      const float rn = 1.0f / std::sqrt(ms / (float)dv + eps);
      for (int64_t j = 0; j < dv; j++) Y[t * nv * dv + hv * dv + j] = o[j] * rn * G[j] * silu_f(Z[t * nv * dv + hv * dv + j]);
    }
    Sprev = Snow;
  }
  return {y, states};
}

// ---- RMS norm of rows: x [N, D] (any float dtype) -> x * rsqrt(mean(x^2) + eps) * w, fp32 math ----
torch::Tensor rms_rows(torch::Tensor x, torch::Tensor w, double eps_d) {
  TORCH_CHECK(w.dtype() == torch::kFloat32 && w.is_contiguous(), "rms_rows: w must be fp32");
  auto xf = x.to(torch::kFloat32).contiguous();
  const int64_t D = xf.size(-1), N = xf.numel() / D;
  auto y = torch::empty_like(xf);
  const float *X = xf.data_ptr<float>(), *W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const float eps = (float)eps_d, inv_d = 1.0f / (float)D;
  for (int64_t n = 0; n < N; n++) {
    const float* xr = X + n * D;
    float ss = 0.0f;
    for (int64_t i = 0; i < D; i++) ss += xr[i] * xr[i];
    const float r = 1.0f / std::sqrt(ss * inv_d + eps);
    for (int64_t i = 0; i < D; i++) Y[n * D + i] = xr[i] * r * W[i];
  }
  return y.to(x.dtype());
}

// ---- MoE (all experts evaluated, the exact path's dense form) between its two matmuls ----
// y [N, E + 1 + E*2I + 2Is] = router logits | shared gate | each expert's gate|up | the shared
// expert's gate|up (fp32) -> activations [N, E*I + Is] in `out_dtype`: fp32 softmax over the E
// logits, top-k (ties: lower index), optional renormalisation, silu(gate) * up * routing weight
// (0 for experts not picked), sigmoid(shared gate) for the shared expert.
torch::Tensor moe_act(torch::Tensor y, int64_t E, int64_t I, int64_t Is, int64_t topk, bool renorm,
                      at::ScalarType out_dtype) {
  TORCH_CHECK(y.dtype() == torch::kFloat32 && y.is_contiguous() && y.dim() == 2, "moe_act: y fp32 [N, W]");
  const int64_t N = y.size(0), Wd = y.size(1);
  TORCH_CHECK(Wd == E + 1 + E * 2 * I + 2 * Is, "moe_act: width mismatch");
  auto act = torch::empty({N, E * I + Is}, y.options());
  std::vector<float> p(E), w(E);
  std::vector<int64_t> pick(topk);
  const float* Yd = y.data_ptr<float>();
  float* A = act.data_ptr<float>();
  for (int64_t n = 0; n < N; n++) {
    const float* row = Yd + n * Wd;
    float mx = row[0];
    for (int64_t e = 1; e < E; e++) mx = std::max(mx, row[e]);
    float sum = 0.0f;
    for (int64_t e = 0; e < E; e++) { p[e] = std::exp(row[e] - mx); sum += p[e]; }
    for (int64_t e = 0; e < E; e++) { p[e] = p[e] / sum; w[e] = 0.0f; }
    float wsum = 0.0f;
    for (int64_t j = 0; j < topk; j++) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; e++) {
        bool used = false;
        for (int64_t u = 0; u < j; u++) used |= pick[u] == e;
        if (!used && (best < 0 || p[e] > p[best])) best = e;
      }
      pick[j] = best;
      wsum += p[best];
    }
    for (int64_t j = 0; j < topk; j++) w[pick[j]] = renorm ? p[pick[j]] / wsum : p[pick[j]];
    const float* gu = row + E + 1;
    float* out = A + n * (E * I + Is);
    for (int64_t e = 0; e < E; e++) {
      const float* g = gu + e * 2 * I;
      for (int64_t i = 0; i < I; i++) out[e * I + i] = w[e] == 0.0f ? 0.0f : silu_f(g[i]) * g[I + i] * w[e];
    }
    const float sg = 1.0f / (1.0f + std::exp(-row[E]));
    const float* gs = gu + E * 2 * I;
    for (int64_t i = 0; i < Is; i++) out[E * I + i] = silu_f(gs[i]) * gs[Is + i] * sg;
  }
  return act.to(out_dtype);
}

// ---- attention of few query rows over a KV cache (the exact path's decode / verify) ----
// q [T, nh, hd] at positions pos0.., K / V [nkv, cap, hd] -> o [T, nh * hd] (fp32). Row t, head h
// attends to keys 0..pos0+t of KV head h / (nh / nkv): scores by L-lane FMAs over hd and a fixed
// horizontal sum, max, exp, the sum of weights in key order, then the weighted values in key
// order. Each (t, h) is computed on its own, so the rows of a verify equal one-token decodes.
template <typename KV>
static void attend_one(const float* q, const KV* Kc, const KV* Vc, int64_t n_keys, int64_t hd, float scale,
                       float* out, std::vector<float>& sc) {
  sc.resize(n_keys);
  const int64_t hm = hd - hd % LANES;
  float mx = -INFINITY;
  for (int64_t j = 0; j < n_keys; j++) {
    const KV* kr = Kc + j * hd;
    V acc = vzero();
    for (int64_t d = 0; d < hm; d += LANES) acc = vfma(ldw(kr + d), ldx(q + d), acc);
    float s = hsum(acc);
    for (int64_t d = hm; d < hd; d++) s += (float)kr[d] * q[d];
    s *= scale;
    sc[j] = s;
    mx = std::max(mx, s);
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < n_keys; j++) { sc[j] = std::exp(sc[j] - mx); sum += sc[j]; }
  for (int64_t d = 0; d < hd; d++) out[d] = 0.0f;
  for (int64_t j = 0; j < n_keys; j++) {
    const KV* vr = Vc + j * hd;
    const float wj = sc[j];
    for (int64_t d = 0; d < hd; d++) out[d] += wj * (float)vr[d];
  }
  const float inv = 1.0f / sum;
  for (int64_t d = 0; d < hd; d++) out[d] *= inv;
}

template <typename KV>
static void attend_all(const float* q, const KV* Kc, const KV* Vc, float* o, int64_t T, int64_t nh, int64_t nkv,
                       int64_t hd, int64_t cap, int64_t pos0, float scale) {
  const int64_t g = nh / nkv, pairs = T * nh;
  const int64_t work = (pos0 + T) * hd;  // key-dims per pair, about
  const int64_t grain = std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(work, 1));
  auto body = [&](int64_t b0, int64_t b1) {
    std::vector<float> sc;
    for (int64_t pi = b0; pi < b1; pi++) {
      const int64_t t = pi / nh, h = pi % nh, kv = h / g;
      attend_one<KV>(q + (t * nh + h) * hd, Kc + kv * cap * hd, Vc + kv * cap * hd, pos0 + t + 1, hd, scale,
                     o + (t * nh + h) * hd, sc);
    }
  };
  if (pairs <= grain || at::get_num_threads() == 1) body(0, pairs);
  else at::parallel_for(0, pairs, grain, body);
}

torch::Tensor attend_rows(torch::Tensor q, torch::Tensor K, torch::Tensor Vt, int64_t pos0, double scale) {
  TORCH_CHECK(K.is_contiguous() && Vt.is_contiguous() && K.dim() == 3 && K.dtype() == Vt.dtype(), "attend_rows: K/V [nkv, cap, hd]");
  auto qf = q.to(torch::kFloat32).contiguous();
  const int64_t T = qf.size(0), nh = qf.size(1), hd = qf.size(2), nkv = K.size(0), cap = K.size(1);
  TORCH_CHECK(pos0 + T <= cap && K.size(2) == hd && nh % nkv == 0, "attend_rows: shapes");
  auto o = torch::empty({T, nh * hd}, qf.options());
  const float* Q = qf.data_ptr<float>();
  float* O = o.data_ptr<float>();
  const float sc = (float)scale;
  if (K.dtype() == torch::kFloat32) attend_all<float>(Q, K.data_ptr<float>(), Vt.data_ptr<float>(), O, T, nh, nkv, hd, cap, pos0, sc);
  else if (K.dtype() == torch::kBFloat16) attend_all<at::BFloat16>(Q, K.data_ptr<at::BFloat16>(), Vt.data_ptr<at::BFloat16>(), O, T, nh, nkv, hd, cap, pos0, sc);
  else if (K.dtype() == torch::kFloat16) attend_all<at::Half>(Q, K.data_ptr<at::Half>(), Vt.data_ptr<at::Half>(), O, T, nh, nkv, hd, cap, pos0, sc);
  else TORCH_CHECK(false, "attend_rows: unsupported cache dtype");
  return o.to(q.dtype());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#if defined(MTPLX_AVX512BF16)
  m.def("rowmm_bf16", &rowmm_bf16, "bf16 x bf16 few-row matmul by AVX512-BF16 dot products");
#endif
  m.def("attend_rows", &attend_rows, "few-row attention over a KV cache, fixed order per row");
  m.def("rowmm", &rowmm, "fixed-order few-row matmul");
  m.def("gdn_core", &gdn_core, "fused GatedDeltaNet step between its projections");
  m.def("rms_rows", &rms_rows, "RMS norm of rows, fp32 math, fixed order");
  m.def("moe_act", &moe_act, "dense MoE routing and activations between the two matmuls");
}
"""

_ISA_FLAGS = {
    "avx512bf16": (("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma", "f16c"),
                   ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-mf16c",
                    "-DMTPLX_AVX512", "-DMTPLX_AVX512BF16"]),
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"),
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DMTPLX_AVX512"]),
    "avx2": (("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"]),
}
_VERSION = "v7"
_lock = threading.Lock()
_state: dict = {}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def kernel_isa() -> str | None:
    """The instruction set the kernel is built for on this CPU, or None (no usable one)."""
    flags = _cpu_flags()
    forced = os.environ.get("MTPLX_KERNEL_ISA", "").strip().lower()
    order = [forced] if forced else ["avx512bf16", "avx512", "avx2"]
    for isa in order:
        if isa in _ISA_FLAGS and all(f in flags for f in _ISA_FLAGS[isa][0]):
            return isa
    return None


def _name(isa: str) -> str:
    return f"mtplx_rowmm_{_VERSION}_{isa}"


def get_rowmm():
    """rowmm(x, w, scale=None) -> y, compiled for this CPU; None when unavailable (no compiler,
    no AVX2, not x86, MTPLX_NO_KERNEL=1)."""
    with _lock:
        if "fn" in _state:
            return _state["fn"]
        fn, isa = None, kernel_isa()
        if os.environ.get("MTPLX_NO_KERNEL", "") in ("1", "true"):
            _state["error"] = "disabled by MTPLX_NO_KERNEL"
        elif isa is None:
            _state["error"] = "this CPU has neither AVX-512 nor AVX2 + FMA + F16C"
        else:
            try:
                from torch.utils.cpp_extension import load_inline

                if not is_built():
                    sys.stderr.write(f"mtplx: building the fixed-order CPU kernel ({isa}), once per torch version "
                                     "(about a minute; MTPLX_NO_KERNEL=1 skips it)\n")

                mod = load_inline(_name(isa), cpp_sources=_SRC, functions=None,
                                  extra_cflags=["-O3", "-fopenmp", *_ISA_FLAGS[isa][1]],
                                  extra_ldflags=["-fopenmp"], verbose=False)
                empty = torch.empty(0)

                def fn(x, w, scale=None, _f=mod.rowmm):
                    return _f(x, w, empty if scale is None else scale, PAR_MIN_BYTES)

                if hasattr(mod, "rowmm_bf16"):
                    _state["bf16"] = lambda x, w, _f=mod.rowmm_bf16: _f(x, w, PAR_MIN_BYTES)

                _state["mod"] = mod
            except Exception as e:  # no compiler, no ninja, ...
                _state["error"] = f"{type(e).__name__}: {e}"
                fn = None
        _state["fn"], _state["isa"] = fn, isa if fn is not None else None
        return fn


_MISSING = object()


def rowmm_fn():
    """get_rowmm without the lock once resolved (called for every exact-path matmul)."""
    fn = _state.get("fn", _MISSING)
    return get_rowmm() if fn is _MISSING else fn


def rowmm_bf16_fn():
    """bf16 x bf16 -> fp32 by AVX512-BF16 dot products (the avx512bf16 build), or None."""
    return _state.get("bf16") if rowmm_fn() is not None else None


def get_fused():
    """The build's fused ops (gdn_core, rms_rows, moe_act; model.py's exact path with the
    kernel), or None when the kernel is unavailable."""
    return _state.get("mod") if rowmm_fn() is not None else None


def active_isa() -> str | None:
    """The instruction set of the loaded kernel (after get_rowmm), or None."""
    return _state.get("isa")


def is_built() -> bool:
    """Whether the extension for this CPU is already compiled in torch's extension cache."""
    isa = kernel_isa()
    if isa is None:
        return False
    try:
        from torch.utils.cpp_extension import _get_build_directory

        d = _get_build_directory(_name(isa), False)
        return any(f.endswith(".so") for f in os.listdir(d))
    except Exception:
        return False


def kernel_error() -> str | None:
    return _state.get("error")
