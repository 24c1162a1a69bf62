// Bidirectional attention over a packed batch of variable-length sequences (encoders), fp32.
//
//   varlen_attention(qkv [N, 3W], cu_seqlens [B+1], heads, scale) -> [N, W]
//
// qkv holds each token's q | k | v (W = heads * head_dim each, as the fused projection writes them);
// sequence b is rows cu_seqlens[b] .. cu_seqlens[b+1], and every token attends to all tokens of its own
// sequence only. No padding, no mask, no gather into a (B, H, T, D) rectangle: SDPA's CPU kernel took
// 22 % of an all-MiniLM-L6-v2 batch (head_dim 32, ~150 tokens) plus two index_selects around it.
//
// One task per (sequence, head): the head's keys are transposed into a [D, T] scratch, so the scores of
// 4 queries come from broadcast-FMAs over two vectors of keys at a time (32 keys with AVX-512, 16 with
// AVX2); a vectorised exp gives the softmax; the output is accumulated as probability-weighted value rows
// (2 queries x up to 4 vectors of dims per pass), read from a contiguous [T, D] copy of the head's values.
// On MiniLM-shaped batches (32 sequences of 100-256 tokens, 12 heads of 32), 2 threads: 24-27 ms against
// 51-56 ms for SDPA with its gathers (AVX2 VM); 7-8 ms at 512 bits, 1.2-1.4x the 256-bit code (Zen 5 VM).
// Tasks are numbered head-major, so each thread's contiguous share holds every sequence (a batch is
// sorted by length: sequence-major numbering would give one thread all the long ones).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "gemv_kernels.h"  // the vector abstraction (vf, kLanes), vexp_nonpositive

namespace {

using namespace miaotui_kernels;

// dst[i * ldd + r] = src[r * lds + i] for an 8 x 8 block
inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

constexpr int kRows = 4;            // queries per score pass (6 measured the same)
constexpr int kKeys = 2 * kLanes;  // keys per score pass (two vectors: 32 with AVX-512, 16 with AVX2)

struct Head {
  const float* q;  // row t of this head's queries at q + t * ld (keys at +W, values at +2W)
  int64_t ld, width, T, D;
  float* out;      // row t at out + t * ldo
  int64_t ldo;
};

// scores[r][j] = scale * q_r . k_j for j < Tp (keys past T read the zero padding of kt)
inline void scores(const float* qs, const float* kt, int64_t D, int64_t Tp, float* s) {
  for (int64_t j0 = 0; j0 < Tp; j0 += kKeys) {
    vf acc[kRows][2];
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = vzero();
    for (int64_t d = 0; d < D; ++d) {
      const vf k0 = vload(kt + d * Tp + j0), k1 = vload(kt + d * Tp + j0 + kLanes);
      for (int r = 0; r < kRows; ++r) {
        const vf qv = vset1(qs[r * D + d]);
        acc[r][0] = vfma(qv, k0, acc[r][0]);
        acc[r][1] = vfma(qv, k1, acc[r][1]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      vstore(s + r * Tp + j0, acc[r][0]);
      vstore(s + r * Tp + j0 + kLanes, acc[r][1]);
    }
  }
}

// in place: s[0..Tp) -> exp(s - max) over the first T entries (the rest -> ~0); returns 1 / sum. Tp: a
// multiple of kLanes, s writable up to it
inline float softmax_row(float* s, int64_t T, int64_t Tp) {
  for (int64_t j = T; j < Tp; ++j) s[j] = -INFINITY;
  vf m = vset1(-INFINITY);
  for (int64_t j = 0; j < Tp; j += kLanes) m = vmax(m, vload(s + j));
  const vf mx = vset1(vhmax(m));
  vf sum = vzero();
  for (int64_t j = 0; j < Tp; j += kLanes) {
    const vf e = vexp_nonpositive(vsub(vload(s + j), mx));
    vstore(s + j, e);
    sum = vadd(sum, e);
  }
  return 1.0f / vsum(sum);
}

// out rows r0, r1 (dims d0 .. d0 + kLanes NV) = sum_j p[r][j] v_j, times inv[r]; r1 may repeat r0; v: [T, D]
template <int NV>
inline void weighted_values(const Head& h, const float* v, const float* p0, const float* p1, float inv0, float inv1,
                            int64_t d0, float* o0, float* o1) {
  vf a0[NV], a1[NV];
  for (int i = 0; i < NV; ++i) a0[i] = a1[i] = vzero();
  const float* vrow = v + d0;
  for (int64_t j = 0; j < h.T; ++j, vrow += h.D) {
    const vf b0 = vset1(p0[j]), b1 = vset1(p1[j]);
    for (int i = 0; i < NV; ++i) {
      const vf x = vload(vrow + kLanes * i);
      a0[i] = vfma(b0, x, a0[i]);
      a1[i] = vfma(b1, x, a1[i]);
    }
  }
  for (int i = 0; i < NV; ++i) {
    vstore(o0 + d0 + kLanes * i, vmul(a0[i], vset1(inv0)));
    vstore(o1 + d0 + kLanes * i, vmul(a1[i], vset1(inv1)));
  }
}

// the same for 8 dims at d0: a head_dim that is a multiple of 8 but not of the vector width
inline void weighted_values8(const Head& h, const float* v, const float* p0, const float* p1, float inv0,
                             float inv1, int64_t d0, float* o0, float* o1) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  const float* vrow = v + d0;
  for (int64_t j = 0; j < h.T; ++j, vrow += h.D) {
    const __m256 x = _mm256_loadu_ps(vrow);
    a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(p0 + j), x, a0);
    a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(p1 + j), x, a1);
  }
  _mm256_storeu_ps(o0 + d0, _mm256_mul_ps(a0, _mm256_set1_ps(inv0)));
  _mm256_storeu_ps(o1 + d0, _mm256_mul_ps(a1, _mm256_set1_ps(inv1)));
}

