// Many-row products with fp32 or bf16 weights: y[M x N] = x[M x K] . W^T (+ bias), fp32 accumulation.
//
// Continuous batching's decode steps multiply 8 to 128 rows by every weight. There MKL's sgemm runs at a
// third to a half of this VM's FMA peak (it is tuned for larger products), and the GEMV kernels re-read
// each weight tile from L2 for every 4 rows. This is the textbook register-blocked GEMM: a block of W
// (at most 384 input columns x 64 output features) is packed, transposed, into a thread's buffer, then
// every 6 rows of x are multiplied by it in a 6 x 16 register tile (12 accumulators, two weight loads
// and six broadcasts per input column). One 16-feature panel stays in L1 while the rows stream past it.
// bf16 weights are widened to fp32 while packing, so both dtypes share the micro-kernel. 256-bit code in
// both builds (AVX-512 machines run it as it is). Measured on 2 cores: 32 rows x SmolLM2's layers with
// weights from DRAM 104 vs MKL's 77 GFLOP/s; with thousands of rows it is level with MKL (110-150), so
// kernels/linear.py sends those to MKL.
//
// Work is split between threads in units of (up to 144 rows, 64 output features), each packing its own
// block: nothing is shared between threads.
//
// Up to kXtRows rows of fp32 weights take a second kernel that packs nothing but x: x is transposed into
// [K][8 | 16 | 24 | 32] (zero-padded), and each weight is broadcast straight from W's rows onto 1-3 of
// those vectors (12 accumulators: 12, 6 or 4 weight rows at a time; 32 rows in two passes of 16). W is
// read once, front to back, with no packing pass in between, which at these row counts is what bounds the
// packed GEMM, and the next rows are prefetched in address order while the current ones are multiplied.
// All of SmolLM2's layers, weights from DRAM, 2 threads, interleaved in one process: 37.5 vs 52.6 ms at 16
// rows, 53 vs 67 at 24, 71 vs 80 at 32.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kMR = 6;      // rows of x per micro-tile
constexpr int kNR = 16;     // output features per micro-tile (two 8-lane vectors)
constexpr int64_t kKC = 384;  // most input columns per packed block: a 16-feature panel is <= 24 KB (L1)
constexpr int64_t kMC = 144;  // rows per work unit: their 6-row slices reuse one packed block from L2

inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// 8 consecutive weights of one row as fp32
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// W[n0 : n0 + nc, k0 : k0 + kc] -> dst as nc / 16 panels of [kc][16] (features past N are zero). Eight
// rows by eight columns at a time through an 8 x 8 register transpose; scalar at the edges.
template <class T>
void pack_block(const T* w, int64_t K, int64_t N, int64_t n0, int64_t nc, int64_t k0, int64_t kc, float* dst) {
  for (int64_t p = 0; p < nc; p += kNR) {
    float* panel = dst + p * kc;
    for (int64_t h = 0; h < kNR; h += 8) {
      const int64_t r0 = n0 + p + h;
      const int64_t rows = std::clamp<int64_t>(N - r0, 0, 8);
      int64_t k = 0;
      // the next 8 rows: their segments are too short for the hardware prefetcher to start on its own
      const int64_t next = r0 + 8 < N && p + h + 8 < nc ? std::min<int64_t>(8, N - r0 - 8) : 0;
      if (rows == 8) {
        for (; k + 8 <= kc; k += 8) {
          if ((k & 15) == 0)
            for (int64_t i = 0; i < next; ++i)
              _mm_prefetch(reinterpret_cast<const char*>(w + (r0 + 8 + i) * K + k0 + k), _MM_HINT_T0);
          __m256 r[8];
          for (int i = 0; i < 8; ++i) r[i] = load8(w + (r0 + i) * K + k0 + k);
          // 8 x 8 transpose: r[i] holds feature i at input columns k..k+7; panel row k + j gets column j
          __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
          __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
          __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
          __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
          __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
          __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
          __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
          __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
          float* d = panel + k * kNR + h;
          _mm256_storeu_ps(d + 0 * kNR, _mm256_permute2f128_ps(s0, s4, 0x20));
          _mm256_storeu_ps(d + 1 * kNR, _mm256_permute2f128_ps(s1, s5, 0x20));
          _mm256_storeu_ps(d + 2 * kNR, _mm256_permute2f128_ps(s2, s6, 0x20));
          _mm256_storeu_ps(d + 3 * kNR, _mm256_permute2f128_ps(s3, s7, 0x20));
          _mm256_storeu_ps(d + 4 * kNR, _mm256_permute2f128_ps(s0, s4, 0x31));
          _mm256_storeu_ps(d + 5 * kNR, _mm256_permute2f128_ps(s1, s5, 0x31));
          _mm256_storeu_ps(d + 6 * kNR, _mm256_permute2f128_ps(s2, s6, 0x31));
          _mm256_storeu_ps(d + 7 * kNR, _mm256_permute2f128_ps(s3, s7, 0x31));
        }
      }
      for (; k < kc; ++k)
        for (int64_t i = 0; i < 8; ++i)
          panel[k * kNR + h + i] = i < rows ? widen(w[(r0 + i) * K + k0 + k]) : 0.f;
    }
  }
}

