// The GEMV kernels' building blocks, shared by the per-op entry points (gemv.cpp) and the fused decode
// step (decode_step.cpp). See gemv.cpp for the design; everything here computes a range of output-row
// tiles, so a caller chooses how threads share them (at::parallel_for per op, or one parallel region
// per decode step).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace miaotui_kernels {

inline float hsum256(__m256 v) {  // the sum of 8 lanes (also used by the 256-bit integer kernels below)
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define MIAOTUI_WIDE_DENSE_ROWS 1
constexpr int kLanes = 16;
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float v) { return _mm512_set1_ps(v); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline float vhmax(vf v) { return _mm512_reduce_max_ps(v); }
// 16 consecutive weights of one row as fp32
inline vf load_w(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vf load_w(const uint16_t* p) {  // bf16: the upper half of an fp32
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline vf load_w(const float* p) { return _mm512_loadu_ps(p); }
#else
#define MIAOTUI_WIDE_DENSE_ROWS 0
constexpr int kLanes = 8;
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float v) { return _mm256_set1_ps(v); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline float vsum(vf v) { return hsum256(v); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline float vhmax(vf v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}
inline vf load_w(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vf load_w(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline vf load_w(const float* p) { return _mm256_loadu_ps(p); }
#endif

// e^x for x <= 0 (attention scores minus their maximum, silu's e^-|x|): 2^n * p(r), |r| <= ln2 / 2, degree-6 Taylor
// polynomial (relative error ~2e-7); inputs below -87 give e^-87 ~ 1.6e-38, not 0. One set of constants for
// both widths below, so they compute the same function.
constexpr float kExpMin = -87.0f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln 2 in two parts: exact n * hi
constexpr float kExpPoly[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};  // Horner, highest first

inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpMin));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// exp_nonpositive at the full vector width
#if MIAOTUI_WIDE_DENSE_ROWS
inline vf vexp_nonpositive(vf x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpMin));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#else
inline vf vexp_nonpositive(vf x) { return exp_nonpositive(x); }
#endif

// silu(g) = g / (1 + e^-g), from e^-|g| (<= 1, no overflow): g >= 0 -> g / (1 + e), g < 0 -> g e / (1 + e)
inline __m256 silu8(__m256 g) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 e = exp_nonpositive(_mm256_or_ps(g, sign));  // -|g|
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 num = _mm256_blendv_ps(g, _mm256_mul_ps(g, e), g);  // blend on g's sign bit
  return _mm256_div_ps(num, _mm256_add_ps(one, e));
}

inline float silu1(float g) { return g / (1.f + std::exp(-g)); }

// y[c] = silu(g[c]) * u[c] for c < F
inline void silu_mul_row(const float* g, const float* u, int64_t F, float* y) {
  int64_t c = 0;
  for (; c + 8 <= F; c += 8)
    _mm256_storeu_ps(y + c, _mm256_mul_ps(silu8(_mm256_loadu_ps(g + c)), _mm256_loadu_ps(u + c)));
  for (; c < F; ++c) y[c] = silu1(g[c]) * u[c];
}

// y = w * (x * rsqrt(mean(x^2) + eps)) over C values: normalised first, then scaled (PyTorch's rounding order)
inline void rms_norm_row(const float* x, const float* w, int64_t C, float eps, float* y) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) {
    const __m256 a = _mm256_loadu_ps(x + c), b = _mm256_loadu_ps(x + c + 8);
    s0 = _mm256_fmadd_ps(a, a, s0);
    s1 = _mm256_fmadd_ps(b, b, s1);
  }
  float ss = hsum256(_mm256_add_ps(s0, s1));
  for (; c < C; ++c) ss += x[c] * x[c];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(C) + eps);
  const __m256 vi = _mm256_set1_ps(inv);
  for (c = 0; c + 8 <= C; c += 8)
    _mm256_storeu_ps(y + c, _mm256_mul_ps(_mm256_loadu_ps(w + c), _mm256_mul_ps(_mm256_loadu_ps(x + c), vi)));
  for (; c < C; ++c) y[c] = w[c] * (x[c] * inv);
}

