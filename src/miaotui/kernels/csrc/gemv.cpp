// Few-row matrix-vector products for decode: y[M x N] = x[M x K] . W^T (+ bias), fp32 activations.
//
// A decode step multiplies one row (or a handful: batched decode, speculative verify) by every weight
// matrix, so it is bound by how fast the weights stream from memory. Each kernel reads its weights once
// per tile of output rows, widens them to fp32 in registers and accumulates with FMAs; the activations
// stay fp32, so the dense and int8 kernels equal "dequantize, then fp32 matmul" up to the order of the
// fp32 sums. int4 and int8 (where in_features and the group are multiples of 32) round the activations
// to int16 per block of 32 (relative error < 2e-5 of the block's largest value) to use integer
// multiply-adds: int4 1.2-1.35x faster decode than its fp32 version.
//
//   gemv_int8   int8 weights [N, K] with one fp32 scale per output row (applied once, at the end), or
//               per (row, group of columns): scale [N, G], each group's partial dot scaled, then summed
//   gemv_int4   4-bit codes packed two per byte [N, K/2] (even column in the low nibble: the portable
//               checkpoint layout, read as it is), fp16 scale and zero point per (row, group of columns)
//   gemv_dense  bf16 or fp32 weights [N, K]
//
// Output rows are split between threads (at::parallel_for) in contiguous tiles, so each thread streams
// its own slice of the weight matrix front to back. Inputs of more than 4 rows are taken 4 rows at a
// time over each tile of weights, which then comes from L1/L2 rather than memory.
//
// Built for AVX2 + FMA (the 256-bit path) and, when the compiler is given AVX-512, a 512-bit path
// (dense and int8; int4 runs its 256-bit integer code in both builds).
// The kernels themselves live in gemv_kernels.h (shared with the fused decode step, decode_step.cpp).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "gemv_kernels.h"

namespace {

using namespace miaotui_kernels;

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous 2-D fp32 CPU tensor");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the weight ", K);
}

const float* bias_ptr(const std::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
              "bias must be a contiguous fp32 tensor of out_features values");
  return bias->data_ptr<float>();
}

const uint16_t* half_bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }

template <class T>
void gemv_rows(const float* x, int64_t M, int64_t K, const T* w, int64_t N, const float* scale, int64_t G,
               const float* bias, float* y) {
  at::parallel_for(0, tiles_of(N), grain_tiles(kTile * K * int64_t(sizeof(T))), [&](int64_t t0, int64_t t1) {
    dense_tiles<T>(x, M, K, w, N, scale, G, bias, y, t0, t1);
  });
}

at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2 && w.is_contiguous(), "weight: contiguous int8 [N, K]");
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  check_x(x, K);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.size(0) == N &&
                  (scale.dim() == 1 || scale.dim() == 2),
              "scale: contiguous fp32 [N] (per row) or [N, G] (per group of columns)");
  const int64_t G = scale.dim() == 2 ? scale.size(1) : 0;
  TORCH_CHECK(G == 0 || (K % G == 0 && (K / G) % 16 == 0),
              "grouped int8 scales need a group (in_features / G) that is a multiple of 16, got ", G, " groups of ", K);
  at::Tensor y = at::empty({M, N}, x.options());
  if (int8q_ok(K, G)) {
    std::vector<int16_t> xq(q_xq_size(M, K));
    std::vector<float> xsc(q_xsc_size(M, K));
    int8q_activations(x.data_ptr<float>(), M, K, xq.data(), xsc.data());
    const Int8QArgs a{xq.data(), xsc.data(), K, N, G, w.data_ptr<int8_t>(), scale.data_ptr<float>(),
                      bias_ptr(bias, N), y.data_ptr<float>()};
    at::parallel_for(0, tiles_of(N), grain_tiles(kTile * K), [&](int64_t t0, int64_t t1) { q_tiles(a, M, t0, t1); });
    return y;
  }
  gemv_rows<int8_t>(x.data_ptr<float>(), M, K, w.data_ptr<int8_t>(), N, scale.data_ptr<float>(), G,
                    bias_ptr(bias, N), y.data_ptr<float>());
  return y;
}

at::Tensor gemv_dense(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "weight: contiguous fp32 or bf16 [N, K]");
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  check_x(x, K);
  at::Tensor y = at::empty({M, N}, x.options());
  if (w.scalar_type() == at::kFloat) {
    gemv_rows<float>(x.data_ptr<float>(), M, K, w.data_ptr<float>(), N, nullptr, 0, bias_ptr(bias, N),
                     y.data_ptr<float>());
  } else {
    gemv_rows<uint16_t>(x.data_ptr<float>(), M, K, reinterpret_cast<const uint16_t*>(w.data_ptr()), N, nullptr, 0,
                        bias_ptr(bias, N), y.data_ptr<float>());
  }
  return y;
}

at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                     int64_t group_size, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(), "weight: contiguous uint8 [N, K/2]");
  const int64_t N = w.size(0), K = 2 * w.size(1), M = x.size(0);
  check_x(x, K);
  TORCH_CHECK(group_size > 0 && group_size % kBlock == 0 && K % group_size == 0,
              "group_size must be a multiple of 32 dividing in_features");
  const int64_t G = K / group_size;
  for (const at::Tensor* t : {&scale, &zero})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->numel() == N * G,
                "scale and zero: contiguous fp16 [N, in_features / group_size]");
  at::Tensor y = at::empty({M, N}, x.options());
  std::vector<int16_t> xq(q_xq_size(M, K));
  std::vector<float> xsc(q_xsc_size(M, K)), xsum(int4q_xsum_size(M, K, group_size));
  int4q_activations(x.data_ptr<float>(), M, K, group_size, xq.data(), xsc.data(), xsum.data());
  const Int4QArgs a{xq.data(), xsc.data(), xsum.data(), K, N, G, group_size, w.data_ptr<uint8_t>(),
                    half_bits(scale), half_bits(zero), bias_ptr(bias, N), y.data_ptr<float>()};
  at::parallel_for(0, tiles_of(N), grain_tiles(kTile * K / 2), [&](int64_t t0, int64_t t1) {
    q_tiles(a, M, t0, t1);
  });
  return y;
}

int64_t vector_bits() { return kLanes * 32; }

}  // namespace

TORCH_LIBRARY(miaotui, m) {
  m.def("gemv_int8(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor weight, Tensor scale, Tensor zero, int group_size, Tensor? bias) -> Tensor");
  m.def("gemv_dense(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("gemv_vector_bits() -> int", &vector_bits);
}

TORCH_LIBRARY_IMPL(miaotui, CPU, m) {
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_int4", &gemv_int4);
  m.impl("gemv_dense", &gemv_dense);
}