void attend(const Head& h, float scale, std::vector<float>& scratch) {
  const int64_t T = h.T, D = h.D, Tp = (T + kKeys - 1) / kKeys * kKeys;
  // not cleared: the padded key columns of kt give scores that softmax_row overwrites with -inf
  scratch.resize(std::max<size_t>(scratch.size(), D * Tp + T * D + kRows * Tp + kRows * D));
  float *kt = scratch.data(), *v = kt + D * Tp, *s = v + T * D, *qs = s + kRows * Tp;
  // keys transposed, values contiguous: rows of qkv lie 3W floats apart (4.6 KB for MiniLM), which maps
  // every row onto the same few L1 sets (SDPA time / this kernel went from 1.46-1.60 to 1.65-1.82 with the copy)
  int64_t j = 0;
  for (; j + 8 <= T; j += 8) {  // 8 keys x 8 dims at a time (a scalar transpose took ~15 % of the kernel)
    const float* k = h.q + j * h.ld + h.width;
    for (int64_t d = 0; d < D; d += 8) transpose8(k + d, h.ld, kt + d * Tp + j, Tp);
  }
  for (; j < T; ++j) {
    const float* k = h.q + j * h.ld + h.width;
    for (int64_t d = 0; d < D; ++d) kt[d * Tp + j] = k[d];
  }
  for (j = 0; j < T; ++j) std::memcpy(v + j * D, h.q + j * h.ld + 2 * h.width, D * sizeof(float));
  for (int64_t i0 = 0; i0 < T; i0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, T - i0));
    for (int r = 0; r < kRows; ++r) {  // a short last block repeats its first query (results unused)
      const float* q = h.q + (i0 + (r < rows ? r : 0)) * h.ld;
      for (int64_t d = 0; d < D; ++d) qs[r * D + d] = q[d] * scale;
    }
    scores(qs, kt, D, Tp, s);
    float inv[kRows];
    for (int r = 0; r < rows; ++r) inv[r] = softmax_row(s + r * Tp, T, Tp);
    for (int r = 0; r < rows; r += 2) {
      const int r1 = r + 1 < rows ? r + 1 : r;
      float *o0 = h.out + (i0 + r) * h.ldo, *o1 = h.out + (i0 + r1) * h.ldo;
      const float *p0 = s + r * Tp, *p1 = s + r1 * Tp;
      int64_t d0 = 0;
      while (D - d0 >= kLanes) {
        const int64_t nv = std::min<int64_t>(4, (D - d0) / kLanes);
        switch (nv) {
          case 4: weighted_values<4>(h, v, p0, p1, inv[r], inv[r1], d0, o0, o1); break;
          case 3: weighted_values<3>(h, v, p0, p1, inv[r], inv[r1], d0, o0, o1); break;
          case 2: weighted_values<2>(h, v, p0, p1, inv[r], inv[r1], d0, o0, o1); break;
          default: weighted_values<1>(h, v, p0, p1, inv[r], inv[r1], d0, o0, o1); break;
        }
        d0 += nv * kLanes;
      }
      if (d0 < D) weighted_values8(h, v, p0, p1, inv[r], inv[r1], d0, o0, o1);  // 8 dims left (AVX-512)
    }
  }
}