inline float scalar_w(int8_t v) { return static_cast<float>(v); }
inline float scalar_w(float v) { return v; }
inline float scalar_w(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

constexpr int kMaxRows = 4;  // activation rows per pass over a weight tile (the int8/int4 kernels)
// fp32/bf16/int8-as-fp32 weights: activation rows per pass over one weight row (dense_tiles). Past six the
// pass is bound by the core, not by memory: eight rows took 1.4x six's time whether in one pass or two of
// four. AVX2's 16 vector registers hold the accumulators of four.
constexpr int kDenseMaxRows = MIAOTUI_WIDE_DENSE_ROWS ? 6 : 4;
constexpr int64_t kTile = 16;  // output rows per tile (the unit threads share out)

// Threads only pay off with enough weight bytes each: a fork/join costs a few microseconds.
inline int64_t grain_tiles(int64_t tile_bytes) {
  constexpr int64_t kMinBytesPerThread = 48 * 1024;
  return std::max<int64_t>(1, (kMinBytesPerThread + tile_bytes - 1) / tile_bytes);
}

// ------------------------------------------------------------------ int8 / bf16 / fp32: one row per vector

// Software prefetch distance, in bytes ahead of the current position in each weight row. Narrow weights
// (int8, int4) take more instructions per byte than fp32, so the out-of-order window alone keeps too few
// cache misses in flight to cover DRAM latency; explicit prefetches restore streaming bandwidth.
#ifndef MIAOTUI_PREFETCH_BYTES
#define MIAOTUI_PREFETCH_BYTES 2048
#endif
constexpr int64_t kPrefetchBytes = MIAOTUI_PREFETCH_BYTES;

#ifndef MIAOTUI_PREFETCH_HINT
#define MIAOTUI_PREFETCH_HINT _MM_HINT_T0
#endif
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), MIAOTUI_PREFETCH_HINT); }

// fp32 weight rows are read once per token and never again before the next one: a non-temporal prefetch
// keeps them from displacing the activations and other rows' lines. On the AVX-512 (Zen 5) VM, alternating
// builds: the fp32 decode step 4-7 % faster in 8 of 8 pairs (one and six rows); bf16 was slower in 3 of 4
// pairs at one row, so the other weight types keep MIAOTUI_PREFETCH_HINT.
template <class T>
inline void prefetch_weights(const T* p) {
  if constexpr (std::is_same_v<T, float>) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_NTA);
  else prefetch(p);
}

// One weight row against MR activation rows; KU independent accumulators per row hide the FMA latency when
// there are few rows (at KU = 1, four rows of fp32 ran at one FMA per cycle, latency-bound). The main loop
// advances STEP vectors (whole cache lines) of the weight row at a time, prefetching each line.
template <class T, int MR>
inline void dot_rows(const float* x, int64_t K, const T* w, float* out) {
  constexpr int VPL = std::max<int>(1, 64 / int(sizeof(T) * kLanes));  // vectors per cache line
  constexpr int KU = MR >= 8 ? 1 : (MR >= 4 ? 2 : 4);
  constexpr int STEP = std::max(VPL, KU);
  constexpr int64_t PF = kPrefetchBytes / int64_t(sizeof(T));
  vf acc[KU][MR];
  for (int u = 0; u < KU; ++u)
    for (int m = 0; m < MR; ++m) acc[u][m] = vzero();
  int64_t k = 0;
  for (; k + STEP * kLanes <= K; k += STEP * kLanes) {
    for (int v = 0; v < STEP; v += VPL) prefetch_weights(w + k + v * kLanes + PF);
    for (int v = 0; v < STEP; ++v) {
      const int64_t kk = k + v * kLanes;
      const vf wv = load_w(w + kk);
      for (int m = 0; m < MR; ++m) acc[v % KU][m] = vfma(wv, vload(x + m * K + kk), acc[v % KU][m]);
    }
  }
  for (; k + kLanes <= K; k += kLanes) {
    const vf wv = load_w(w + k);
    for (int m = 0; m < MR; ++m) acc[0][m] = vfma(wv, vload(x + m * K + k), acc[0][m]);
  }
  for (int m = 0; m < MR; ++m) {
    vf s = acc[0][m];
    for (int u = 1; u < KU; ++u) s = vadd(s, acc[u][m]);
    float tail = 0.f;
    for (int64_t t = k; t < K; ++t) tail += scalar_w(w[t]) * x[m * K + t];
    out[m] = vsum(s) + tail;
  }
}

