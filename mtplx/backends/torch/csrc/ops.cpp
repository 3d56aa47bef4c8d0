#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>

#if defined(MTPLX_AVX512)
typedef __m512 V;
#define LANES 16
#define NB4 4   // columns per tile when 4 rows share it (16 accumulators of 32 registers)
#define NB3 4
static inline V vzero() { return _mm512_setzero_ps(); }
static inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
static inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
static inline V ldx(const float* p) { return _mm512_loadu_ps(p); }
static inline V vset(float v) { return _mm512_set1_ps(v); }
static inline void vst(float* p, V v) { _mm512_storeu_ps(p, v); }
static inline V ldw(const float* p) { return _mm512_loadu_ps(p); }
static inline V ldw(const at::BFloat16* p) {
  __m512i i = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(i, 16));
}
static inline V ldw(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline V ldw(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
static inline __m256 fold(V v) { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)); }
// 2 x LANES bf16 weights -> their even-index values (lane i: w[2i]) or their odd ones (w[2i+1]):
// a shift or a mask, no shuffle (the shuffle of a widening load is what limits bf16 decode)
static inline V ldw_even(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512((const void*)p), 16));
}
static inline V ldw_odd(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512((const void*)p), _mm512_set1_epi32((int)0xFFFF0000u)));
}
static inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
static inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
static inline V vsub(V a, V b) { return _mm512_sub_ps(a, b); }
static inline V vround(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline V vscale2(V y, V n) {  // y * 2^n for integral n, by adding n to the exponent
  return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(y), _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23)));
}
static inline V vzero_below(V y, V x, V lo) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), y, vzero()); }
static inline V vkeep_nan(V y, V x) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), y, x); }
#else
typedef __m256 V;
#define LANES 8
#define NB4 2   // 8 accumulators of 16 registers
#define NB3 2
static inline V vzero() { return _mm256_setzero_ps(); }
static inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
static inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
static inline V ldx(const float* p) { return _mm256_loadu_ps(p); }
static inline V vset(float v) { return _mm256_set1_ps(v); }
static inline void vst(float* p, V v) { _mm256_storeu_ps(p, v); }
static inline V ldw(const float* p) { return _mm256_loadu_ps(p); }
static inline V ldw(const at::BFloat16* p) {
  __m256i i = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(i, 16));
}
static inline V ldw(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline V ldw(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
static inline __m256 fold(V v) { return v; }
static inline V ldw_even(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i*)p), 16));
}
static inline V ldw_odd(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256((const __m256i*)p), _mm256_set1_epi32((int)0xFFFF0000u)));
}
static inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
static inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
static inline V vsub(V a, V b) { return _mm256_sub_ps(a, b); }
static inline V vround(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline V vscale2(V y, V n) {
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(y), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23)));
}
static inline V vzero_below(V y, V x, V lo) { return _mm256_blendv_ps(y, vzero(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ)); }
static inline V vkeep_nan(V y, V x) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)); }
#endif