// y[MR x nr] (+)= x[MR x kc] . panel[kc x 16]; `first`: start from the bias (or zero) instead of y.
// The twelve accumulators are named variables: held in an array, GCC 12 writes every one back to the
// stack on each iteration (measured 2.5x slower). A partial tile (nr < 16) goes through a padded copy.
template <int MR>
void micro(const float* x, int64_t K, const float* panel, int64_t kc, float* y, int64_t N, int64_t nr,
           const float* bias, bool first) {
  alignas(32) float pad[kMR][kNR] = {};
  float* rows[kMR];  // where each row's 16 results are read and written: y itself, or the padded copy
  for (int i = 0; i < kMR; ++i) rows[i] = nr == kNR && i < MR ? y + i * N : pad[i];
  alignas(32) float start[kNR] = {};  // the first k block starts from the bias
  if (first && bias) std::memcpy(start, bias, nr * sizeof(float));
  if (nr < kNR && !first)
    for (int i = 0; i < MR; ++i) std::memcpy(pad[i], y + i * N, nr * sizeof(float));
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (first) {
    c00 = c10 = c20 = c30 = c40 = c50 = _mm256_load_ps(start);
    c01 = c11 = c21 = c31 = c41 = c51 = _mm256_load_ps(start + 8);
  } else {
    c00 = _mm256_loadu_ps(rows[0]), c01 = _mm256_loadu_ps(rows[0] + 8);
    c10 = _mm256_loadu_ps(rows[1]), c11 = _mm256_loadu_ps(rows[1] + 8);
    c20 = _mm256_loadu_ps(rows[2]), c21 = _mm256_loadu_ps(rows[2] + 8);
    c30 = _mm256_loadu_ps(rows[3]), c31 = _mm256_loadu_ps(rows[3] + 8);
    c40 = _mm256_loadu_ps(rows[4]), c41 = _mm256_loadu_ps(rows[4] + 8);
    c50 = _mm256_loadu_ps(rows[5]), c51 = _mm256_loadu_ps(rows[5] + 8);
  }
  const float *x0 = x, *x1 = x + K, *x2 = x + 2 * K, *x3 = x + 3 * K, *x4 = x + 4 * K, *x5 = x + 5 * K;
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(panel + k * kNR), b1 = _mm256_load_ps(panel + k * kNR + 8);
#define MIAOTUI_GEMM_ROW(i)                                  \
    if constexpr (MR > i) {                                  \
      const __m256 a = _mm256_broadcast_ss(x##i + k);        \
      c##i##0 = _mm256_fmadd_ps(a, b0, c##i##0);             \
      c##i##1 = _mm256_fmadd_ps(a, b1, c##i##1);             \
    }
    MIAOTUI_GEMM_ROW(0) MIAOTUI_GEMM_ROW(1) MIAOTUI_GEMM_ROW(2)
    MIAOTUI_GEMM_ROW(3) MIAOTUI_GEMM_ROW(4) MIAOTUI_GEMM_ROW(5)
#undef MIAOTUI_GEMM_ROW
  }
  _mm256_storeu_ps(rows[0], c00), _mm256_storeu_ps(rows[0] + 8, c01);
  _mm256_storeu_ps(rows[1], c10), _mm256_storeu_ps(rows[1] + 8, c11);
  _mm256_storeu_ps(rows[2], c20), _mm256_storeu_ps(rows[2] + 8, c21);
  _mm256_storeu_ps(rows[3], c30), _mm256_storeu_ps(rows[3] + 8, c31);
  _mm256_storeu_ps(rows[4], c40), _mm256_storeu_ps(rows[4] + 8, c41);
  _mm256_storeu_ps(rows[5], c50), _mm256_storeu_ps(rows[5] + 8, c51);
  if (nr < kNR)
    for (int i = 0; i < MR; ++i) std::memcpy(y + i * N, pad[i], nr * sizeof(float));
}