// int8 with a scale per (row, group of columns): each group's dot is accumulated apart, then scaled and
// summed, so the result is "dequantize, then fp32 matmul" up to summation order. group % kLanes == 0.
template <int MR>
inline void dot_rows_grouped(const float* x, int64_t K, const int8_t* w, const float* scale, int64_t G,
                             float* out) {
  constexpr int KU = MR >= 4 ? 1 : 2;
  const int64_t group = K / G;
  vf tot[MR];
  for (int m = 0; m < MR; ++m) tot[m] = vzero();
  for (int64_t g = 0; g < G; ++g) {
    vf acc[KU][MR];
    for (int u = 0; u < KU; ++u)
      for (int m = 0; m < MR; ++m) acc[u][m] = vzero();
    const int64_t k0 = g * group, k1 = k0 + group;
    for (int64_t k = k0; k < k1; k += kLanes) {
      if ((k & 63) < kLanes) prefetch(w + k + kPrefetchBytes);
      const int u = int((k - k0) / kLanes) % KU;
      const vf wv = load_w(w + k);
      for (int m = 0; m < MR; ++m) acc[u][m] = vfma(wv, vload(x + m * K + k), acc[u][m]);
    }
    const vf s = vset1(scale[g]);
    for (int m = 0; m < MR; ++m) {
      vf a = acc[0][m];
      for (int u = 1; u < KU; ++u) a = vadd(a, acc[u][m]);
      tot[m] = vfma(s, a, tot[m]);
    }
  }
  for (int m = 0; m < MR; ++m) out[m] = vsum(tot[m]);
}

// One weight row against MR activation rows: out[m] = scale * (x_m . w) + bias (grouped int8 scales were
// applied inside the dot).
template <class T, int MR>
inline void row_dots(const float* x, int64_t K, const T* w, int64_t n, const float* scale, int64_t G,
                     const float* bias, float* y, int64_t N) {
  float out[MR];
  if constexpr (std::is_same_v<T, int8_t>) {
    if (G > 0) {
      dot_rows_grouped<MR>(x, K, w + n * K, scale + n * G, G, out);
      scale = nullptr;
    } else {
      dot_rows<T, MR>(x, K, w + n * K, out);
    }
  } else {
    dot_rows<T, MR>(x, K, w + n * K, out);
  }
  const float s = scale ? scale[n] : 1.f, b = bias ? bias[n] : 0.f;
  for (int m = 0; m < MR; ++m) y[m * N + n] = out[m] * s + b;
}

