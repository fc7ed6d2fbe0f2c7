// CPU kernels of attention_fwd / attention_bwd: FlashAttention-2 tiling on the CPU.
//
// Forward, one task per (b, h, query block of BQ rows), at::parallel_for over all tasks:
//   for each key tile j (BK keys) that the block's mask reaches:
//     S   = Q_i K_j^T                      (GEMM, fp32)
//     m'  = max(m, rowmax(scale * S));  P = exp(scale * S - m')   (masked entries: 0)
//     l   = l * exp(m - m') + rowsum(P);  acc = acc * exp(m - m') + P V_j   (GEMM)
//   out = acc / l,  lse = m + log(l)      (rows with nothing to attend: out = 0, lse = -inf)
// Only BQ x BK scores live at a time (never T x S).
//
// Backward from the saved lse, one task per (b, kv head): its query heads (GQA group) one
// after the other, query blocks i of BQ rows, each against all the keys c0..c1 it sees:
//   P  = exp(scale * Q_i K^T - lse), renormalized per row;  dP = dO_i V^T   (BQ x W each)
//   dS = scale * P * (dP - delta),  delta = rowsum(P * dP) - grad_lse
//   dV += P^T dO_i,  dK += dS^T Q_i,  dQ_i = dS K                         (5 GEMMs)
// Only BQ x S probabilities live at a time (never T x S). Taking delta from the tiles rather
// than FlashAttention-2's dO . O keeps fp32 gradients as exact as PyTorch's math path (the
// identity's rounding costs ~4x in rows that see few keys). A task owns dK/dV of its kv head
// and dQ of its query heads: no atomics, deterministic. GEMMs go to the BLAS torch links
// (blas.h). bf16/fp16 are converted to fp32 tiles (no bf16 arithmetic here).
//
// Non-finite input (NaN/inf in Q, K, V or scale) gives non-finite output, as SDPA does: a NaN
// score, one of +inf, or only scores of -inf make the row's out and lse NaN, and the backward's
// gradients of that row NaN; a single -inf score weighs 0. Rows that see no bad value stay
// finite, up to the 0 * inf that an inf in V meets in the P V product of the other rows of its
// tile (SDPA has the same). Rows that see no key at all give out = 0 and lse = -inf.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif
#include <torch/library.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "../attention.h"
#include "../checks.h"
#include "blas.h"

namespace lmk {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ------------------------------------------------------------------------------ helpers
// fp32 view of n contiguous elements: the data itself for float, else converted into buf.
template <typename T>
inline const float* as_float(const T* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

template <typename T>
inline void store_from_float(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (src != dst) std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// exp on 8 lanes for x <= 88: 2^n * e^r with n = round(x log2 e), r = x - n ln2 (ln2 in two
// parts), e^r by its degree-7 Taylor polynomial (|r| <= ln2/2: truncation < 6e-9). Measured
// max relative error 7e-8 (Sleef's exp_u10: 8e-8, at::vec exp_u20: 2.2e-7) at half Sleef's
// cost; x is clamped to [-87, 88] (exp(-87) ~ 2e-38: no weight that matters), NaN kept:
// max/min_ps return their second operand when either is NaN, so x goes second. Other SIMD
// levels use at::vec's exp (Sleef, which keeps NaN).
inline Vec vexp(Vec xv) {
#if defined(CPU_CAPABILITY_AVX2)
  __m256 x = _mm256_min_ps(_mm256_set1_ps(88.f), _mm256_max_ps(_mm256_set1_ps(-87.f), xv));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
#else
  return xv.exp();
#endif
}

inline void fill(float* p, int64_t n, float v) { std::fill(p, p + n, v); }

// max(x[a:b]), NaN if any is NaN (at::vec::maximum propagates NaN; std::max would not).
inline float row_max_range(const float* x, int64_t a, int64_t b) {
  Vec vmax(kNegInf);
  int64_t c = a;
  for (; c + Vec::size() <= b; c += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(x + c));
  float m = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return at::vec::maximum(p, q); },
                                           vmax);
  for (; c < b; ++c) m = std::isnan(x[c]) ? x[c] : std::max(m, x[c]);
  return m;
}

// x[a:b] = exp(x[a:b] * mul - sub); returns the sum.
inline float exp_and_sum(float* x, int64_t a, int64_t b, float mul, float sub) {
  const Vec vm(mul), vsub(sub);
  Vec vsum(0.f);
  int64_t c = a;
  for (; c + Vec::size() <= b; c += Vec::size()) {
    Vec v = vexp(at::vec::fmsub(Vec::loadu(x + c), vm, vsub));
    v.store(x + c);
    vsum = vsum + v;
  }
  if (c < b) {
    const int64_t n = b - c;
    Vec v = vexp(at::vec::fmsub(Vec::loadu(x + c, n), vm, vsub));
    v.store(x + c, n);
    vsum = vsum + Vec::set(Vec(0.f), v, n);
  }
  return at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, vsum);
}