static inline float hsum(V v) {
  __m256 h = fold(v);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// out[i] = hsum(a[i]) for LANES vectors at once, bit for bit: hsum's own tree (AVX-512: lanes i and
// i + 8, then i and i + 4, i and i + 2, i and i + 1), each stage one shuffle-add per pair of vectors
// that packs both halves side by side, instead of a shuffle chain per vector. At the K of a small
// model (128) the per-vector chains cost as much as the dot products themselves.
#ifndef HSUM_TRANSPOSED
#define HSUM_TRANSPOSED 1
#endif
#if defined(MTPLX_AVX512)
static inline void hsum_lanes(const V* a, float* out) {
  V b[8], c[4], d[2];
  for (int p = 0; p < 8; p++)  // b[p]: lanes 0-7 a[2p]'s i + (i+8) sums, lanes 8-15 a[2p+1]'s
    b[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int p = 0; p < 4; p++)  // c[p]: quarter m holds a[4p + m]'s i + (i+4) sums
    c[p] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * p], b[2 * p + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * p], b[2 * p + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int p = 0; p < 2; p++)  // d[p], quarter q: a[8p + q]'s two i + (i+2) sums, then a[8p + 4 + q]'s
    d[p] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * p], c[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(c[2 * p], c[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // e, lane 4q + m: the whole sum of a[q + 4m]
  const V e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_storeu_ps(out, _mm512_permutexvar_ps(order, e));
}
#else
static inline void hsum_lanes(const V* a, float* out) {  // AVX2: lanes i and i + 4, i and i + 2, i and i + 1
  V b[4], d[2];
  for (int p = 0; p < 4; p++)  // b[p]: half 0 a[2p]'s i + (i+4) sums, half 1 a[2p+1]'s
    b[p] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * p], a[2 * p + 1], 0x20),
                         _mm256_permute2f128_ps(a[2 * p], a[2 * p + 1], 0x31));
  for (int p = 0; p < 2; p++)  // d[p], half q: a[4p + q]'s two i + (i+2) sums, then a[4p + 2 + q]'s
    d[p] = _mm256_add_ps(_mm256_shuffle_ps(b[2 * p], b[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(b[2 * p], b[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // e, lane 4q + m: the whole sum of a[q + 2m]
  const V e = _mm256_add_ps(_mm256_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm256_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
  _mm256_storeu_ps(out, _mm256_permutevar8x32_ps(e, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}
#endif

// y[r * ldy + j] = hsum(acc[j][r]) (* scale[j]): LANES sums at a time by hsum_lanes, the rest one by one
template <int NB, int R>
static inline void store_sums(const V* a, float* y, int64_t ldy, const float* scale) {  // a[j * R + r]
  constexpr int n = NB * R;
  alignas(64) float s[n];
  int i = 0;
  if (HSUM_TRANSPOSED)
    for (; i + LANES <= n; i += LANES) hsum_lanes(a + i, s + i);
  for (; i < n; i++) s[i] = hsum(a[i]);
  for (int j = 0; j < NB; j++)
    for (int r = 0; r < R; r++) y[r * ldy + j] = scale ? s[j * R + r] * scale[j] : s[j * R + r];
}

// K is consumed in chunks of CHUNK<W> values: LANES, or 2 x LANES for bf16 weights, whose chunk is
// loaded as its even-index and its odd-index values (ldw_even / ldw_odd), each FMA'd with the matching
// half of x: run() lays x out that way (x_layout), each chunk's even values first.
template <typename W> struct Chunk { static constexpr int64_t n = LANES; static constexpr bool paired = false; };
template <> struct Chunk<at::BFloat16> { static constexpr int64_t n = 2 * LANES; static constexpr bool paired = true; };

template <typename W, int NB, int R>
static inline void chunk_fma(const float* x, int64_t Kp, int64_t k, const W* const* wj, int64_t kw, V* acc) {
  if constexpr (Chunk<W>::paired) {  // every accumulator: the even FMA, then the odd one
    V xv[R];
    for (int r = 0; r < R; r++) xv[r] = ldx(x + r * Kp + k);
    for (int j = 0; j < NB; j++) {
      V we = ldw_even(wj[j] + kw);
      for (int r = 0; r < R; r++) acc[j * R + r] = vfma(we, xv[r], acc[j * R + r]);
    }
    for (int r = 0; r < R; r++) xv[r] = ldx(x + r * Kp + k + LANES);
    for (int j = 0; j < NB; j++) {
      V wo = ldw_odd(wj[j] + kw);
      for (int r = 0; r < R; r++) acc[j * R + r] = vfma(wo, xv[r], acc[j * R + r]);
    }
  } else {
    V xv[R];
    for (int r = 0; r < R; r++) xv[r] = ldx(x + r * Kp + k);
    for (int j = 0; j < NB; j++) {
      V wv = ldw(wj[j] + kw);
      for (int r = 0; r < R; r++) acc[j * R + r] = vfma(wv, xv[r], acc[j * R + r]);
    }
  }
}

#ifndef PF_TILES
#define PF_TILES 2      // prefetch distance: this many tiles ahead in the weight stream ...
#endif
#ifndef PF_MIN_BYTES
#define PF_MIN_BYTES 8192  // ... and at least this many bytes (tiles of short rows are small)
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T0
#endif

// Decode is bound by reading the weights, and a tile reads NB rows at once: too many short streams
// for the hardware prefetcher. So while a tile consumes a 64-byte line of each of its rows, it asks
// for the line PF_TILES tiles further on in the (contiguous) weight stream; only the first row group
// over a column block does (pf), the others find the block in cache. Changes no arithmetic.
template <int NB>
static inline void prefetch_lines(const char* const* row, int64_t offset, int64_t tile_bytes) {
  const int64_t ahead = std::max<int64_t>(PF_TILES * tile_bytes, PF_MIN_BYTES);
  for (int j = 0; j < NB; j++) _mm_prefetch(row[j] + offset + ahead, PF_HINT);
}

// NB columns x R rows. x rows are laid out by x_layout (zero-padded to Kp, a multiple of the
// chunk); a weight row's last partial chunk is copied into a zeroed buffer. acc[j][r] is the
// whole dot product.
template <typename W, int NB, int R>
static inline void tile_acc(const float* x, int64_t Kp, int64_t K, const W* w, bool pf, V* acc) {
  constexpr int64_t CH = Chunk<W>::n, CHB = CH * (int64_t)sizeof(W);  // values / bytes of a row per chunk
  for (int i = 0; i < NB * R; i++) acc[i] = vzero();
  const W* wj[NB];
  const char* rows[NB];
  for (int j = 0; j < NB; j++) wj[j] = w + j * K, rows[j] = (const char*)wj[j];
  const int64_t Km = K - K % CH, tile_bytes = NB * K * (int64_t)sizeof(W);
  for (int64_t k = 0; k < Km; k += CH) {
    if (pf && (CHB >= 64 || (k * (int64_t)sizeof(W)) % 64 == 0))
      for (int64_t o = 0; o < CHB; o += 64) prefetch_lines<NB>(rows, k * (int64_t)sizeof(W) + o, tile_bytes);
    chunk_fma<W, NB, R>(x, Kp, k, wj, k, acc);
  }
  if (Km < K) {
    alignas(64) W buf[NB][CH];
    const W* bj[NB];
    for (int j = 0; j < NB; j++) {
      std::memset((void*)buf[j], 0, sizeof(buf[j]));
      std::memcpy((void*)buf[j], w + j * K + Km, (K - Km) * sizeof(W));
      bj[j] = buf[j];
    }
    chunk_fma<W, NB, R>(x, Kp, Km, bj, 0, acc);
  }
}

template <typename W, int NB, int R>
static inline void tile(const float* x, int64_t Kp, int64_t K, const W* w, float* y, int64_t ldy, const float* scale,
                        bool pf) {
  V acc[NB * R];
  tile_acc<W, NB, R>(x, Kp, K, w, pf, acc);
  store_sums<NB, R>(acc, y, ldy, scale);
}

// x [M, K] -> the layout tile<W> reads: rows zero-padded to Kp (a whole number of chunks); for
// paired chunks each chunk's even-index values, then its odd-index ones.
template <typename W>
static std::vector<float> x_layout(const float* x, int64_t M, int64_t K, int64_t& Kp) {
  constexpr int64_t CH = Chunk<W>::n;
  Kp = (K + CH - 1) / CH * CH;
  std::vector<float> out(M * Kp, 0.0f);
  for (int64_t r = 0; r < M; r++) {
    const float* xr = x + r * K;
    float* o = &out[r * Kp];
    if constexpr (Chunk<W>::paired) {
      for (int64_t k = 0; k < K; k++) {
        const int64_t c = k / CH * CH, i = k - c;
        o[c + (i % 2) * LANES + i / 2] = xr[k];
      }
    } else {
      std::memcpy(o, xr, K * sizeof(float));
    }
  }
  return out;
}

// nc (<= 8) columns starting at w / y for R rows: tiles of NB columns, then single columns.
template <typename W, int NB, int R>
static inline void cols(const float* x, int64_t Kp, int64_t K, const W* w, float* y, int64_t ldy,
                        const float* scale, int64_t nc, bool pf) {
  int64_t j = 0;
  for (; j + NB <= nc; j += NB) tile<W, NB, R>(x, Kp, K, w + j * K, y + j, ldy, scale ? scale + j : nullptr, pf);
  for (; j < nc; j++) tile<W, 1, R>(x, Kp, K, w + j * K, y + j, ldy, scale ? scale + j : nullptr, pf);
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
    for (; r + 4 <= M; r += 4) cols<W, NB4, 4>(x + r * Kp, Kp, K, wc, y + r * N + c, N, sc, nc, r == 0);
    const int64_t left = M - r;
    const bool pf = r == 0;
    if (left == 3) cols<W, NB3, 3>(x + r * Kp, Kp, K, wc, y + r * N + c, N, sc, nc, pf);
    else if (left == 2) cols<W, 4, 2>(x + r * Kp, Kp, K, wc, y + r * N + c, N, sc, nc, pf);
    else if (left == 1) cols<W, 8, 1>(x + r * Kp, Kp, K, wc, y + r * N + c, N, sc, nc, pf);
  }
}

// y [M, N] = x [M, K] (fp32, row-major) @ w [N, K].T, columns split across threads
template <typename W>
static void run(const float* x_in, int64_t M, int64_t K, const W* w, float* y, int64_t N,
                const float* scale, int64_t par_bytes) {
  int64_t Kp = 0;
  const std::vector<float> xl = x_layout<W>(x_in, M, K, Kp);
  const float* x = xl.data();
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
  torch::Tensor xc = x.contiguous();
  auto y = torch::empty({M, N}, x.options());
  const float* sc = nullptr;
  if (scale.numel()) {
    TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == N, "rowmm: scale must be fp32 [N]");
    sc = scale.data_ptr<float>();
  }
  const float* xd = xc.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  if (w.dtype() == torch::kFloat32) run<float>(xd, M, K, w.data_ptr<float>(), yd, N, sc, par_bytes);
  else if (w.dtype() == torch::kBFloat16) run<at::BFloat16>(xd, M, K, w.data_ptr<at::BFloat16>(), yd, N, sc, par_bytes);
  else if (w.dtype() == torch::kFloat16) run<at::Half>(xd, M, K, w.data_ptr<at::Half>(), yd, N, sc, par_bytes);
  else if (w.dtype() == torch::kInt8) run<int8_t>(xd, M, K, w.data_ptr<int8_t>(), yd, N, sc, par_bytes);
  else TORCH_CHECK(false, "rowmm: unsupported weight dtype");
  return y;
}

// ---- bf16 activations x bf16 weights with AVX512-BF16 dot products (bf16 models) ----
// Each output: one fixed sequence of vdpbf16ps over K in chunks of 32 (pairs of exact bf16
// products added to the fp32 lane in a fixed order), a zero-padded last chunk, then the same
// horizontal sum: as row-invariant as rowmm, with a third of its instructions per weight.
#if defined(MTPLX_AVX512BF16)
// A one-row bf16 matmul (decode) may read its weight rows one after another, one sequential
// stream left to the hardware prefetcher: on AMD Zen 4 that streams 22-27 GB/s where the 8-row
// tile with software prefetch gets 16-23 (1 thread). Same FMAs per output, so the same bits.
#ifndef DOT_DECODE_SEQUENTIAL
#define DOT_DECODE_SEQUENTIAL 0
#endif
// ... and so may a matmul of up to this many rows (a depth-1 verify): each weight row read once,
// its R dot products side by side. Past 2 rows its R accumulator chains are too few to hide the
// dot product's latency, and the 4-column tile is faster (Zen 4, 1 thread: 2 rows 54 -> 45 ms
// over a 0.8B model's weights; 4 rows 56-63 -> 76-83 ms)
#ifndef DOT_SEQUENTIAL_ROWS
#define DOT_SEQUENTIAL_ROWS 1
#endif
static_assert(DOT_SEQUENTIAL_ROWS >= 1 && DOT_SEQUENTIAL_ROWS <= 4, "DOT_SEQUENTIAL_ROWS: 1..4");
// acc[j * R + r] = the dot products of weight row j with x row r, one vdpbf16ps chain each
template <int NB, int R>
static inline void dot_acc(const at::BFloat16* x, int64_t Kp, int64_t K, const at::BFloat16* w, bool pf, V* acc) {
  for (int i = 0; i < NB * R; i++) acc[i] = _mm512_setzero_ps();
  const char* rows[NB];
  for (int j = 0; j < NB; j++) rows[j] = (const char*)(w + j * K);
  const int64_t Km = K - K % 32, tile_bytes = NB * K * 2;
  for (int64_t k = 0; k < Km; k += 32) {  // a chunk: 32 bf16, one 64-byte line of each row
    if (pf) prefetch_lines<NB>(rows, k * 2, tile_bytes);
    __m512bh xv[R];
    for (int r = 0; r < R; r++) xv[r] = (__m512bh)_mm512_loadu_si512((const void*)(x + r * Kp + k));
    for (int j = 0; j < NB; j++) {
      __m512bh wv = (__m512bh)_mm512_loadu_si512((const void*)(w + j * K + k));
      for (int r = 0; r < R; r++) acc[j * R + r] = _mm512_dpbf16_ps(acc[j * R + r], wv, xv[r]);
    }
  }
  if (Km < K) {
    __m512bh xv[R];
    for (int r = 0; r < R; r++) xv[r] = (__m512bh)_mm512_loadu_si512((const void*)(x + r * Kp + Km));
    for (int j = 0; j < NB; j++) {
      alignas(64) uint16_t buf[32] = {0};
      std::memcpy(buf, w + j * K + Km, (K - Km) * sizeof(uint16_t));
      __m512bh wv = (__m512bh)_mm512_loadu_si512((const void*)buf);
      for (int r = 0; r < R; r++) acc[j * R + r] = _mm512_dpbf16_ps(acc[j * R + r], wv, xv[r]);
    }
  }
}

template <int NB, int R>
static inline void tile_dot(const at::BFloat16* x, int64_t Kp, int64_t K, const at::BFloat16* w, float* y, int64_t ldy,
                            bool pf) {
  V acc[NB * R];
  dot_acc<NB, R>(x, Kp, K, w, pf, acc);
  store_sums<NB, R>(acc, y, ldy, nullptr);
}

// nc columns for R rows, each weight row read whole before the next (one sequential stream, no
// software prefetch), the sums of LANES / R columns at a time
template <int R>
static inline void seq_dot(const at::BFloat16* x, int64_t Kp, int64_t K, const at::BFloat16* w, float* y, int64_t ldy,
                           int64_t nc) {
  constexpr int G = LANES / R;
  int64_t j = 0;
  for (; j + G <= nc; j += G) {
    V acc[G * R];
#pragma GCC unroll 16
    for (int c = 0; c < G; c++) dot_acc<1, R>(x, Kp, K, w + (j + c) * K, false, acc + c * R);
    store_sums<G, R>(acc, y + j, ldy, nullptr);
  }
  for (; j < nc; j++) tile_dot<1, R>(x, Kp, K, w + j * K, y + j, ldy, false);
}

template <int NB, int R>
static inline void cols_dot(const at::BFloat16* x, int64_t Kp, int64_t K, const at::BFloat16* w, float* y,
                            int64_t ldy, int64_t nc, bool pf) {
  int64_t j = 0;
  for (; j + NB <= nc; j += NB) tile_dot<NB, R>(x, Kp, K, w + j * K, y + j, ldy, pf);
  for (; j < nc; j++) tile_dot<1, R>(x, Kp, K, w + j * K, y + j, ldy, pf);
}

static void run_cols_dot(const at::BFloat16* x, int64_t M, int64_t Kp, int64_t K, const at::BFloat16* w, float* y,
                         int64_t N, int64_t c0, int64_t c1) {
  if (DOT_DECODE_SEQUENTIAL && M <= DOT_SEQUENTIAL_ROWS) {
    const at::BFloat16* wc = w + c0 * K;
    const int64_t nc = c1 - c0;
    if (M == 1) seq_dot<1>(x, Kp, K, wc, y + c0, N, nc);
    else if (M == 2) seq_dot<2>(x, Kp, K, wc, y + c0, N, nc);
    else if (M == 3) seq_dot<3>(x, Kp, K, wc, y + c0, N, nc);
    else seq_dot<4>(x, Kp, K, wc, y + c0, N, nc);
    return;
  }
  for (int64_t c = c0; c < c1; c += 8) {
    const int64_t nc = std::min<int64_t>(8, c1 - c);
    const at::BFloat16* wc = w + c * K;
    int64_t r = 0;
    for (; r + 4 <= M; r += 4) cols_dot<4, 4>(x + r * Kp, Kp, K, wc, y + r * N + c, N, nc, r == 0);
    const int64_t left = M - r;
    const bool pf = r == 0;
    if (left == 3) cols_dot<4, 3>(x + r * Kp, Kp, K, wc, y + r * N + c, N, nc, pf);
    else if (left == 2) cols_dot<4, 2>(x + r * Kp, Kp, K, wc, y + r * N + c, N, nc, pf);
    else if (left == 1) cols_dot<8, 1>(x + r * Kp, Kp, K, wc, y + r * N + c, N, nc, pf);
  }
}

// x [M, Kp] bf16 (zero-padded to Kp = K rounded up to 32) -> y [M, N] fp32, columns split across threads
static void run_dot(const at::BFloat16* xd, int64_t M, int64_t Kp, int64_t K, const at::BFloat16* wd, float* yd,
                    int64_t N, int64_t par_bytes) {
  const int64_t blocks = (N + 7) / 8, grain = std::max<int64_t>(1, par_bytes / std::max<int64_t>(8 * K * 2, 1));
  if (blocks <= grain || at::get_num_threads() == 1) run_cols_dot(xd, M, Kp, K, wd, yd, N, 0, N);
  else at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    run_cols_dot(xd, M, Kp, K, wd, yd, N, b0 * 8, std::min<int64_t>(N, b1 * 8));
  });
}

torch::Tensor rowmm_bf16(torch::Tensor x, torch::Tensor w, int64_t par_bytes) {
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.dim() == 2, "rowmm_bf16: x must be bf16 [M, K]");
  TORCH_CHECK(w.dtype() == torch::kBFloat16 && w.is_contiguous() && w.size(1) == x.size(1), "rowmm_bf16: w bf16 [N, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), Kp = (K + 31) / 32 * 32;
  torch::Tensor xp = x.contiguous();
  if (Kp != K) xp = torch::constant_pad_nd(xp, {0, Kp - K}, 0.0);
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
  run_dot(xp.data_ptr<at::BFloat16>(), M, Kp, K, w.data_ptr<at::BFloat16>(), y.data_ptr<float>(), N, par_bytes);
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

// One sequence of T positions. X / Z / Bg / Ag: row t of mixed [C], z [nv*dv], b [nv], a [nv] at
// X + t * sx (and so on); P: the conv state [K-1, C]; S0: the state before position 0; writes
// y [T, nv*dv] and the state after every position, states [T, nv, dk, dv].
struct GdnShape { int64_t C, K1, nk, dk, nv, dv; float eps; };
static const int64_t GDN_PAR_STATE = 1 << 16;  // state values per thread, at least

static void gdn_seq(const GdnShape& g, int64_t T, const float* X, int64_t sx, const float* Z, int64_t sz,
                    const float* Bg, int64_t sb, const float* Ag, int64_t sa, const float* P, const float* W,
                    const float* Al, const float* Dt, const float* S0, const float* G, float* Y, float* St) {
  const int64_t C = g.C, K1 = g.K1, K = K1 + 1, nk = g.nk, dk = g.dk, nv = g.nv, dv = g.dv;
  const int64_t r = nv / nk, key_dim = nk * dk;
  const float qscale = 1.0f / std::sqrt((float)dk);
  std::vector<float> act(C), qn(key_dim), kn(key_dim), Wt(K * C);
  for (int64_t c = 0; c < C; c++)  // the conv weights tap by tap: the channel loops below read contiguous memory
    for (int64_t j = 0; j < K; j++) Wt[j * C + c] = W[c * K + j];
  const float* Sprev = S0;
  for (int64_t t = 0; t < T; t++) {
    // causal conv over window rows t..t+K-1 of [state; mixed], taps in order per channel, then SiLU
    auto window_row = [&](int64_t row) { return row < K1 ? P + row * C : X + (row - K1) * sx; };
    const float* x0 = window_row(t);
    for (int64_t c = 0; c < C; c++) act[c] = x0[c] * Wt[c];
    for (int64_t j = 1; j < K; j++) {
      const float* xj = window_row(t + j);
      const float* wj = &Wt[j * C];
      for (int64_t c = 0; c < C; c++) act[c] = act[c] + xj[c] * wj[c];
    }
    for (int64_t c = 0; c < C; c++) act[c] = silu_f(act[c]);
    for (int64_t h = 0; h < nk; h++) {
      float sq = 0.0f, sk = 0.0f;
      for (int64_t i = 0; i < dk; i++) { float q = act[h * dk + i], k = act[key_dim + h * dk + i]; sq += q * q; sk += k * k; }
      const float rq = 1.0f / std::sqrt(sq + 1e-6f), rk = 1.0f / std::sqrt(sk + 1e-6f);
      for (int64_t i = 0; i < dk; i++) { qn[h * dk + i] = act[h * dk + i] * rq * qscale; kn[h * dk + i] = act[key_dim + h * dk + i] * rk; }
    }
    float* Snow = St + t * nv * dk * dv;
    auto heads = [&](int64_t h0, int64_t h1) {
      std::vector<float> ks(dv), o(dv);
      for (int64_t hv = h0; hv < h1; hv++) {
        const float* q = &qn[(hv / r) * dk];
        const float* k = &kn[(hv / r) * dk];
        const float* v = &act[2 * key_dim + hv * dv];
        const float beta = 1.0f / (1.0f + std::exp(-Bg[t * sb + hv]));
        const float decay = std::exp(-std::exp(Al[hv]) * softplus_f(Ag[t * sa + hv] + Dt[hv]));
        const float* S = Sprev + hv * dk * dv;
        float* Sn = Snow + hv * dk * dv;
        // two passes over the state, each row once: decay and k . S, then the update and q . S
        // (every sum still runs over i in order, so the bits are those of one pass per step)
        float* kS = ks.data();
        for (int64_t j = 0; j < dv; j++) kS[j] = 0.0f;
        for (int64_t i = 0; i < dk; i++) {
          const float* si = S + i * dv;
          float* ni = Sn + i * dv;
          const float ki = k[i];
          for (int64_t j = 0; j < dv; j++) {
            ni[j] = si[j] * decay;
            kS[j] += ki * ni[j];
          }
        }
        for (int64_t j = 0; j < dv; j++) kS[j] = (v[j] - kS[j]) * beta;  // delta
        float* oq = o.data();
        for (int64_t j = 0; j < dv; j++) oq[j] = 0.0f;
        for (int64_t i = 0; i < dk; i++) {
          float* ni = Sn + i * dv;
          const float ki = k[i], qi = q[i];
          for (int64_t j = 0; j < dv; j++) {
            ni[j] += ki * kS[j];
            oq[j] += qi * ni[j];
          }
        }
        float ms = 0.0f;
        for (int64_t j = 0; j < dv; j++) ms += oq[j] * oq[j];
        const float rn = 1.0f / std::sqrt(ms / (float)dv + g.eps);
        const float* zr = Z + t * sz + hv * dv;
        for (int64_t j = 0; j < dv; j++) Y[t * nv * dv + hv * dv + j] = oq[j] * rn * G[j] * silu_f(zr[j]);
      }
    };
    // heads are independent: big states (a Qwen3.5 layer's 16 x 128 x 128) split across threads
    const int64_t grain = std::max<int64_t>(1, GDN_PAR_STATE / std::max<int64_t>(dk * dv, 1));
    if (nv <= grain || at::get_num_threads() == 1) heads(0, nv);
    else at::parallel_for(0, nv, grain, heads);
    Sprev = Snow;
  }
}

std::vector<torch::Tensor> gdn_core(torch::Tensor mixed, torch::Tensor b, torch::Tensor a, torch::Tensor z,
                                    torch::Tensor conv_state, torch::Tensor conv_w, torch::Tensor A_log,
                                    torch::Tensor dt_bias, torch::Tensor S0, torch::Tensor gnorm,
                                    int64_t nk, int64_t dk, int64_t dv, double eps_d) {
  for (auto* t : {&mixed, &b, &a, &z, &conv_state, &conv_w, &A_log, &dt_bias, &S0, &gnorm})
    TORCH_CHECK(t->dtype() == torch::kFloat32 && t->is_contiguous(), "gdn_core: fp32 contiguous inputs");
  const int64_t T = mixed.size(0), C = mixed.size(1), nv = A_log.size(0);
  const GdnShape g{C, conv_state.size(0), nk, dk, nv, dv, (float)eps_d};
  auto y = torch::empty({T, nv * dv}, mixed.options());
  auto states = torch::empty({T, nv, dk, dv}, mixed.options());
  gdn_seq(g, T, mixed.data_ptr<float>(), C, z.data_ptr<float>(), nv * dv, b.data_ptr<float>(), nv,
          a.data_ptr<float>(), nv, conv_state.data_ptr<float>(), conv_w.data_ptr<float>(), A_log.data_ptr<float>(),
          dt_bias.data_ptr<float>(), S0.data_ptr<float>(), gnorm.data_ptr<float>(), y.data_ptr<float>(),
          states.data_ptr<float>());
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

// exp(x) for x <= 0 (softmax weights): x = n ln2 + r with |r| <= ln2 / 2, Cephes' expf polynomial
// for e^r (within 2 ulp of libm's expf), times 2^n; 0 below -87 (e^-87 is 1.6e-38, the bottom of
// the normal floats), NaN stays NaN. Elementwise, so a key's weight is the same whatever keys,
// rows or threads surround it; one vector instead of a libm call per key (15% of a 16k-context step).
static inline V vexp_neg(V x) {
  const V lo = vset(-87.0f);
  const V xc = vmax(x, lo);
  const V n = vround(vmul(xc, vset(1.44269504088896341f)));
  V r = vfma(n, vset(-0.693359375f), xc);
  r = vfma(n, vset(2.12194440e-4f), r);
  V p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  const V y = vadd(vfma(p, vmul(r, r), r), vset(1.0f));
  return vkeep_nan(vzero_below(vscale2(y, n), x, lo), x);
}

// w[j] = exp(w[j] - mx) for j < n -> their sum: lane-wise partial sums in key order, then hsum;
// a last partial vector is padded with -inf (weight 0). A function of (w, n, mx) alone.
static float exp_weights(float* w, int64_t n, float mx) {
  const V m = vset(mx);
  V sum = vzero();
  int64_t j = 0;
  for (; j + LANES <= n; j += LANES) {
    const V e = vexp_neg(vsub(ldx(w + j), m));
    vst(w + j, e);
    sum = vadd(sum, e);
  }
  if (j < n) {
    alignas(64) float t[LANES];
    for (int i = 0; i < LANES; i++) t[i] = j + i < n ? w[j + i] : -INFINITY;
    const V e = vexp_neg(vsub(ldx(t), m));
    vst(t, e);
    sum = vadd(sum, e);
    for (int64_t i = 0; j + i < n; i++) w[j + i] = t[i];
  }
  return hsum(sum);
}

// ---- attention of few query rows over a KV cache (the exact path's decode / verify) ----
// q [T, nh, hd] at positions pos0.., K / V [nkv, cap, hd] -> o [T, nh * hd] (fp32). Row t, head h
// attends to keys 0..pos0+t of KV head h / (nh / nkv): scores by L-lane FMAs over hd and a fixed
// horizontal sum, max, exp (vexp_neg), the sum of weights (exp_weights), then the weighted
// values in key order. Each (t, h) is computed on its own, so the rows of a verify equal one-token decodes.
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
  const float sum = exp_weights(sc.data(), n_keys, mx);
  for (int64_t d = 0; d < hd; d++) out[d] = 0.0f;
  for (int64_t j = 0; j < n_keys; j++) {  // out[d] += w_j * v_j[d], keys in order, one FMA each
    const KV* vr = Vc + j * hd;
    const float wj = sc[j];
    const V wv = vset(wj);
    for (int64_t d = 0; d < hm; d += LANES) vst(out + d, vfma(ldw(vr + d), wv, ldx(out + d)));
    for (int64_t d = hm; d < hd; d++) out[d] = std::fma((float)vr[d], wj, out[d]);
  }
  const float inv = 1.0f / sum;
  for (int64_t d = 0; d < hd; d++) out[d] *= inv;
}

// The G query heads h0.. of one KV head at one row, hd = NV x LANES: attend_one's arithmetic for
// each head (the same FMAs in the same order, so the same bits), with each K and V row loaded once
// for the G heads and the weighted sum of values kept in registers instead of memory.
template <typename KV, int NV, int G>
static void attend_group(const float* q, const KV* Kc, const KV* Vc, int64_t n_keys, float scale, float* out,
                         std::vector<float>& sc) {
  constexpr int64_t hd = NV * LANES;
  sc.resize(G * n_keys);
  float mx[G], sum[G];
  for (int h = 0; h < G; h++) { mx[h] = -INFINITY; sum[h] = 0.0f; }
  int64_t j = 0;
  for (; HSUM_TRANSPOSED && j + LANES <= n_keys; j += LANES) {  // LANES keys: their sums by hsum_lanes
    for (int h = 0; h < G; h++) {
      V q_h[NV];
      for (int i = 0; i < NV; i++) q_h[i] = ldx(q + h * hd + i * LANES);
      V acc[LANES];
      for (int u = 0; u < LANES; u++) {
        const KV* kr = Kc + (j + u) * hd;
        acc[u] = vzero();
        for (int i = 0; i < NV; i++) acc[u] = vfma(ldw(kr + i * LANES), q_h[i], acc[u]);
      }
      float* s_h = &sc[h * n_keys + j];
      hsum_lanes(acc, s_h);
      for (int u = 0; u < LANES; u++) {
        s_h[u] *= scale;
        mx[h] = std::max(mx[h], s_h[u]);
      }
    }
  }
  for (; j < n_keys; j++) {
    const KV* kr = Kc + j * hd;
    V kv[NV];
    for (int i = 0; i < NV; i++) kv[i] = ldw(kr + i * LANES);
    for (int h = 0; h < G; h++) {
      V acc = vzero();
      for (int i = 0; i < NV; i++) acc = vfma(kv[i], ldx(q + h * hd + i * LANES), acc);
      const float v = hsum(acc) * scale;
      sc[h * n_keys + j] = v;
      mx[h] = std::max(mx[h], v);
    }
  }
  for (int h = 0; h < G; h++) sum[h] = exp_weights(&sc[h * n_keys], n_keys, mx[h]);
  // the weighted values in slices of SL vectors, G x SL accumulators in registers
  constexpr int SL = G * NV <= 16 ? NV : 16 / G;
  for (int i0 = 0; i0 < NV; i0 += SL) {
    V acc[G][SL];
    for (int h = 0; h < G; h++) for (int i = 0; i < SL; i++) acc[h][i] = vzero();
    for (int64_t j = 0; j < n_keys; j++) {  // keys in order, one FMA each
      const KV* vr = Vc + j * hd + i0 * LANES;
      for (int i = 0; i < SL; i++) {
        const V vv = ldw(vr + i * LANES);
        for (int h = 0; h < G; h++) acc[h][i] = vfma(vv, vset(sc[h * n_keys + j]), acc[h][i]);
      }
    }
    for (int h = 0; h < G; h++) {
      const V inv = vset(1.0f / sum[h]);
      for (int i = 0; i < SL; i++) vst(out + h * hd + (i0 + i) * LANES, vmul(acc[h][i], inv));
    }
  }
}

template <typename KV>
using GroupFn = void (*)(const float*, const KV*, const KV*, int64_t, float, float*, std::vector<float>&);

template <typename KV, int NV>
static GroupFn<KV> group_fn_nv(int64_t G) {
  if (G == 8) return attend_group<KV, NV, 8>;
  if (G == 4) return attend_group<KV, NV, 4>;
  if (G == 2) return attend_group<KV, NV, 2>;
  return attend_group<KV, NV, 1>;
}

// the grouped kernel for this head dim and GQA group g, and its block of G heads (the largest of
// 8 / 4 / 2 that divides g; 1 otherwise); nullptr: attend_one (hd not a multiple of the lanes,
// or over 16 of them)
template <typename KV>
static GroupFn<KV> group_fn(int64_t hd, int64_t g, int64_t& G) {
  G = 1;
  if (hd % LANES) return nullptr;
  for (int64_t c : {8, 4, 2})
    if (g % c == 0) { G = c; break; }
  switch (hd / LANES) {
    case 1: return group_fn_nv<KV, 1>(G);
    case 2: return group_fn_nv<KV, 2>(G);
    case 4: return group_fn_nv<KV, 4>(G);
    case 8: return group_fn_nv<KV, 8>(G);
    case 16: return group_fn_nv<KV, 16>(G);
    default: G = 1; return nullptr;
  }
}

template <typename KV>
static void attend_all(const float* q, const KV* Kc, const KV* Vc, float* o, int64_t T, int64_t nh, int64_t nkv,
                       int64_t hd, int64_t cap, int64_t pos0, float scale) {
  const int64_t g = nh / nkv;
  int64_t G = 1;
  GroupFn<KV> grouped = group_fn<KV>(hd, g, G);
  const int64_t units = T * (nh / G);  // (row, block of G heads of one KV head)
  const int64_t work = (pos0 + T) * hd * G;  // key-dims per unit, about
  const int64_t grain = std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(work, 1));
  auto body = [&](int64_t b0, int64_t b1) {
    std::vector<float> sc;
    for (int64_t u = b0; u < b1; u++) {
      const int64_t t = u / (nh / G), h = (u % (nh / G)) * G, kv = h / g;
      const float* qh = q + (t * nh + h) * hd;
      float* oh = o + (t * nh + h) * hd;
      if (grouped) grouped(qh, Kc + kv * cap * hd, Vc + kv * cap * hd, pos0 + t + 1, scale, oh, sc);
      else attend_one<KV>(qh, Kc + kv * cap * hd, Vc + kv * cap * hd, pos0 + t + 1, hd, scale, oh, sc);
    }
  };
  if (units <= grain || at::get_num_threads() == 1) body(0, units);
  else at::parallel_for(0, units, grain, body);
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

// ---- greedy choice: x [R, V] (fp32 / bf16 / fp16) -> int64 [R], per row the first index of the
// maximum, or of the first NaN when there is one (what torch's max(dim).indices returns), in a
// microsecond where torch's reduction takes 7-30
template <typename T>
static int64_t argmax_row(const T* x, int64_t V) {
  int64_t best = 0;
  float bv = (float)x[0];
  if (std::isnan(bv)) return 0;
  for (int64_t i = 1; i < V; i++) {
    const float v = (float)x[i];
    if (std::isnan(v)) return i;
    if (v > bv) { bv = v; best = i; }
  }
  return best;
}

torch::Tensor argmax_rows(torch::Tensor x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0 && x.device().is_cpu(), "argmax_rows: a CPU tensor [..., V], V > 0");
  auto xc = x.contiguous();
  const int64_t V = xc.size(-1), R = xc.numel() / V;
  std::vector<int64_t> shape(xc.sizes().begin(), xc.sizes().end() - 1);
  auto out = torch::empty(shape, torch::TensorOptions().dtype(torch::kInt64));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; r++) {
    if (xc.dtype() == torch::kFloat32) o[r] = argmax_row(xc.data_ptr<float>() + r * V, V);
    else if (xc.dtype() == torch::kBFloat16) o[r] = argmax_row(xc.data_ptr<at::BFloat16>() + r * V, V);
    else if (xc.dtype() == torch::kFloat16) o[r] = argmax_row(xc.data_ptr<at::Half>() + r * V, V);
    else TORCH_CHECK(false, "argmax_rows: fp32 / bf16 / fp16 only, got ", xc.dtype());
  }
  return out;
}