at::Tensor varlen_attention(const at::Tensor& qkv, const at::Tensor& cu_seqlens, int64_t heads, double scale) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.dim() == 2 && qkv.stride(1) == 1,
              "qkv must be a 2-D fp32 CPU tensor with contiguous rows");
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kLong && cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 2 &&
                  cu_seqlens.is_contiguous(),
              "cu_seqlens must be a 1-D int64 tensor of B + 1 offsets");
  const int64_t N = qkv.size(0), W = qkv.size(1) / 3;
  TORCH_CHECK(qkv.size(1) == 3 * W && heads > 0 && W % heads == 0 && (W / heads) % 8 == 0,
              "qkv must hold q | k | v of heads x head_dim columns each, head_dim a multiple of 8");
  const int64_t D = W / heads, B = cu_seqlens.numel() - 1;
  const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
  TORCH_CHECK(cu[0] == 0 && cu[B] == N, "cu_seqlens must run from 0 to the number of rows");
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(cu[b + 1] > cu[b], "cu_seqlens: every sequence needs a token");
  at::Tensor out = at::empty({N, W}, qkv.options());
  const float* base = qkv.data_ptr<float>();
  float* obase = out.data_ptr<float>();
  const int64_t ld = qkv.stride(0);
  at::parallel_for(0, B * heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t % B, hd = t / B;
      const Head h{base + cu[b] * ld + hd * D, ld, W, cu[b + 1] - cu[b], D, obase + cu[b] * W + hd * D, W};
      attend(h, static_cast<float>(scale), scratch);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// One query per sequence over a paged KV cache (batched decode):
//
//   paged_decode_attention(q [B, H, D], k_pool, v_pool [slots, Hkv, D], block_tables [B, W],
//                          context_lens [B], block_size, scale, window) -> [B, H, D]
//
// Sequence b's key j lives in slot block_tables[b][j / block_size] * block_size + j % block_size; it sees
// keys [max(0, L - window), L) of its context length L (window 0: all). The keys and values are read from
// the pool where they are: the PyTorch path gathered every context into a padded (B, Hkv, S, D) copy per
// layer and step (index_select + two bmm: 5.1 of 34.6 s in 32 concurrent requests on SmolLM2).
// One task per (sequence, KV head); its G = H / Hkv query heads reuse each key and value row from L1.

// the 8 lane sums of a[0..8) as one vector (three rounds of pairwise adds)
inline __m256 sum8x8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

struct Paged {
  const float *k, *v;  // pools: slot s, KV head g at (s * hkv + g) * D
  const int64_t* table;  // this sequence's block table
  int64_t block_size, hkv, D;
  const float* row(const float* pool, int64_t j, int64_t g) const {
    return pool + ((table[j / block_size] * block_size + j % block_size) * hkv + g) * D;
  }
};

// s[j] = scale * q . k_{lo+j} for j < n
void paged_scores(const Paged& p, int64_t g, const float* q, int64_t lo, int64_t n, float scale, float* s) {
  const int64_t D = p.D;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const float* k[8];
    for (int i = 0; i < 8; ++i) k[i] = p.row(p.k, lo + j + i, g);
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t c = 0; c < D; c += 8) {
      const __m256 qc = _mm256_loadu_ps(q + c);
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k[i] + c), acc[i]);
    }
    _mm256_storeu_ps(s + j, _mm256_mul_ps(sum8x8(acc), _mm256_set1_ps(scale)));
  }
  for (; j < n; ++j) {
    const float* k = p.row(p.k, lo + j, g);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t c = 0; c < D; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), _mm256_loadu_ps(k + c), acc);
    s[j] = scale * hsum256(acc);
  }
}