inline void scale_row(float* x, int64_t n, float s) {
  at::vec::map([s](Vec v) { return v * Vec(s); }, x, x, n);
}

// Tile sizes. Forward: BQ x BK scores (128 KB at 64 x 512) plus the K and V tiles stay in
// the 512 KB L2 of Zen 3; 64 x 512 beat 64 x 256, 128 x 512 and 32 x 512 at T=512, D=64
// fp32 (2 threads). Backward: BQ query rows against all their keys.
struct Blocks {
  int64_t fwd_q, fwd_k, bwd_q;
};
inline Blocks choose_blocks(int64_t D) {
  // LMK_ATTN_BLOCKS="fwd_q,fwd_k,bwd_q" overrides (for tuning runs).
  static const char* env = std::getenv("LMK_ATTN_BLOCKS");
  if (env != nullptr) {
    Blocks b{64, 256, 64};
    if (std::sscanf(env, "%ld,%ld,%ld", &b.fwd_q, &b.fwd_k, &b.bwd_q) == 3) return b;
  }
  return D <= 64 ? Blocks{64, 512, 64} : Blocks{64, 256, 32};
}

// ------------------------------------------------------------------------------ forward
template <typename scalar_t>
void attention_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          at::Tensor& out, at::Tensor& lse, float scale, const AttnMask& mask) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), group = H / Hkv;
  const Blocks blk = choose_blocks(D);
  const int64_t BQ = blk.fwd_q, BK = blk.fwd_k;
  const int64_t nq = (T + BQ - 1) / BQ;
  const scalar_t* Q = q.const_data_ptr<scalar_t>();
  const scalar_t* K = k.const_data_ptr<scalar_t>();
  const scalar_t* V = v.const_data_ptr<scalar_t>();
  scalar_t* O = out.data_ptr<scalar_t>();
  float* L = lse.data_ptr<float>();
  constexpr bool kConvert = !std::is_same_v<scalar_t, float>;

  at::parallel_for(0, B * H * nq, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> s_buf(BQ * BK), acc(BQ * D), row_max(BQ), row_sum(BQ);
    std::vector<float> q_buf(BQ * D), k_buf(kConvert ? BK * D : 0),
        v_buf(kConvert ? BK * D : 0);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bh = task / nq, i0 = (task % nq) * BQ, b = bh / H, h = bh % H;
      const int64_t rows = std::min(BQ, T - i0);
      const int64_t kv_off = (b * Hkv + h / group) * S * D;
      // Q * scale once per block, so the scores come out of the GEMM already scaled.
      const float* q_src = as_float(Q + (bh * T + i0) * D, rows * D, q_buf.data());
      at::vec::map([scale](Vec x) { return x * Vec(scale); }, q_buf.data(), q_src, rows * D);
      const float* q_tile = q_buf.data();
      fill(row_max.data(), rows, kNegInf);
      fill(row_sum.data(), rows, 0.f);
      fill(acc.data(), rows * D, 0.f);
      // Keys that some row of this block may see (lo and hi grow with the row).
      const int64_t j_begin = mask.lo(i0), j_end = mask.hi(i0 + rows - 1);
      for (int64_t j0 = j_begin; j0 < j_end; j0 += BK) {
        const int64_t cols = std::min(BK, j_end - j0);
        const float* k_tile = as_float(K + kv_off + j0 * D, cols * D, k_buf.data());
        const float* v_tile = as_float(V + kv_off + j0 * D, cols * D, v_buf.data());
        float* s = s_buf.data();
        gemm_f32(false, true, rows, cols, D, 1.f, q_tile, D, k_tile, D, 0.f, s, BK);
        for (int64_t r = 0; r < rows; ++r) {
          float* srow = s + r * BK;
          const int64_t a = std::clamp<int64_t>(mask.lo(i0 + r) - j0, 0, cols);
          const int64_t e = std::clamp<int64_t>(mask.hi(i0 + r) - j0, 0, cols);
          if (a >= e) {  // nothing to attend in this tile
            fill(srow, cols, 0.f);
            continue;
          }
          const float m_old = row_max[r];
          const float tile_max = row_max_range(srow, a, e);
          // NaN wins (std::max(m_old, NaN) would drop it); NaN in m_old stays.
          const float m_new = std::isnan(tile_max) ? tile_max : std::max(m_old, tile_max);
          if (m_new == kNegInf) {  // every score so far is -inf: no weight yet
            fill(srow, cols, 0.f);
            continue;
          }
          const float sum = exp_and_sum(srow, a, e, 1.f, m_new);
          fill(srow, a, 0.f);
          fill(srow + e, cols - e, 0.f);
          const float alpha = std::exp(m_old - m_new);  // 0 on the row's first tile
          row_sum[r] = row_sum[r] * alpha + sum;
          row_max[r] = m_new;
          if (alpha != 1.f) scale_row(acc.data() + r * D, D, alpha);
        }
        gemm_f32(false, false, rows, D, cols, 1.f, s, BK, v_tile, D, 1.f, acc.data(), D);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        const float l = row_sum[r];
        float* a = acc.data() + r * D;
        if (l > 0.f) {
          scale_row(a, D, 1.f / l);
          L[bh * T + i] = row_max[r] + std::log(l);
        } else if (mask.lo(i) >= mask.hi(i)) {  // no key to attend: 0, lse = -inf
          fill(a, D, 0.f);
          L[bh * T + i] = kNegInf;
        } else {  // a NaN or +inf score (l is NaN), or only -inf scores: softmax is undefined
          fill(a, D, kNaN);
          L[bh * T + i] = kNaN;
        }
      }
      store_from_float(acc.data(), O + (bh * T + i0) * D, rows * D);
    }
  });
}