// Output-row tiles [t0, t1) of y = x . W^T for M rows of x: the unit a thread computes. With grouped
// int8 scales (G > 0: scale is [N, G]), each group's partial dot is scaled before it is summed.
//
// One weight row at a time, so a thread reads its tile as a single front-to-back stream: several rows in
// step are streams a K apart, which the hardware prefetcher follows worse (one activation row: 17-18 vs
// 23-24 GB/s for bf16 at four weight rows; six activation rows: 1.2-1.6x faster than two or four weight
// rows at once). All M activation rows take that weight row while it is in L1, in passes of up to
// kDenseMaxRows rows (balanced: 7 rows are 4 + 3), so more rows never add a second DRAM stream.
template <class T>
void dense_tiles(const float* x, int64_t M, int64_t K, const T* w, int64_t N, const float* scale, int64_t G,
                 const float* bias, float* y, int64_t t0, int64_t t1) {
  const int64_t passes = (M + kDenseMaxRows - 1) / kDenseMaxRows, per = (M + passes - 1) / passes;
  const int64_t n1 = std::min(N, t1 * kTile);
  for (int64_t n = t0 * kTile; n < n1; ++n) {
    for (int64_t m0 = 0; m0 < M; m0 += per) {
      const float* xm = x + m0 * K;
      float* ym = y + m0 * N;
      switch (std::min(per, M - m0)) {
        case 1: row_dots<T, 1>(xm, K, w, n, scale, G, bias, ym, N); break;
        case 2: row_dots<T, 2>(xm, K, w, n, scale, G, bias, ym, N); break;
        case 3: row_dots<T, 3>(xm, K, w, n, scale, G, bias, ym, N); break;
#if MIAOTUI_WIDE_DENSE_ROWS
        case 4: row_dots<T, 4>(xm, K, w, n, scale, G, bias, ym, N); break;
        case 5: row_dots<T, 5>(xm, K, w, n, scale, G, bias, ym, N); break;
        default: row_dots<T, 6>(xm, K, w, n, scale, G, bias, ym, N); break;
#else
        default: row_dots<T, 4>(xm, K, w, n, scale, G, bias, ym, N); break;
#endif
      }
    }
  }
}

inline int64_t tiles_of(int64_t N) { return (N + kTile - 1) / kTile; }

constexpr int64_t kBlock = 32;  // int4 columns per 16-byte block: group sizes must be multiples of it

// ------------------------------------------------------------------ int4 × int16 activations (vpmaddwd)
//
// An int4 kernel in fp32 spends an AND, a convert and an FMA on every 8 codes (measured 1.2-1.35x slower
// end to end on the AVX2 VM). Here the activations are rounded to int16 per block of 32 columns (a
// power-of-two scale, see block_scale: a relative error below 2^-15 of the block's largest value, ~250x
// finer than bf16), and 16 codes meet 16 activations in
// one vpmaddwd: per 32 codes of a row, one widening load, an AND, a shift, two multiply-adds, an add, a
// convert and an FMA. Groups of 32 (llama.cpp's Q4 layout) fold the group scale into the block's factor,
// 8 blocks at a time; larger groups sum their blocks first and apply the group scale once. Scales and zero
// points are fp16: 0.625 bytes per weight at group 32 instead of 0.75 in fp32 (with the folded scales,
// int4-g32 decode went from 123 to 154 tok/s at 2 threads). The zero points enter once per row, as a
// vector dot over groups: sum_g s_g z_g (sum of x over g), in fp32.
// 256-bit integer ops: the AVX-512 build runs the same code.

struct Int4QArgs {
  const int16_t* xq;  // [M][K/32][2][16]: per block, the 16 even columns then the 16 odd ones
  const float* xsc;   // [M][K/32]: each block's activation scale
  const float* xsum;  // [M][G]: the sum of x over each group (fp32, exact inputs)
  int64_t K, N, G, group;
  const uint8_t* w;
  const uint16_t *scale, *zero;  // fp16 [N][G]
  const float* bias;
  float* y;

  Int4QArgs from_row(int64_t m0) const {
    Int4QArgs a = *this;
    a.xq += m0 * K;
    a.xsc += m0 * (K / kBlock);
    a.xsum += m0 * G;
    return a;
  }
};

// The int16 scale of a block whose largest |x| is amax: the smallest power of two that keeps every value
// within ±32767. A power of two makes x / scale exact before rounding, so activations that are already
// small integers (W8A8's int8 codes) pass through unchanged; the rounding error stays below 2^-15 of amax.
inline float block_scale(float amax) {
  if (!(amax > 0.f)) return 1.f;
  int e;
  const float m = std::frexp(amax / 32767.f, &e);
  return std::ldexp(1.f, m == 0.5f ? e - 1 : e);
}

