// One decode step of a Llama-family model (one sequence, static KV cache) in one call and one parallel
// region.
//
// A compiled PyTorch step still runs ~400 Python-level calls per token (the inductor wrapper, guards, and
// a fork/join per GEMV and per attention matmul): 5-6 ms of a 12 ms int4 step on this 2-core machine. Here
// the whole layer stack runs inside a single OpenMP region: the GEMVs split their output tiles between
// the threads, attention splits its heads, every thread computes the small vector ops (norms, RoPE, SiLU,
// residuals) for itself, and five barriers per layer separate the stages. The arithmetic is the model's
// own in fp32, with the weights read by the GEMV kernels of gemv_kernels.h (int8/int4: activations rounded
// to int16 per block of 32), so logits equal the PyTorch path up to summation order and that rounding.
//
// The plan is built once per KV cache from Python (kernels/decode_plan.py), which refuses anything it does
// not cover (other architectures, int8 KV caches, sharded or sparse linears) so those keep the PyTorch path.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <omp.h>

#include <cmath>
#include <limits>
#include <new>
#include <vector>

#include "gemv_kernels.h"

namespace {

using namespace miaotui_kernels;

enum Kind : int64_t { kF32 = 0, kBF16 = 1, kInt8 = 2, kInt4 = 3 };

struct Linear {
  int64_t kind = kF32, N = 0, K = 0, G = 0, group = 0;
  at::Tensor w, scale, zero, bias;  // held so the pointers below stay valid
};

struct Layer {
  at::Tensor attn_norm, mlp_norm, k, v;  // norms fp32 [C]; caches [B, Hkv, S, D] fp32 or bf16 (row 0 used)
  int64_t qkv, o, gate_up, down;         // indices into the plan's linears
};

// Activation buffers start on a cache line: the GEMVs load each row of x once per weight vector (six times
// per weight load at six rows), and an unaligned 64-byte load touches two lines. With malloc's 16-byte
// alignment a 6-row verify step took 2x the time of the same products on aligned input.
template <class T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <class U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const LineAligned<U>&) const { return true; }
};
template <class T>
using Buffer = std::vector<T, LineAligned<T>>;

inline float cache_load(const float* p) { return *p; }
inline float cache_load(const c10::BFloat16* p) { return static_cast<float>(*p); }

inline vf cache_vload(const float* p) { return vload(p); }
inline vf cache_vload(const c10::BFloat16* p) { return load_w(reinterpret_cast<const uint16_t*>(p)); }

// q · k over D values (D % kLanes == 0, checked when the plan is built)
template <class T>
inline float dot(const float* q, const T* k, int64_t D) {
  vf acc = vzero();
  for (int64_t d = 0; d < D; d += kLanes) acc = vfma(vload(q + d), cache_vload(k + d), acc);
  return vsum(acc);
}