// ------------------------------------------------------------------------------ backward
// sum_{a<=c<e} x[c] * y[c]
inline float dot_range(const float* x, const float* y, int64_t a, int64_t e) {
  Vec acc(0.f);
  int64_t c = a;
  for (; c + Vec::size() <= e; c += Vec::size())
    acc = at::vec::fmadd(Vec::loadu(x + c), Vec::loadu(y + c), acc);
  float s = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, acc);
  for (; c < e; ++c) s += x[c] * y[c];
  return s;
}

// sum += x with Kahan compensation (comp carries the lost low bits): dK and dV are sums over
// every query block of every head in the group, and plain fp32 accumulation of that many
// block products loses ~3x more than PyTorch's single GEMM over T.
inline void add_compensated(float* sum, float* comp, const float* x, int64_t n) {
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    const Vec s = Vec::loadu(sum + c), y = Vec::loadu(x + c) - Vec::loadu(comp + c);
    const Vec t = s + y;
    ((t - s) - y).store(comp + c);
    t.store(sum + c);
  }
  for (; c < n; ++c) {
    const float y = x[c] - comp[c], t = sum[c] + y;
    comp[c] = (t - sum[c]) - y;
    sum[c] = t;
  }
}

template <typename scalar_t>
void attention_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& lse,
                          const std::optional<at::Tensor>& dlse, at::Tensor& dq, at::Tensor& dk,
                          at::Tensor& dv, float scale, const AttnMask& mask) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), group = H / Hkv;
  const int64_t BQ = choose_blocks(D).bwd_q;
  const scalar_t* Q = q.const_data_ptr<scalar_t>();
  const scalar_t* K = k.const_data_ptr<scalar_t>();
  const scalar_t* V = v.const_data_ptr<scalar_t>();
  const scalar_t* dO = dout.const_data_ptr<scalar_t>();
  const float* L = lse.const_data_ptr<float>();
  const float* dL = dlse ? dlse->const_data_ptr<float>() : nullptr;
  scalar_t* dQ = dq.data_ptr<scalar_t>();
  scalar_t* dK = dk.data_ptr<scalar_t>();
  scalar_t* dV = dv.data_ptr<scalar_t>();
  constexpr bool kF32 = std::is_same_v<scalar_t, float>;

  at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
    // Probabilities and their gradients for BQ query rows x the keys they see.
    std::vector<float> p_buf(BQ * S), dp_buf(BQ * S);
    std::vector<float> q_buf(kF32 ? 0 : BQ * D), do_buf(kF32 ? 0 : BQ * D),
        dq_buf(kF32 ? 0 : BQ * D), k_buf(kF32 ? 0 : S * D), v_buf(kF32 ? 0 : S * D);
    // fp32 accumulators of dK, dV (for fp32 outputs the outputs themselves, zeroed by the
    // caller), their compensations, and one block's contribution.
    std::vector<float> dk_acc(kF32 ? 0 : S * D), dv_acc(kF32 ? 0 : S * D), dk_comp(S * D),
        dv_comp(S * D), contrib(S * D);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / Hkv, hkv = task % Hkv;
      const int64_t kv_off = (b * Hkv + hkv) * S * D;
      const float* k_h = as_float(K + kv_off, S * D, k_buf.data());
      const float* v_h = as_float(V + kv_off, S * D, v_buf.data());
      float* dk_h = kF32 ? reinterpret_cast<float*>(dK) + kv_off : dk_acc.data();
      float* dv_h = kF32 ? reinterpret_cast<float*>(dV) + kv_off : dv_acc.data();
      if (!kF32) {
        fill(dk_h, S * D, 0.f);
        fill(dv_h, S * D, 0.f);
      }
      fill(dk_comp.data(), S * D, 0.f);
      fill(dv_comp.data(), S * D, 0.f);
      for (int64_t h = hkv * group; h < (hkv + 1) * group; ++h) {
        const int64_t bh = b * H + h, q_off = bh * T * D;
        for (int64_t i0 = 0; i0 < T; i0 += BQ) {
          const int64_t rows = std::min(BQ, T - i0);
          // Keys this block sees: [c0, c1) (lo and hi grow with the row).
          const int64_t c0 = mask.lo(i0), c1 = mask.hi(i0 + rows - 1), W = c1 - c0;
          float* dq_out = kF32 ? reinterpret_cast<float*>(dQ) + q_off + i0 * D : dq_buf.data();
          if (W <= 0) {  // no row of the block sees a key
            fill(dq_out, rows * D, 0.f);
            if (!kF32) store_from_float(dq_out, dQ + q_off + i0 * D, rows * D);
            continue;
          }
          const float* q_tile = as_float(Q + q_off + i0 * D, rows * D, q_buf.data());
          const float* do_tile = as_float(dO + q_off + i0 * D, rows * D, do_buf.data());
          float* p = p_buf.data();
          float* dp = dp_buf.data();
          gemm_f32(false, true, rows, W, D, 1.f, q_tile, D, k_h + c0 * D, D, 0.f, p, W);
          gemm_f32(false, true, rows, W, D, 1.f, do_tile, D, v_h + c0 * D, D, 0.f, dp, W);
          for (int64_t r = 0; r < rows; ++r) {
            float* prow = p + r * W;
            float* dprow = dp + r * W;
            const int64_t i = i0 + r;
            const int64_t a = std::clamp<int64_t>(mask.lo(i) - c0, 0, W);
            const int64_t e = std::clamp<int64_t>(mask.hi(i) - c0, 0, W);
            if (a >= e) {
              fill(prow, W, 0.f);
              fill(dprow, W, 0.f);
              continue;
            }
            // P = exp(scale * s - lse), renormalized by its own sum: the saved lse is
            // rounded to fp32, and an exactly normalized row keeps dS = P (dP - sum P dP)
            // as exact as PyTorch's softmax backward (a one-key row gives dS = 0).
            const float sum = exp_and_sum(prow, a, e, scale, L[bh * T + i]);
            scale_row(prow + a, e - a, 1.f / sum);
            fill(prow, a, 0.f);
            fill(prow + e, W - e, 0.f);
            // delta = sum_j P dP (= dO . O) minus grad_lse (d lse / d s = P).
            const float delta = dot_range(prow, dprow, a, e) - (dL ? dL[bh * T + i] : 0.f);
            const Vec vdelta(delta), vs(scale);
            at::vec::map2([&](Vec pv, Vec dpv) { return pv * (dpv - vdelta) * vs; }, dprow + a,
                          prow + a, dprow + a, e - a);
            fill(dprow, a, 0.f);
            fill(dprow + e, W - e, 0.f);
          }
          gemm_f32(true, false, W, D, rows, 1.f, p, W, do_tile, D, 0.f, contrib.data(), D);
          add_compensated(dv_h + c0 * D, dv_comp.data() + c0 * D, contrib.data(), W * D);
          gemm_f32(true, false, W, D, rows, 1.f, dp, W, q_tile, D, 0.f, contrib.data(), D);
          add_compensated(dk_h + c0 * D, dk_comp.data() + c0 * D, contrib.data(), W * D);
          gemm_f32(false, false, rows, D, W, 1.f, dp, W, k_h + c0 * D, D, 0.f, dq_out, D);
          // A row that sees no key has dS = 0, but 0 times a NaN/inf in K is NaN: its dQ is 0.
          for (int64_t r = 0; r < rows; ++r)
            if (mask.lo(i0 + r) >= mask.hi(i0 + r)) fill(dq_out + r * D, D, 0.f);
          if (!kF32) store_from_float(dq_out, dQ + q_off + i0 * D, rows * D);
        }
      }
      if (!kF32) {
        store_from_float(dk_h, dK + kv_off, S * D);
        store_from_float(dv_h, dV + kv_off, S * D);
      }
    }
  });
}