// One block of 32 activations to int16 at its block_scale; returns the scale. `split`: the int4 kernel's
// order (the 16 even columns, then the 16 odd ones), else the natural order (int8).
inline float round_block(const float* xb, int16_t* q, bool split) {
  float amax = 0.f;
  for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
  const float scale = block_scale(amax), inv = 1.f / scale;
  for (int j = 0; j < kBlock; ++j) q[split ? (j % 2) * 16 + j / 2 : j] = static_cast<int16_t>(std::lrintf(xb[j] * inv));
  return scale;
}

// buffer sizes of the int16 activations (int4 and int8) and of int4's group sums
inline int64_t q_xq_size(int64_t M, int64_t K) { return M * K; }
inline int64_t q_xsc_size(int64_t M, int64_t K) { return M * (K / kBlock); }
inline int64_t int4q_xsum_size(int64_t M, int64_t K, int64_t group) { return M * (K / group); }

inline void int4q_activations(const float* x, int64_t M, int64_t K, int64_t group, int16_t* xq, float* xsc,
                              float* xsum) {
  const int64_t blocks = K / kBlock, G = K / group;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) s += xm[k];
      xsum[m * G + g] = s;
    }
    for (int64_t b = 0; b < blocks; ++b)
      xsc[m * blocks + b] = round_block(xm + b * kBlock, xq + (m * blocks + b) * kBlock, true);
  }
}

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

inline __m256 half8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// The rows a q_rows call reads: NR weight rows from n (a short tail repeats its last row).
template <int NR>
struct Int4Rows {
  const uint8_t* w[NR];
  const uint16_t *s[NR], *z[NR];
  Int4Rows(const Int4QArgs& a, int64_t n, int nrows) {
    for (int r = 0; r < NR; ++r) {
      const int64_t rid = n + std::min(r, nrows - 1);
      w[r] = a.w + rid * (a.K / 2);
      s[r] = a.scale + rid * a.G;
      z[r] = a.zero + rid * a.G;
    }
  }
};

// sum over the 32 columns of block b of code * x for activation row m, as 8 int32 lanes
inline __m256i int4_block_dot(__m256i lo, __m256i hi, const int16_t* xb) {
  return _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb))),
                          _mm256_madd_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16))));
}

// Block b's codes of one row widened to int16: the even columns (low nibbles), then the odd ones.
inline void int4_block_codes(const uint8_t* row, int64_t b, __m256i& lo, __m256i& hi) {
  const __m256i raw = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16)));
  lo = _mm256_and_si256(raw, _mm256_set1_epi16(0x0F));
  hi = _mm256_srli_epi16(raw, 4);
}

