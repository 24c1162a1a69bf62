// The GEMV kernels' building blocks, shared by the per-op entry points (gemv.cpp) and the fused decode
// step (decode_step.cpp). See gemv.cpp for the design; everything here computes a range of output-row
// tiles, so a caller chooses how threads share them (at::parallel_for per op, or one parallel region
// per decode step).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace miaotui_kernels {

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int kLanes = 16;
using vf = __m512;
using vi = __m512i;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float v) { return _mm512_set1_ps(v); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vfnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vcvt(vi a) { return _mm512_cvtepi32_ps(a); }
inline vi vand(vi a, vi b) { return _mm512_and_si512(a, b); }
inline vi vset1i(int32_t v) { return _mm512_set1_epi32(v); }
inline vi vsrli28(vi a) { return _mm512_srli_epi32(a, 28); }
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
// 16 consecutive weights of one row as fp32
inline vf load_w(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vf load_w(const uint16_t* p) {  // bf16: the upper half of an fp32
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline vf load_w(const float* p) { return _mm512_loadu_ps(p); }
// int4: 16 bytes (32 codes) from each of kPack rows, one row per 128-bit quarter
constexpr int kPack = 4;
inline vi load_codes(const uint8_t* const* rows, int64_t off) {
  vi v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[0] + off)));
  v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[1] + off)), 1);
  v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[2] + off)), 2);
  return _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[3] + off)), 3);
}
inline vf per_row(const float* const* p, int64_t off) {  // p[r][off] broadcast over row r's quarter
  __m512 v = _mm512_castps128_ps512(_mm_set1_ps(p[0][off]));
  v = _mm512_insertf32x4(v, _mm_set1_ps(p[1][off]), 1);
  v = _mm512_insertf32x4(v, _mm_set1_ps(p[2][off]), 2);
  return _mm512_insertf32x4(v, _mm_set1_ps(p[3][off]), 3);
}
inline void split_rows(vf v, float* out) {  // the sum of each 128-bit quarter: one output row each
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  for (int r = 0; r < 4; ++r) out[r] = (t[4 * r] + t[4 * r + 1]) + (t[4 * r + 2] + t[4 * r + 3]);
}
#else
constexpr int kLanes = 8;
using vf = __m256;
using vi = __m256i;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float v) { return _mm256_set1_ps(v); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vfnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vcvt(vi a) { return _mm256_cvtepi32_ps(a); }
inline vi vand(vi a, vi b) { return _mm256_and_si256(a, b); }
inline vi vset1i(int32_t v) { return _mm256_set1_epi32(v); }
inline vi vsrli28(vi a) { return _mm256_srli_epi32(a, 28); }
inline float vsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline vf load_w(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vf load_w(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline vf load_w(const float* p) { return _mm256_loadu_ps(p); }
constexpr int kPack = 2;
inline vi load_codes(const uint8_t* const* rows, int64_t off) {
  return _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(rows[1] + off),
                             reinterpret_cast<const __m128i*>(rows[0] + off));
}
inline vf per_row(const float* const* p, int64_t off) {
  return _mm256_set_m128(_mm_set1_ps(p[1][off]), _mm_set1_ps(p[0][off]));
}
inline void split_rows(vf v, float* out) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  for (int r = 0; r < 2; ++r) out[r] = (t[4 * r] + t[4 * r + 1]) + (t[4 * r + 2] + t[4 * r + 3]);
}
#endif

inline float scalar_w(int8_t v) { return static_cast<float>(v); }
inline float scalar_w(float v) { return v; }
inline float scalar_w(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

constexpr int kMaxRows = 4;  // activation rows per pass over a weight tile
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

// NR output rows x MR activation rows; KU independent accumulators per pair hide the FMA latency when
// there are few pairs. The main loop advances one cache line (VPL vectors) of each weight row at a time.
template <class T, int MR, int NR>
inline void dot_rows(const float* x, int64_t K, const T* w, int64_t ldw, float* out) {
  constexpr int VPL = std::max<int>(1, 64 / int(sizeof(T) * kLanes));
  constexpr int KU = std::min(VPL, MR * NR >= 8 ? 1 : (MR * NR >= 4 ? 2 : 4));
  constexpr int64_t PF = kPrefetchBytes / int64_t(sizeof(T));
  vf acc[KU][NR][MR];
  for (int u = 0; u < KU; ++u)
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MR; ++m) acc[u][r][m] = vzero();
  int64_t k = 0;
  for (; k + VPL * kLanes <= K; k += VPL * kLanes) {
    for (int r = 0; r < NR; ++r) prefetch(w + r * ldw + k + PF);
    for (int v = 0; v < VPL; ++v) {
      const int64_t kk = k + v * kLanes;
      for (int r = 0; r < NR; ++r) {
        const vf wv = load_w(w + r * ldw + kk);
        for (int m = 0; m < MR; ++m) acc[v % KU][r][m] = vfma(wv, vload(x + m * K + kk), acc[v % KU][r][m]);
      }
    }
  }
  for (; k + kLanes <= K; k += kLanes) {
    for (int r = 0; r < NR; ++r) {
      const vf wv = load_w(w + r * ldw + k);
      for (int m = 0; m < MR; ++m) acc[0][r][m] = vfma(wv, vload(x + m * K + k), acc[0][r][m]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int m = 0; m < MR; ++m) {
      vf s = acc[0][r][m];
      for (int u = 1; u < KU; ++u) s = vadd(s, acc[u][r][m]);
      float tail = 0.f;
      for (int64_t t = k; t < K; ++t) tail += scalar_w(w[r * ldw + t]) * x[m * K + t];
      out[r * MR + m] = vsum(s) + tail;
    }
  }
}

// int8 with a scale per (row, group of columns): each group's dot is accumulated apart, then scaled and
// summed, so the result is "dequantize, then fp32 matmul" up to summation order. group % kLanes == 0.
template <int MR, int NR>
inline void dot_rows_grouped(const float* x, int64_t K, const int8_t* w, int64_t ldw, const float* scale,
                             int64_t G, float* out) {
  constexpr int KU = MR * NR >= 4 ? 1 : 2;
  const int64_t group = K / G;
  vf tot[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) tot[r][m] = vzero();
  for (int64_t g = 0; g < G; ++g) {
    vf acc[KU][NR][MR];
    for (int u = 0; u < KU; ++u)
      for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MR; ++m) acc[u][r][m] = vzero();
    const int64_t k0 = g * group, k1 = k0 + group;
    for (int64_t k = k0; k < k1; k += kLanes) {
      if ((k & 63) < kLanes)
        for (int r = 0; r < NR; ++r) prefetch(w + r * ldw + k + kPrefetchBytes);
      const int u = int((k - k0) / kLanes) % KU;
      for (int r = 0; r < NR; ++r) {
        const vf wv = load_w(w + r * ldw + k);
        for (int m = 0; m < MR; ++m) acc[u][r][m] = vfma(wv, vload(x + m * K + k), acc[u][r][m]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      const vf s = vset1(scale[r * G + g]);
      for (int m = 0; m < MR; ++m) {
        vf a = acc[0][r][m];
        for (int u = 1; u < KU; ++u) a = vadd(a, acc[u][r][m]);
        tot[r][m] = vfma(s, a, tot[r][m]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) out[r * MR + m] = vsum(tot[r][m]);
}

template <class T, int MR>
void rows_tile(const float* x, int64_t K, const T* w, int64_t n0, int64_t n1, int64_t N,
               const float* scale, int64_t G, const float* bias, float* y) {
  constexpr int NR = MR <= 2 ? 4 : 2;
  float out[NR * MR];
  int64_t n = n0;
  // per-row scale (or none) applied here; grouped scales were applied inside the dot
  const float* row_scale = G > 0 ? nullptr : scale;
  auto store = [&](int nr) {
    for (int r = 0; r < nr; ++r) {
      const float s = row_scale ? row_scale[n + r] : 1.f, b = bias ? bias[n + r] : 0.f;
      for (int m = 0; m < MR; ++m) y[m * N + n + r] = out[r * MR + m] * s + b;
    }
  };
  for (; n + NR <= n1; n += NR) {
    if constexpr (std::is_same_v<T, int8_t>) {
      if (G > 0) {
        dot_rows_grouped<MR, NR>(x, K, w + n * K, K, scale + n * G, G, out);
        store(NR);
        continue;
      }
    }
    dot_rows<T, MR, NR>(x, K, w + n * K, K, out);
    store(NR);
  }
  for (; n < n1; ++n) {
    if constexpr (std::is_same_v<T, int8_t>) {
      if (G > 0) {
        dot_rows_grouped<MR, 1>(x, K, w + n * K, K, scale + n * G, G, out);
        store(1);
        continue;
      }
    }
    dot_rows<T, MR, 1>(x, K, w + n * K, K, out);
    store(1);
  }
}

// Output-row tiles [t0, t1) of y = x . W^T for M rows of x: the unit a thread computes. With grouped
// int8 scales (G > 0: scale is [N, G]), each group's partial dot is scaled before it is summed.
template <class T>
void dense_tiles(const float* x, int64_t M, int64_t K, const T* w, int64_t N, const float* scale, int64_t G,
                 const float* bias, float* y, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * kTile, n1 = std::min(N, n0 + kTile);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const float* xm = x + m0 * K;
      float* ym = y + m0 * N;
      switch (std::min<int64_t>(kMaxRows, M - m0)) {
        case 1: rows_tile<T, 1>(xm, K, w, n0, n1, N, scale, G, bias, ym); break;
        case 2: rows_tile<T, 2>(xm, K, w, n0, n1, N, scale, G, bias, ym); break;
        case 3: rows_tile<T, 3>(xm, K, w, n0, n1, N, scale, G, bias, ym); break;
        default: rows_tile<T, 4>(xm, K, w, n0, n1, N, scale, G, bias, ym); break;
      }
    }
  }
}

inline int64_t tiles_of(int64_t N) { return (N + kTile - 1) / kTile; }

// ------------------------------------------------------------------ int4: kPack rows per vector
//
// 32 columns of a row are 16 bytes; read as four 32-bit lanes, lane l holds columns 8l..8l+7 with column
// 8l+i in bits 4i..4i+3. So (lanes & (0xF << 4i)) converted to fp32 is code * 2^(4i) for columns 8l+i,
// and multiplying it by x * 2^(-4i) (exact: a power of two) gives code * x: one AND, one convert and one
// FMA per vector of codes, with no shuffles. The activations are rearranged once per call into that order
// (`xp`), repeated for each of the kPack rows that share a vector. Nibble 7 would land in the sign bit,
// so it is shifted down instead. The zero point enters once per group: s * (sum q*x - z * sum x).

constexpr int64_t kBlock = 32;  // columns per 16-byte block: group sizes must be multiples of it

struct Int4Args {
  const float* xp;  // [M][K/32][8 nibbles][kLanes]
  const float* xs;  // [M][G][kLanes]: per lane, the sum of x over the lane's columns in the group
  int64_t K, N, G, group;
  const uint8_t* w;
  const float *scale, *zero, *bias;
  float* y;
};

template <int MR, int P>
inline void int4_rows(const Int4Args& a, int64_t n, int nrows, float* out) {
  // split accumulators: about 8 independent FMA chains cover the FMA latency (4 cycles, 2 ports)
  constexpr int S = MR * P <= 2 ? 4 : 2;
  const int64_t ldw = a.K / 2, blocks_per_group = a.group / kBlock;
  const int64_t xp_stride = (a.K / kBlock) * 8 * kLanes, xs_stride = a.G * kLanes;
  const uint8_t* rows[P][kPack];
  const float* srow[P][kPack];
  const float* zrow[P][kPack];
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < kPack; ++j) {
      const int64_t r = n + std::min(p * kPack + j, nrows - 1);  // a short tail repeats its last row
      rows[p][j] = a.w + r * ldw;
      srow[p][j] = a.scale + r * a.G;
      zrow[p][j] = a.zero + r * a.G;
    }
  vi masks[7];
  for (int i = 0; i < 7; ++i) masks[i] = vset1i(0xF << (4 * i));
  vf acc[P][MR];
  for (int p = 0; p < P; ++p)
    for (int m = 0; m < MR; ++m) acc[p][m] = vzero();
  for (int64_t g = 0; g < a.G; ++g) {
    vf dot[S][P][MR];
    for (int s = 0; s < S; ++s)
      for (int p = 0; p < P; ++p)
        for (int m = 0; m < MR; ++m) dot[s][p][m] = vzero();
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
      vi codes[P];
      for (int p = 0; p < P; ++p) {
        if ((b & 3) == 0)
          for (int j = 0; j < kPack; ++j) prefetch(rows[p][j] + b * 16 + kPrefetchBytes);
        codes[p] = load_codes(rows[p], b * 16);
      }
      const float* xb = a.xp + b * 8 * kLanes;
      for (int i = 0; i < 8; ++i) {
        for (int p = 0; p < P; ++p) {
          const vf q = vcvt(i == 7 ? vsrli28(codes[p]) : vand(codes[p], masks[i]));
          for (int m = 0; m < MR; ++m)
            dot[i % S][p][m] = vfma(q, vload(xb + m * xp_stride + i * kLanes), dot[i % S][p][m]);
        }
      }
    }
    for (int p = 0; p < P; ++p) {
      const vf sv = per_row(srow[p], g), zv = per_row(zrow[p], g);
      for (int m = 0; m < MR; ++m) {
        vf d = dot[0][p][m];
        for (int s = 1; s < S; ++s) d = vadd(d, dot[s][p][m]);
        d = vfnma(zv, vload(a.xs + m * xs_stride + g * kLanes), d);
        acc[p][m] = vfma(sv, d, acc[p][m]);
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int m = 0; m < MR; ++m) {
      float r[kPack];
      split_rows(acc[p][m], r);
      for (int j = 0; j < kPack; ++j) out[(p * kPack + j) * MR + m] = r[j];
    }
}

template <int MR>
void int4_tile(const Int4Args& a, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int P = MR == 1 ? 2 : 1;
  constexpr int R = P * kPack;
  Int4Args am = a;
  am.xp += m0 * (a.K / kBlock) * 8 * kLanes;
  am.xs += m0 * a.G * kLanes;
  float out[R * MR];
  for (int64_t n = n0; n < n1; n += R) {
    const int nr = static_cast<int>(std::min<int64_t>(R, n1 - n));
    int4_rows<MR, P>(am, n, nr, out);
    for (int r = 0; r < nr; ++r) {
      const float b = a.bias ? a.bias[n + r] : 0.f;
      for (int m = 0; m < MR; ++m) a.y[(m0 + m) * a.N + n + r] = out[r * MR + m] + b;
    }
  }
}

// Activations in the int4 kernel's order (see above): xp[m][block][i][lane] = x[m][32 block + 8 (lane % 4) + i]
// * 2^-4i, and xs[m][group][lane] = the sum of x over the lane's columns in the group.
inline void int4_activations(const float* x, int64_t M, int64_t K, int64_t group, float* xp, float* xs) {
  const int64_t blocks = K / kBlock, G = K / group;
  std::fill(xs, xs + M * G * kLanes, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b)
      for (int i = 0; i < 8; ++i) {
        const float f = i == 7 ? 1.f : 1.f / float(1 << (4 * i));
        for (int lane = 0; lane < kLanes; ++lane) {
          const float v = x[m * K + b * kBlock + 8 * (lane % 4) + i];
          xp[((m * blocks + b) * 8 + i) * kLanes + lane] = v * f;
          xs[(m * G + b * kBlock / group) * kLanes + lane] += v;
        }
      }
}

inline int64_t int4_xp_size(int64_t M, int64_t K) { return M * (K / kBlock) * 8 * kLanes; }
inline int64_t int4_xs_size(int64_t M, int64_t K, int64_t group) { return M * (K / group) * kLanes; }

// Output-row tiles [t0, t1) of the int4 product for M rows (activations already in kernel order).
inline void int4_tiles(const Int4Args& a, int64_t M, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * kTile, n1 = std::min(a.N, n0 + kTile);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      switch (std::min<int64_t>(kMaxRows, M - m0)) {
        case 1: int4_tile<1>(a, m0, n0, n1); break;
        case 2: int4_tile<2>(a, m0, n0, n1); break;
        case 3: int4_tile<3>(a, m0, n0, n1); break;
        default: int4_tile<4>(a, m0, n0, n1); break;
      }
    }
  }
}

}  // namespace miaotui_kernels