// ------------------------------------------------------------------------------ ops
// Calls fn(scalar_t{}) for the three supported dtypes (checked before).
template <typename Fn>
void dispatch_float_types(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    default: TORCH_CHECK(false, "attention: unreachable dtype ", t);
  }
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& query,
                                                     const at::Tensor& key,
                                                     const at::Tensor& value, double scale,
                                                     bool is_causal, int64_t window_left,
                                                     int64_t window_right) {
  check_attention_args("attention_fwd", query, key, value, window_left, window_right);
  const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  const AttnMask mask(q.size(2), k.size(2), is_causal, window_left, window_right);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  dispatch_float_types(q.scalar_type(), [&](auto tag) {
    attention_fwd_kernel<decltype(tag)>(q, k, v, out, lse, float(scale), mask);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& grad_lse, double scale, bool is_causal,
    int64_t window_left, int64_t window_right) {
  // Arguments checked by check_attention_bwd_args (attention.cpp) in the op's entry below.
  const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  // out is not read: delta = dO . O is recomputed as sum_j P dP from the tiles (see kernel).
  const at::Tensor g = grad_out.contiguous(), l = lse.contiguous();
  std::optional<at::Tensor> gl;
  if (grad_lse) gl = grad_lse->contiguous();
  const AttnMask mask(q.size(2), k.size(2), is_causal, window_left, window_right);
  const bool f32 = q.scalar_type() == at::kFloat;
  // fp32 kernels accumulate dK, dV straight into the outputs, so those start at zero.
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = f32 ? at::zeros(k.sizes(), k.options()) : at::empty(k.sizes(), k.options());
  at::Tensor dv = f32 ? at::zeros(v.sizes(), v.options()) : at::empty(v.sizes(), v.options());
  dispatch_float_types(q.scalar_type(), [&](auto tag) {
    attention_bwd_kernel<decltype(tag)>(g, q, k, v, l, gl, dq, dk, dv, float(scale), mask);
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace lmk

namespace lmk {
namespace {
// The ops' CPU entries: the schema's trailing backend must name this kernel (checks.h).
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu_op(const at::Tensor& query,
                                                        const at::Tensor& key,
                                                        const at::Tensor& value, double scale,
                                                        bool is_causal, int64_t window_left,
                                                        int64_t window_right,
                                                        std::string_view backend) {
  check_cpu_backend("attention_fwd", backend, "lmkernels.triton.attention.attention_fwd");
  return attention_fwd_cpu(query, key, value, scale, is_causal, window_left, window_right);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu_op(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& grad_lse, double scale, bool is_causal,
    int64_t window_left, int64_t window_right, std::string_view backend) {
  check_cpu_backend("attention_bwd", backend, "lmkernels.triton.attention.attention_bwd");
  check_attention_bwd_args(grad_out, query, key, value, out, lse, grad_lse, window_left,
                           window_right);
  return attention_bwd_cpu(grad_out, query, key, value, out, lse, grad_lse, scale, is_causal,
                           window_left, window_right);
}
}  // namespace
}  // namespace lmk

TORCH_LIBRARY_IMPL(lmkernels, CPU, m) {
  m.impl("attention_fwd", &lmk::attention_fwd_cpu_op);
  m.impl("attention_bwd", &lmk::attention_bwd_cpu_op);
}