// rotate-half RoPE on one head, in place (cos/sin rows laid out as in models/base.rope_tables)
void rope(float* x, const float* cos, const float* sin, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

class DecodePlan : public torch::CustomClassHolder {
 public:
  DecodePlan(int64_t n_heads, int64_t n_kv, int64_t head_dim, double eps, int64_t window, at::Tensor cos,
             at::Tensor sin)
      : H_(n_heads), Hkv_(n_kv), D_(head_dim), eps_(eps), window_(window), cos_(cos), sin_(sin) {
    TORCH_CHECK(H_ > 0 && Hkv_ > 0 && H_ % Hkv_ == 0, "query heads must be a multiple of KV heads");
    TORCH_CHECK(D_ % 16 == 0, "head_dim must be a multiple of 16, got ", D_);
    for (const at::Tensor* t : {&cos_, &sin_})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(1) == D_,
                  "rope tables: contiguous fp32 [max_pos, head_dim]");
  }

  int64_t add_linear(int64_t kind, at::Tensor w, std::optional<at::Tensor> scale, std::optional<at::Tensor> zero,
                     int64_t group, std::optional<at::Tensor> bias) {
    Linear l;
    l.kind = kind;
    l.w = w;
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), "weight: contiguous 2-D CPU tensor");
    l.N = w.size(0);
    l.K = kind == kInt4 ? 2 * w.size(1) : w.size(1);
    const at::ScalarType want[] = {at::kFloat, at::kBFloat16, at::kChar, at::kByte};
    TORCH_CHECK(kind >= kF32 && kind <= kInt4 && w.scalar_type() == want[kind], "weight dtype does not match kind ", kind);
    if (kind == kInt8 || kind == kInt4) {
      const at::ScalarType sdt = kind == kInt4 ? at::kHalf : at::kFloat;  // int4: fp16 scales and zeros
      TORCH_CHECK(scale.has_value() && scale->scalar_type() == sdt && scale->is_contiguous() &&
                      scale->size(0) == l.N, "scale: contiguous ", sdt, " with out_features rows");
      l.scale = *scale;
      if (kind == kInt8 && scale->dim() == 2) {
        l.G = scale->size(1);
        TORCH_CHECK(l.K % l.G == 0 && (l.K / l.G) % 16 == 0, "grouped int8: groups of a multiple of 16 columns");
      }
    }
    if (kind == kInt4) {
      TORCH_CHECK(group > 0 && group % kBlock == 0 && l.K % group == 0, "int4 group must be a multiple of 32");
      TORCH_CHECK(zero.has_value() && zero->scalar_type() == at::kHalf && zero->is_contiguous() &&
                      zero->numel() == scale->numel(), "zero: contiguous fp16 like scale");
      l.group = group;
      l.G = l.K / group;
      l.zero = *zero;
      TORCH_CHECK(l.scale.numel() == l.N * l.G, "int4 scale: [out_features, in_features / group]");
    }
    if (bias.has_value()) {
      TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == l.N,
                  "bias: contiguous fp32 [out_features]");
      l.bias = *bias;
    }
    linears_.push_back(l);
    return int64_t(linears_.size()) - 1;
  }

  void add_layer(at::Tensor attn_norm, at::Tensor mlp_norm, at::Tensor k, at::Tensor v, int64_t qkv, int64_t o,
                 int64_t gate_up, int64_t down) {
    for (int64_t i : {qkv, o, gate_up, down})
      TORCH_CHECK(i >= 0 && i < int64_t(linears_.size()), "unknown linear index ", i);
    for (const at::Tensor* t : {&k, &v}) {
      TORCH_CHECK(t->dim() == 4 && t->is_contiguous() && t->size(1) == Hkv_ && t->size(3) == D_ &&
                      (t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16),
                  "KV cache: contiguous fp32/bf16 [batch, kv_heads, max_len, head_dim]");
      TORCH_CHECK(t->scalar_type() == k.scalar_type(), "k and v caches must share a dtype");
    }
    const int64_t C = attn_norm.numel();
    if (layers_.empty()) C_ = C;
    TORCH_CHECK(C == C_ && mlp_norm.numel() == C, "norm widths differ between layers");
    const Linear &lq = linears_[qkv], &lo = linears_[o], &lg = linears_[gate_up], &ld = linears_[down];
    TORCH_CHECK(lq.K == C && lq.N == (H_ + 2 * Hkv_) * D_, "qkv projection: [(H + 2 Hkv) D, C]");
    TORCH_CHECK(lo.K == H_ * D_ && lo.N == C, "o projection: [C, H D]");
    TORCH_CHECK(lg.K == C && lg.N % 2 == 0 && ld.K == lg.N / 2 && ld.N == C, "gate_up / down shapes disagree");
    if (!layers_.empty())
      TORCH_CHECK(k.size(2) == layers_[0].k.size(2), "every layer's cache must hold the same length");
    layers_.push_back({attn_norm, mlp_norm, k, v, qkv, o, gate_up, down});
    qkv_n_ = lq.N;  // the same in every layer (checked above)
    gate_up_n_ = std::max(gate_up_n_, lg.N);  // channel pruning may leave layers of different widths
  }

  void set_head(at::Tensor norm, int64_t head) {
    TORCH_CHECK(head >= 0 && head < int64_t(linears_.size()) && linears_[head].K == C_ && norm.numel() == C_,
                "head: a linear of in_features = hidden size and a final norm of that width");
    final_norm_ = norm;
    head_ = head;
  }

  // x: the embedded tokens [M, C] (or [C]) at positions pos .. pos + M - 1 → logits [M, V]. M > 1 is a
  // speculative verify: row m attends to the cache before `pos` and to rows 0..m of this call.
  at::Tensor step(const at::Tensor& x_in, int64_t pos) {
    TORCH_CHECK(!layers_.empty() && head_ >= 0, "the plan has no layers or no head");
    TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.is_contiguous() && x_in.numel() % C_ == 0 &&
                    x_in.numel() > 0, "x: contiguous fp32 hidden states of ", C_, " values each");
    const int64_t M = x_in.numel() / C_, S = layers_[0].k.size(2);
    TORCH_CHECK(pos >= 0 && pos + M <= S && pos + M <= cos_.size(0), "positions ", pos, "..", pos + M - 1,
                " are outside the KV cache (", S, ")");
    if (layers_[0].k.scalar_type() == at::kFloat) return run<float>(x_in, M, pos);
    return run<c10::BFloat16>(x_in, M, pos);
  }

 private:
  // What each thread keeps to itself: the residual stream and every small vector op are computed by all
  // threads redundantly (a few microseconds) rather than by one thread behind two barriers.
  struct Scratch {
    Buffer<float> x, h, act, q, kv, scores, xsc, xsum;  // xsc/xsum/xq: int4 activations
    Buffer<int16_t> xq;
  };

  // the product y = W · in for one linear: this thread's share of the output tiles
  static void gemv(const Linear& l, const float* in, int64_t M, const Scratch& sc, float* out, int tid,
                   int nth) {
    const int64_t tiles = tiles_of(l.N), t0 = tiles * tid / nth, t1 = tiles * (tid + 1) / nth;
    const float* bias = l.bias.defined() ? l.bias.data_ptr<float>() : nullptr;
    switch (l.kind) {
      case kF32: dense_tiles<float>(in, M, l.K, l.w.data_ptr<float>(), l.N, nullptr, 0, bias, out, t0, t1); break;
      case kBF16:
        dense_tiles<uint16_t>(in, M, l.K, reinterpret_cast<const uint16_t*>(l.w.data_ptr()), l.N, nullptr, 0,
                              bias, out, t0, t1);
        break;
      case kInt8:
        if (int8q_ok(l.K, l.G)) {
          const Int8QArgs a{sc.xq.data(), sc.xsc.data(), l.K, l.N, l.G, l.w.data_ptr<int8_t>(),
                            l.scale.data_ptr<float>(), bias, out};
          q_tiles(a, M, t0, t1);
        } else {
          dense_tiles<int8_t>(in, M, l.K, l.w.data_ptr<int8_t>(), l.N, l.scale.data_ptr<float>(), l.G, bias, out,
                              t0, t1);
        }
        break;
      default: {
        const Int4QArgs a{sc.xq.data(), sc.xsc.data(), sc.xsum.data(), l.K, l.N, l.G, l.group,
                          l.w.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(l.scale.data_ptr()),
                          reinterpret_cast<const uint16_t*>(l.zero.data_ptr()), bias, out};
        q_tiles(a, M, t0, t1);
      }
    }
  }

  // what a linear's kernel needs of its input (int4, int8: the activations in int16 with block scales), per thread
  static void prepare_input(const Linear& l, const float* in, int64_t M, Scratch& sc) {
    const bool int8q = l.kind == kInt8 && int8q_ok(l.K, l.G);
    if (!int8q && l.kind != kInt4) return;
    sc.xq.resize(q_xq_size(M, l.K));
    sc.xsc.resize(q_xsc_size(M, l.K));
    if (int8q) {
      int8q_activations(in, M, l.K, sc.xq.data(), sc.xsc.data());
      return;
    }
    sc.xsum.resize(int4q_xsum_size(M, l.K, l.group));
    int4q_activations(in, M, l.K, l.group, sc.xq.data(), sc.xsc.data(), sc.xsum.data());
  }

  // out[0, NV * kLanes) = sum over positions s in [first, at] of p_s v_s, p_s = scores[s] * inv: cached
  // values before `pos`, this call's new rows (v_new(s)) from there. Positions outer, NV accumulators: a
  // chain of dependent FMAs per vector of the head would wait out the FMA latency at every position.
  template <int NV, class T, class NewV>
  static void weighted_sum(const float* scores, float inv, const T* vh, int64_t first, int64_t pos, int64_t at,
                           const NewV& v_new, float* out) {
    constexpr int64_t D = NV * kLanes;
    vf acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = vzero();
    for (int64_t s = first; s < std::min(pos, at + 1); ++s) {
      const vf p = vset1(scores[s] * inv);
      for (int j = 0; j < NV; ++j) acc[j] = vfma(p, cache_vload(vh + s * D + j * kLanes), acc[j]);
    }
    for (int64_t s = std::max(first, pos); s <= at; ++s) {
      const vf p = vset1(scores[s] * inv);
      for (int j = 0; j < NV; ++j) acc[j] = vfma(p, vload(v_new(s) + j * kLanes), acc[j]);
    }
    for (int j = 0; j < NV; ++j) vstore(out + j * kLanes, acc[j]);
  }

  // This thread's query heads for each of the M new rows: row m (position pos + m) attends to cached
  // positions [first, pos) and to the new rows 0..m, read from `sc.kv` (the thread's own RoPE'd,
  // cache-rounded copy) rather than the cache, so no barrier waits for the write.
  template <class T>
  void attend_heads(const Layer& L, const float* qkv, int64_t qkv_n, int64_t M, int64_t pos, int tid, int nth,
                    Scratch& sc, float* out) const {
    const int64_t S = L.k.size(2), per_kv = H_ / Hkv_, kvw = Hkv_ * D_, qw = H_ * D_;
    const T* kc = L.k.data_ptr<T>();
    const T* vc = L.v.data_ptr<T>();
    const float scale = 1.f / std::sqrt(float(D_));
    float* scores = sc.scores.data();
    float* q = sc.q.data();
    for (int64_t m = 0; m < M; ++m) {
      const int64_t at = pos + m, first = window_ > 0 ? std::max<int64_t>(0, at - window_ + 1) : 0;
      const float* cos = cos_.data_ptr<float>() + at * D_;
      const float* sin = sin_.data_ptr<float>() + at * D_;
      for (int64_t h = H_ * tid / nth; h < H_ * (tid + 1) / nth; ++h) {
        const int64_t kv = h / per_kv;
        const T* kh = kc + kv * S * D_;
        const T* vh = vc + kv * S * D_;
        auto k_new = [&](int64_t s) { return sc.kv.data() + (s - pos) * 2 * kvw + kv * D_; };
        auto v_new = [&](int64_t s) { return sc.kv.data() + (s - pos) * 2 * kvw + kvw + kv * D_; };
        std::copy(qkv + m * qkv_n + h * D_, qkv + m * qkv_n + (h + 1) * D_, q);
        rope(q, cos, sin, D_);
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t s = first; s <= at; ++s) {
          scores[s] = (s < pos ? dot(q, kh + s * D_, D_) : dot(q, k_new(s), D_)) * scale;
          mx = std::max(mx, scores[s]);
        }
        float total = 0.f;
        for (int64_t s = first; s <= at; ++s) total += (scores[s] = std::exp(scores[s] - mx));
        const float inv = 1.f / total;
        float* oh = out + m * qw + h * D_;
        switch (D_ / kLanes) {  // the common head sizes keep the output row in registers
          case 4: weighted_sum<4>(scores, inv, vh, first, pos, at, v_new, oh); break;
          case 8: weighted_sum<8>(scores, inv, vh, first, pos, at, v_new, oh); break;
          default:
            for (int64_t d = 0; d < D_; d += kLanes) {
              vf acc = vzero();
              for (int64_t s = first; s < std::min(pos, at + 1); ++s)
                acc = vfma(vset1(scores[s] * inv), cache_vload(vh + s * D_ + d), acc);
              for (int64_t s = std::max(first, pos); s <= at; ++s)
                acc = vfma(vset1(scores[s] * inv), vload(v_new(s) + d), acc);
              vstore(oh + d, acc);
            }
        }
      }
    }
  }

  template <class T>
  at::Tensor run(const at::Tensor& x_in, int64_t M, int64_t pos) {
    const int64_t C = C_, S = layers_[0].k.size(2), qw = H_ * D_, kvw = Hkv_ * D_;
    // shared outputs, one buffer per stage: a stage's buffer is rewritten only a layer later, after the
    // barriers that follow every read of it
    Buffer<float> qkv(M * qkv_n_), attn(M * qw), o_out(M * C), gate_up(M * gate_up_n_), down_out(M * C);
    const Linear& head = linears_[head_];
    at::Tensor logits = at::empty({M, head.N}, x_in.options());
    float* y = logits.data_ptr<float>();
    const int nt = std::max(1, at::get_num_threads());

#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
      Scratch sc;
      sc.x.assign(x_in.data_ptr<float>(), x_in.data_ptr<float>() + M * C);
      sc.h.resize(M * C);
      sc.act.resize(M * gate_up_n_ / 2);
      sc.q.resize(D_);
      sc.kv.resize(M * 2 * kvw);
      sc.scores.resize(S);
      auto norm_rows = [&](const at::Tensor& w) {
        for (int64_t m = 0; m < M; ++m)
          rms_norm_row(sc.x.data() + m * C, w.data_ptr<float>(), C, float(eps_), sc.h.data() + m * C);
      };
      auto add_rows = [&](const Buffer<float>& d) {
        for (int64_t i = 0; i < M * C; ++i) sc.x[i] += d[i];
      };
      for (const Layer& L : layers_) {
        const Linear &lq = linears_[L.qkv], &lo = linears_[L.o], &lg = linears_[L.gate_up], &ld = linears_[L.down];
        norm_rows(L.attn_norm);
        prepare_input(lq, sc.h.data(), M, sc);
        gemv(lq, sc.h.data(), M, sc, qkv.data(), tid, nth);
#pragma omp barrier
        // the new rows' k (RoPE'd) and v, rounded as the cache stores them; one thread writes the cache
        T* kc = L.k.data_ptr<T>();
        T* vc = L.v.data_ptr<T>();
        for (int64_t m = 0; m < M; ++m) {
          float* k_new = sc.kv.data() + m * 2 * kvw;
          float* v_new = k_new + kvw;
          std::copy(qkv.data() + m * lq.N + qw, qkv.data() + m * lq.N + qw + 2 * kvw, k_new);
          for (int64_t i = 0; i < Hkv_; ++i)
            rope(k_new + i * D_, cos_.data_ptr<float>() + (pos + m) * D_, sin_.data_ptr<float>() + (pos + m) * D_, D_);
          for (int64_t i = 0; i < Hkv_; ++i)
            for (int64_t d = 0; d < D_; ++d) {
              const T kt = T(k_new[i * D_ + d]), vt = T(v_new[i * D_ + d]);
              if (tid == 0) {
                kc[(i * S + pos + m) * D_ + d] = kt;
                vc[(i * S + pos + m) * D_ + d] = vt;
              }
              k_new[i * D_ + d] = cache_load(&kt);
              v_new[i * D_ + d] = cache_load(&vt);
            }
        }
        attend_heads<T>(L, qkv.data(), lq.N, M, pos, tid, nth, sc, attn.data());
#pragma omp barrier
        prepare_input(lo, attn.data(), M, sc);
        gemv(lo, attn.data(), M, sc, o_out.data(), tid, nth);
#pragma omp barrier
        add_rows(o_out);
        norm_rows(L.mlp_norm);
        prepare_input(lg, sc.h.data(), M, sc);
        gemv(lg, sc.h.data(), M, sc, gate_up.data(), tid, nth);
#pragma omp barrier
        const int64_t I = lg.N / 2;  // SiLU(gate) * up; gate is the first half of each fused output row
        for (int64_t m = 0; m < M; ++m)
          silu_mul_row(gate_up.data() + m * lg.N, gate_up.data() + m * lg.N + I, I, sc.act.data() + m * I);
        prepare_input(ld, sc.act.data(), M, sc);
        gemv(ld, sc.act.data(), M, sc, down_out.data(), tid, nth);
#pragma omp barrier
        add_rows(down_out);
      }
      norm_rows(final_norm_);
      prepare_input(head, sc.h.data(), M, sc);
      gemv(head, sc.h.data(), M, sc, y, tid, nth);
    }
    return logits;
  }

  int64_t H_, Hkv_, D_;
  double eps_;
  int64_t window_;
  at::Tensor cos_, sin_, final_norm_;
  int64_t C_ = 0, head_ = -1, qkv_n_ = 0, gate_up_n_ = 0;  // widths of the per-step buffers
  std::vector<Linear> linears_;
  std::vector<Layer> layers_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(miaotui, m) {
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<int64_t, int64_t, int64_t, double, int64_t, at::Tensor, at::Tensor>())
      .def("add_linear", &DecodePlan::add_linear)
      .def("add_layer", &DecodePlan::add_layer)
      .def("set_head", &DecodePlan::set_head)
      .def("step", &DecodePlan::step);
}