// Groups of 32 (one per block, llama.cpp's Q4 layout): each block's dot is scaled by its group scale
// times its activation scale, 8 of those products computed in one vector per row.
template <int MR, int NR>
inline void int4_dots_g32(const Int4QArgs& a, const Int4Rows<NR>& rw, float* out) {
  __m256 tot[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) tot[r][m] = _mm256_setzero_ps();
  constexpr int kChunk = 8;
  const int64_t blocks = a.K / kBlock;
  alignas(32) float cs[NR][MR][kChunk];
  for (int64_t b0 = 0; b0 < blocks; b0 += kChunk) {
    const int nb = static_cast<int>(std::min<int64_t>(kChunk, blocks - b0));
    for (int r = 0; r < NR; ++r) {
      if (nb == kChunk) {
        const __m256 s = half8(rw.s[r] + b0);
        for (int m = 0; m < MR; ++m) _mm256_store_ps(cs[r][m], _mm256_mul_ps(s, _mm256_loadu_ps(a.xsc + m * blocks + b0)));
      } else {
        for (int j = 0; j < nb; ++j) {
          const float s = half_to_float(rw.s[r][b0 + j]);
          for (int m = 0; m < MR; ++m) cs[r][m][j] = s * a.xsc[m * blocks + b0 + j];
        }
      }
    }
    for (int j = 0; j < nb; ++j) {
      const int64_t b = b0 + j;
      if ((b & 3) == 0)
        for (int r = 0; r < NR; ++r) prefetch(rw.w[r] + b * 16 + kPrefetchBytes);
      for (int r = 0; r < NR; ++r) {
        __m256i lo, hi;
        int4_block_codes(rw.w[r], b, lo, hi);
        for (int m = 0; m < MR; ++m) {
          const __m256i d = int4_block_dot(lo, hi, a.xq + (m * blocks + b) * kBlock);
          tot[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_broadcast_ss(&cs[r][m][j]), tot[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) out[r * MR + m] = hsum256(tot[r][m]);
}

// Larger groups: the blocks of a group summed at their activation scales, the group scale applied once.
// The block loop repeats int4_dots_g32's on purpose: one always-inline helper with the factor as a lambda
// measured 0.64-0.82x as fast at 1 thread (K = 1536, in one process against this code).
template <int MR, int NR>
inline void int4_dots_grouped(const Int4QArgs& a, const Int4Rows<NR>& rw, float* out) {
  __m256 tot[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) tot[r][m] = _mm256_setzero_ps();
  const int64_t bpg = a.group / kBlock, blocks = a.K / kBlock;
  for (int64_t g = 0; g < a.G; ++g) {
    __m256 acc[NR][MR];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      if ((b & 3) == 0)
        for (int r = 0; r < NR; ++r) prefetch(rw.w[r] + b * 16 + kPrefetchBytes);
      for (int r = 0; r < NR; ++r) {
        __m256i lo, hi;
        int4_block_codes(rw.w[r], b, lo, hi);
        for (int m = 0; m < MR; ++m) {
          const __m256i d = int4_block_dot(lo, hi, a.xq + (m * blocks + b) * kBlock);
          acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(a.xsc[m * blocks + b]), acc[r][m]);
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m256 s = _mm256_set1_ps(half_to_float(rw.s[r][g]));
      for (int m = 0; m < MR; ++m) tot[r][m] = _mm256_fmadd_ps(s, acc[r][m], tot[r][m]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) out[r * MR + m] = hsum256(tot[r][m]);
}

template <int MR, int NR>
inline void q_rows(const Int4QArgs& a, int64_t n, int nrows, float* out) {
  const Int4Rows<NR> rw(a, n, nrows);
  if (a.group == kBlock) int4_dots_g32<MR, NR>(a, rw, out);
  else int4_dots_grouped<MR, NR>(a, rw, out);
  // the zero points: sum over groups of s * z * (sum of x over the group), 8 groups per step
  for (int r = 0; r < NR; ++r) {
    for (int m = 0; m < MR; ++m) {
      const float* xs = a.xsum + m * a.G;
      __m256 zacc = _mm256_setzero_ps();
      int64_t g = 0;
      for (; g + 8 <= a.G; g += 8) zacc = _mm256_fmadd_ps(_mm256_mul_ps(half8(rw.s[r] + g), half8(rw.z[r] + g)),
                                                          _mm256_loadu_ps(xs + g), zacc);
      float zsum = hsum256(zacc);
      for (; g < a.G; ++g) zsum += half_to_float(rw.s[r][g]) * half_to_float(rw.z[r][g]) * xs[g];
      out[r * MR + m] -= zsum;
    }
  }
}

// ------------------------------------------------------------------ int8 × int16 activations (vpmaddwd)
//
// The same idea for int8 weights: activations rounded to int16 per block of 32 columns, weights widened to
// int16 (16 per instruction), one vpmaddwd per 16 products: about 9 instructions per 32 weights of a row
// instead of 20 when each weight is converted to fp32 (1.5x the weights/s, L3-resident, one thread).
// Per-row scales are applied at the end, grouped ones folded into each block's activation scale. Needs K
// and the group to be multiples of 32 (int8q_ok); other shapes take the fp32 int8 kernel
// (dense_tiles<int8_t>).

struct Int8QArgs {
  const int16_t* xq;  // [M][K]: activations in int16, natural column order
  const float* xsc;   // [M][K/32]: each block's activation scale
  int64_t K, N, G;    // G = 0: one scale per row
  const int8_t* w;
  const float *scale, *bias;
  float* y;

  Int8QArgs from_row(int64_t m0) const {
    Int8QArgs a = *this;
    a.xq += m0 * K;
    a.xsc += m0 * (K / kBlock);
    return a;
  }
};

inline bool int8q_ok(int64_t K, int64_t G) { return K % kBlock == 0 && (G == 0 || (K / G) % kBlock == 0); }

inline void int8q_activations(const float* x, int64_t M, int64_t K, int16_t* xq, float* xsc) {
  const int64_t blocks = K / kBlock;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b)
      xsc[m * blocks + b] = round_block(x + m * K + b * kBlock, xq + m * K + b * kBlock, false);
}

template <int MR, int NR>
inline void q_rows(const Int8QArgs& a, int64_t n, int nrows, float* out) {
  const int64_t blocks = a.K / kBlock, bpg = a.G > 0 ? blocks / a.G : blocks;
  const int8_t* rows[NR];
  int64_t rid[NR];
  for (int r = 0; r < NR; ++r) {
    rid[r] = n + std::min(r, nrows - 1);  // a short tail repeats its last row
    rows[r] = a.w + rid[r] * a.K;
  }
  __m256 acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
  float sg[NR];  // this block's group scale per row (1 with per-row scales, applied at the end)
  for (int64_t b = 0, g = 0, in_group = 0; b < blocks; ++b) {
    if ((b & 1) == 0)
      for (int r = 0; r < NR; ++r) prefetch(rows[r] + b * kBlock + kPrefetchBytes);
    if (in_group == 0)
      for (int r = 0; r < NR; ++r) sg[r] = a.G > 0 ? a.scale[rid[r] * a.G + g] : 1.f;
    if (++in_group == bpg) in_group = 0, ++g;
    for (int r = 0; r < NR; ++r) {
      // a grouped scale is folded into the block's activation scale (one multiply per block)
      const int8_t* wb = rows[r] + b * kBlock;
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb)));
      const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 16)));
      for (int m = 0; m < MR; ++m) {
        const int16_t* xb = a.xq + m * a.K + b * kBlock;
        const __m256i d = _mm256_add_epi32(
            _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb))),
            _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16))));
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(a.xsc[m * blocks + b] * sg[r]), acc[r][m]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) out[r * MR + m] = hsum256(acc[r][m]) * (a.G > 0 ? 1.f : a.scale[rid[r]]);
}