// out[d0 .. d0 + 8 NV) = inv * sum_j s[j] v_{lo+j}
template <int NV>
void paged_values(const Paged& p, int64_t g, const float* s, int64_t lo, int64_t n, float inv, int64_t d0, float* out) {
  __m256 acc[NV];
  for (int i = 0; i < NV; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const float* v = p.row(p.v, lo + j, g) + d0;
    const __m256 w = _mm256_broadcast_ss(s + j);
    for (int i = 0; i < NV; ++i) acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * i), acc[i]);
  }
  for (int i = 0; i < NV; ++i) _mm256_storeu_ps(out + d0 + 8 * i, _mm256_mul_ps(acc[i], _mm256_set1_ps(inv)));
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                                  double scale, int64_t window) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 3 && q.is_contiguous(),
              "q must be a contiguous fp32 CPU tensor [B, H, D]");
  for (const at::Tensor* t : {&k_pool, &v_pool})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 3 && t->is_contiguous() && t->size(2) == q.size(2) &&
                    t->sizes() == k_pool.sizes(),
                "k_pool and v_pool must be contiguous fp32 [slots, Hkv, D] with q's head_dim");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), hkv = k_pool.size(1), slots = k_pool.size(0);
  TORCH_CHECK(D % 8 == 0 && hkv > 0 && H % hkv == 0, "head_dim must be a multiple of 8 and heads of KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.size(0) == B &&
                  block_tables.is_contiguous() && context_lens.scalar_type() == at::kLong &&
                  context_lens.numel() == B && context_lens.is_contiguous() && block_size > 0,
              "block_tables: int64 [B, max_blocks]; context_lens: int64 [B]");
  const int64_t W = block_tables.size(1), G = H / hkv;
  const int64_t *tables = block_tables.data_ptr<int64_t>(), *lens = context_lens.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] > 0 && lens[b] <= W * block_size, "context length ", lens[b], " outside its block table");
    for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(tables[b * W + i] >= 0 && (tables[b * W + i] + 1) * block_size <= slots, "block id out of the pool");
    longest = std::max(longest, lens[b]);
  }
  at::Tensor out = at::empty_like(q);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> s(longest + kLanes);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / hkv, g = t % hkv, L = lens[b], lo = window > 0 ? std::max<int64_t>(0, L - window) : 0;
      const Paged p{k_pool.data_ptr<float>(), v_pool.data_ptr<float>(), tables + b * W, block_size, hkv, D};
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        const int64_t n = L - lo;
        paged_scores(p, g, qp + (b * H + h) * D, lo, n, static_cast<float>(scale), s.data());
        const int64_t np = (n + kLanes - 1) / kLanes * kLanes;  // softmax_row works in whole vectors
        const float inv = softmax_row(s.data(), n, np);
        float* o = op + (b * H + h) * D;
        for (int64_t d0 = 0; d0 < D; d0 += 64) {
          switch (std::min<int64_t>(8, (D - d0) / 8)) {
            case 8: paged_values<8>(p, g, s.data(), lo, n, inv, d0, o); break;
            case 7: paged_values<7>(p, g, s.data(), lo, n, inv, d0, o); break;
            case 6: paged_values<6>(p, g, s.data(), lo, n, inv, d0, o); break;
            case 5: paged_values<5>(p, g, s.data(), lo, n, inv, d0, o); break;
            case 4: paged_values<4>(p, g, s.data(), lo, n, inv, d0, o); break;
            case 3: paged_values<3>(p, g, s.data(), lo, n, inv, d0, o); break;
            case 2: paged_values<2>(p, g, s.data(), lo, n, inv, d0, o); break;
            default: paged_values<1>(p, g, s.data(), lo, n, inv, d0, o); break;
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(miaotui, m) {
  m.def("varlen_attention(Tensor qkv, Tensor cu_seqlens, int heads, float scale) -> Tensor");
  m.def("paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, Tensor context_lens, "
        "int block_size, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(miaotui, CPU, m) {
  m.impl("varlen_attention", &varlen_attention);
  m.impl("paged_decode_attention", &paged_decode_attention);
}