void micro_rows(int rows, const float* x, int64_t K, const float* panel, int64_t kc, float* y, int64_t N,
                int64_t nr, const float* bias, bool first) {
  switch (rows) {
    case 1: micro<1>(x, K, panel, kc, y, N, nr, bias, first); break;
    case 2: micro<2>(x, K, panel, kc, y, N, nr, bias, first); break;
    case 3: micro<3>(x, K, panel, kc, y, N, nr, bias, first); break;
    case 4: micro<4>(x, K, panel, kc, y, N, nr, bias, first); break;
    case 5: micro<5>(x, K, panel, kc, y, N, nr, bias, first); break;
    default: micro<6>(x, K, panel, kc, y, N, nr, bias, first); break;
  }
}

// ------------------------------------------------------------------ few rows: W broadcast onto x^T
// above this the packed GEMM's reuse of its block wins: xt / packed speed 1.40 at 16 rows, 1.26 at 24, 1.12 at
// 32, 0.91 at 40, 0.83 at 64 (all of SmolLM2's layers, interleaved in one process)
constexpr int64_t kXtRows = 32;

// acc[r][v] = sum_k W[r][k] * xT[k][8v : 8v + 8] for R rows of W (ldw apart) and MV vectors of xT (Mp apart)
template <int R, int MV>
inline void xt_micro(const float* xT, int64_t Mp, int64_t K, const float* w, int64_t ldw, float* out) {
  __m256 acc[R][MV];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) acc[r][v] = _mm256_setzero_ps();
  auto step = [&](int64_t k) __attribute__((always_inline)) {
    __m256 xv[MV];
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) xv[v] = _mm256_loadu_ps(xT + k * Mp + 8 * v);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m256 b = _mm256_broadcast_ss(w + r * ldw + k);
#pragma GCC unroll 4
      for (int v = 0; v < MV; ++v) acc[r][v] = _mm256_fmadd_ps(b, xv[v], acc[r][v]);
    }
  };
  int64_t k = 0;
  // unrolled 16 deep, no branch per column. Every 16 columns, R cache lines of the NEXT R rows (contiguous
  // when ldw == K, as xt_rows walks them) are prefetched in address order: DRAM then sees one sequential
  // stream per thread instead of R interleaved ones (prefetching each row ahead: 40-45 vs 24-29 ms at 16 rows)
  const char* next = reinterpret_cast<const char*>(w + R * ldw);
  for (; k + 16 <= K; k += 16) {
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) _mm_prefetch(next + (k / 16 * R + r) * 64, _MM_HINT_T0);
#pragma GCC unroll 16
    for (int kk = 0; kk < 16; ++kk) step(k + kk);
  }
  for (; k < K; ++k) step(k);
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) _mm256_storeu_ps(out + (r * MV + v) * 8, acc[r][v]);
}

// weight rows [n0, n1) for all M rows: groups of R, a short tail one row at a time. Up to 24 rows in one
// pass of MV = 1-3 vectors; more in chunks of 16 columns of xT (2 vectors, R = 6), the group's rows read
// from DRAM by the first chunk and from L1/L2 by the rest.
template <int MV>
void xt_rows(const float* xT, int64_t Mp, int64_t M, int64_t K, const float* w, int64_t N, const float* bias,
             float* y, int64_t n0, int64_t n1) {
  constexpr int R = 12 / MV;
  alignas(32) float out[12 * 8];
  auto run = [&](int rows, int64_t n) {
    for (int64_t m0 = 0; m0 < Mp; m0 += 8 * MV) {  // Mp is a multiple of 8 * MV (xt_gemm's dispatch)
      if (rows == R) xt_micro<R, MV>(xT + m0, Mp, K, w + n * K, K, out);
      else xt_micro<1, MV>(xT + m0, Mp, K, w + n * K, K, out);
      for (int r = 0; r < rows; ++r) {
        const float b = bias ? bias[n + r] : 0.f;
        for (int64_t i = 0; i < 8 * MV && m0 + i < M; ++i) y[(m0 + i) * N + n + r] = out[r * MV * 8 + i] + b;
      }
    }
  };
  int64_t n = n0;
  for (; n + R <= n1; n += R) run(R, n);
  for (; n < n1; ++n) run(1, n);
}