// ------------------------------------------------------------------ tiles of the int16-activation kernels
//
// The same tiling for both: NR weight rows per call of q_rows (1 for one activation row, 2 for more), bias
// added on store. Args::from_row(m0) points the activation buffers at row m0.

template <class Args, int MR>
void q_tile(const Args& a, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int NR = MR == 1 ? 1 : 2;  // one row: a single stream, as in rows_tile (int8 +20-30 %, int4 +6-10 %)
  const Args am = a.from_row(m0);
  float out[NR * MR];
  for (int64_t n = n0; n < n1; n += NR) {
    const int nr = static_cast<int>(std::min<int64_t>(NR, n1 - n));
    q_rows<MR, NR>(am, n, nr, out);
    for (int r = 0; r < nr; ++r) {
      const float bias = a.bias ? a.bias[n + r] : 0.f;
      for (int m = 0; m < MR; ++m) a.y[(m0 + m) * a.N + n + r] = out[r * MR + m] + bias;
    }
  }
}

// Output-row tiles [t0, t1) for M activation rows (int4 or int8 weights, by the Args type).
template <class Args>
void q_tiles(const Args& a, int64_t M, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * kTile, n1 = std::min(a.N, n0 + kTile);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      switch (std::min<int64_t>(kMaxRows, M - m0)) {
        case 1: q_tile<Args, 1>(a, m0, n0, n1); break;
        case 2: q_tile<Args, 2>(a, m0, n0, n1); break;
        case 3: q_tile<Args, 3>(a, m0, n0, n1); break;
        default: q_tile<Args, 4>(a, m0, n0, n1); break;
      }
    }
  }
}

}  // namespace miaotui_kernels