void xt_gemm(const float* x, int64_t M, int64_t K, const float* w, int64_t N, const float* bias, float* y) {
  const int64_t vectors = (M + 7) / 8, Mp = 8 * vectors;
  std::vector<float> xT(size_t(K * Mp), 0.f);
  for (int64_t k = 0; k < K; ++k)  // written in order; the M rows of x are read as M streams
    for (int64_t m = 0; m < M; ++m) xT[k * Mp + m] = x[m * K + k];
  // threads take contiguous runs of 12-row groups, each at least ~48 KB of weights (a fork costs microseconds)
  const int64_t groups = (N + 11) / 12, grain = std::max<int64_t>(1, 48 * 1024 / (12 * K * 4));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    const int64_t n0 = g0 * 12, n1 = std::min(N, g1 * 12);
    switch (vectors) {
      case 1: xt_rows<1>(xT.data(), Mp, M, K, w, N, bias, y, n0, n1); break;
      case 3: xt_rows<3>(xT.data(), Mp, M, K, w, N, bias, y, n0, n1); break;
      default: xt_rows<2>(xT.data(), Mp, M, K, w, N, bias, y, n0, n1); break;  // 2 vectors, or 4 in two passes
    }
  });
}

// ------------------------------------------------------------------ many rows: packed, register-blocked

template <class T>
void gemm(const float* x, int64_t M, int64_t K, const T* w, int64_t N, const float* bias, float* y) {
  const int64_t m_units = (M + kMC - 1) / kMC;
  // output features per unit: 64, or fewer when that leaves too few units to share between threads
  int64_t nc = 64;
  while (nc > kNR && m_units * ((N + nc - 1) / nc) < 4 * at::get_num_threads()) nc /= 2;
  const int64_t n_units = (N + nc - 1) / nc;
  at::parallel_for(0, m_units * n_units, 1, [&](int64_t u0, int64_t u1) {
    // K in equal blocks of at most kKC columns (384 -> one block, 576 -> two of 288)
    const int64_t k_blocks = (K + kKC - 1) / kKC, kc_max = (K + k_blocks - 1) / k_blocks;
    // 64-byte aligned: a panel row is one cache line, so its two 8-lane loads never straddle lines
    std::vector<float> buffer(size_t(nc * kc_max + 16));
    float* packed = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t(63));
    for (int64_t u = u0; u < u1; ++u) {
      // row-major order: consecutive units of one thread reuse its block of x from L2
      const int64_t n0 = (u % n_units) * nc, m0 = (u / n_units) * kMC;
      const int64_t ncur = std::min(nc, N - n0), m1 = std::min(M, m0 + kMC);
      const int64_t npad = (ncur + kNR - 1) / kNR * kNR;
      for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
        const int64_t kc = std::min(kc_max, K - k0);
        pack_block(w, K, N, n0, npad, k0, kc, packed);
        // one 16-feature panel stays in L1 while every 6-row slice of x streams past it from L2
        for (int64_t p = 0; p < npad; p += kNR)
          for (int64_t m = m0; m < m1; m += kMR) {
            const int rows = int(std::min<int64_t>(kMR, m1 - m));
            micro_rows(rows, x + m * K + k0, K, packed + p * kc, kc, y + m * N + n0 + p, N,
                       std::min<int64_t>(kNR, ncur - p), bias ? bias + n0 + p : nullptr, k0 == 0);
          }
      }
    }
  });
}

at::Tensor gemm_dense(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "weight: contiguous fp32 or bf16 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous 2-D fp32 CPU tensor");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the weight ", K);
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "bias must be a contiguous fp32 tensor of out_features values");
    b = bias->data_ptr<float>();
  }
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return b ? bias->expand({M, N}).contiguous() : y.zero_();
  if (w.scalar_type() == at::kFloat && M <= kXtRows)
    xt_gemm(x.data_ptr<float>(), M, K, w.data_ptr<float>(), N, b, y.data_ptr<float>());
  else if (w.scalar_type() == at::kFloat)
    gemm<float>(x.data_ptr<float>(), M, K, w.data_ptr<float>(), N, b, y.data_ptr<float>());
  else
    gemm<uint16_t>(x.data_ptr<float>(), M, K, reinterpret_cast<const uint16_t*>(w.data_ptr()), N, b,
                   y.data_ptr<float>());
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(miaotui, m) { m.def("gemm_dense(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(miaotui, CPU, m) { m.impl("gemm_dense", &gemm_dense); }
