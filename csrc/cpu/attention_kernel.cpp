// The CPU flash-attention core shared by the dense and the packed (varlen) ops: FlashAttention-2
// tiling over a list of sequences (attention_kernel.h says how tensors are addressed).
//
// Scores: s = scale * q.k; with softcap c > 0, s = c * tanh(s / c); then the mask of the
// sequence (AttnMask), softmax, out = P V. lse = log-sum-exp of the final s.
//
// Forward, one task per (sequence, head, query block of BQ rows):
//   for each key tile j (BK keys) that the block's mask reaches:
//     S   = Q_i K_j^T                      (GEMM, fp32; Q pre-scaled)
//     m'  = max(m, rowmax(S));  P = exp(S - m')   (masked entries: 0)
//     l   = l * exp(m - m') + rowsum(P);  acc = acc * exp(m - m') + P V_j   (GEMM)
//   out = acc / l,  lse = m + log(l)      (rows with nothing to attend: out = 0, lse = -inf)
// Only BQ x BK scores live at a time (never T x S).
//
// Backward from the saved lse, one task per (sequence, kv head): its query heads (GQA group)
// one after the other, query blocks i of BQ rows, each against all the keys c0..c1 it sees:
//   P  = exp(S_i - lse), renormalized per row;  dP = dO_i V^T   (BQ x W each)
//   dS = P * (dP - delta) * scale [* (1 - tanh^2) with softcap],  delta = rowsum(P * dP) - grad_lse
//   dV += P^T dO_i,  dK += dS^T Q_i,  dQ_i = dS K                         (5 GEMMs)
// Only BQ x S probabilities live at a time (never T x S). Taking delta from the tiles rather
// than FlashAttention-2's dO . O keeps fp32 gradients as exact as PyTorch's math path (the
// identity's rounding costs ~4x in rows that see few keys). A task owns dK/dV of its kv head
// and dQ of its query heads: no atomics, deterministic. GEMMs go to the BLAS torch links
// (blas.h). bf16/fp16 are converted to fp32 tiles (no bf16 arithmetic here).
//
// Scheduling: sequences are listed longest first and threads take the next task from a shared
// counter, so one long document (varlen) or the long causal blocks do not leave a thread idle.
//
// Non-finite input (NaN/inf in Q, K, V or scale) gives non-finite output, as SDPA does: a NaN
// score, one of +inf, or only scores of -inf make the row's out and lse NaN, and the backward's
// gradients of that row NaN; a single -inf score weighs 0 (softcap maps +-inf to +-c, as the
// formula does). Rows that see no bad value stay finite, up to the 0 * inf that an inf in V
// meets in the P V product of the other rows of its tile (SDPA has the same). Rows that see no
// key at all give out = 0 and lse = -inf.
#include "attention_kernel.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "../attention.h"
#include "blas.h"

namespace lmk {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ------------------------------------------------------------------------------ helpers
// fp32 view of `rows` rows of D elements, `stride` elements apart: the data itself for float
// (ld = stride), else converted into buf (ld = D).
template <typename T>
inline const float* rows_as_float(const T* src, int64_t rows, int64_t D, int64_t stride,
                                  float* buf, int64_t& ld) {
  if constexpr (std::is_same_v<T, float>) {
    ld = stride;
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r) at::vec::convert(src + r * stride, buf + r * D, D);
    ld = D;
    return buf;
  }
}

// dst rows (`stride` apart) = src rows (ld_src apart), D elements each.
template <typename T>
inline void store_rows(const float* src, int64_t ld_src, T* dst, int64_t stride, int64_t rows,
                       int64_t D) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * ld_src;
    T* d = dst + r * stride;
    if constexpr (std::is_same_v<T, float>) {
      if (s != d) std::copy(s, s + D, d);
    } else {
      at::vec::convert(s, d, D);
    }
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

// Softcap of n scores: t = tanh(x * mul / cap), x = cap * t; t is kept in t_out (nullptr: not
// needed) for the backward's factor 1 - t^2. tanh is Sleef's (1 ulp): a tanh built from the
// fast exp above loses relative accuracy near 0, where most scores are.
inline void softcap_row(float* x, int64_t n, float mul, float cap, float* t_out) {
  const Vec vin(mul / cap), vcap(cap);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {  // full vectors: plain loads and stores
    const Vec t = (Vec::loadu(x + c) * vin).tanh();
    if (t_out != nullptr) t.store(t_out + c);
    (t * vcap).store(x + c);
  }
  if (c < n) {  // the tail (partial loads and stores go through a copy)
    const int64_t m = n - c;
    const Vec t = (Vec::loadu(x + c, m) * vin).tanh();
    if (t_out != nullptr) t.store(t_out + c, m);
    (t * vcap).store(x + c, m);
  }
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

// Runs body(take) on at::parallel_for's threads; each thread calls take() for the index of its
// next task until it returns >= n. Dynamic: a thread that finishes early takes more.
template <typename Body>
void parallel_tasks(int64_t n, Body&& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    body([&next]() { return next.fetch_add(1, std::memory_order_relaxed); });
  });
}

// Task indices sorted by cost, longest first (stable: equal costs keep their order).
inline std::vector<int64_t> longest_first(const std::vector<int64_t>& cost) {
  std::vector<int64_t> order(cost.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  return order;
}

inline AttnMask mask_of(const AttnProblem& p, const AttnSeq& s) {
  return AttnMask(s.T, s.S, p.is_causal, p.window_left, p.window_right);
}

// ------------------------------------------------------------------------------ forward
template <typename scalar_t>
void fwd_kernel(const AttnProblem& p, const scalar_t* Q, const scalar_t* K, const scalar_t* V,
                scalar_t* O, float* L) {
  const int64_t H = p.H, D = p.D, group = p.H / p.Hkv;
  const Blocks blk = choose_blocks(D);
  const int64_t BQ = blk.fwd_q, BK = blk.fwd_k;
  const float scale = p.scale, cap = p.softcap;

  // Tasks: (sequence, head, query block). Sequences go longest first (cost: rows x keys their
  // blocks reach); within one, head by head so that consecutive tasks reuse the head's K/V
  // from cache (tasks sorted across heads measured 1.00-1.03x SDPA against 1.18-1.21x in
  // bench_attention.py, T=1024 causal fp32 forward, Xeon with AVX-512), and the last block
  // first: under a causal mask it reaches the most keys, so the small blocks fill the end.
  struct Task {
    int64_t seq, h, i0;
  };
  const int64_t n_seqs = static_cast<int64_t>(p.seqs.size());
  std::vector<int64_t> seq_cost(n_seqs, 0);
  for (int64_t s = 0; s < n_seqs; ++s) {
    const AttnSeq& sq = p.seqs[s];
    const AttnMask mask = mask_of(p, sq);
    for (int64_t i0 = 0; i0 < sq.T; i0 += BQ) {
      const int64_t rows = std::min(BQ, sq.T - i0);
      seq_cost[s] += rows * (std::max<int64_t>(mask.hi(i0 + rows - 1) - mask.lo(i0), 0) + D);
    }
  }
  std::vector<Task> tasks;
  for (const int64_t s : longest_first(seq_cost)) {
    const int64_t T = p.seqs[s].T;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i0 = (T - 1) / BQ * BQ; i0 >= 0 && T > 0; i0 -= BQ) tasks.push_back({s, h, i0});
  }
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());

  parallel_tasks(n_tasks, [&](auto take) {
    std::vector<float> s_buf(BQ * BK), acc(BQ * D), row_max(BQ), row_sum(BQ), q_buf(BQ * D),
        k_buf(BK * D), v_buf(BK * D);
    for (int64_t t; (t = take()) < n_tasks;) {
      const Task& task = tasks[t];
      const AttnSeq& sq = p.seqs[task.seq];
      const AttnMask mask = mask_of(p, sq);
      const int64_t h = task.h, i0 = task.i0, rows = std::min(BQ, sq.T - i0), qi = sq.q_start + i0;
      // Q * scale once per block, so the scores come out of the GEMM already scaled.
      const scalar_t* q_src = Q + p.q.at(sq.b, qi, h);
      for (int64_t r = 0; r < rows; ++r) {
        float* dst = q_buf.data() + r * D;
        if constexpr (std::is_same_v<scalar_t, float>) {
          at::vec::map([scale](Vec x) { return x * Vec(scale); }, dst, q_src + r * p.q.row, D);
        } else {
          at::vec::convert(q_src + r * p.q.row, dst, D);
          scale_row(dst, D, scale);
        }
      }
      const float* q_tile = q_buf.data();
      fill(row_max.data(), rows, kNegInf);
      fill(row_sum.data(), rows, 0.f);
      fill(acc.data(), rows * D, 0.f);
      const scalar_t* k_seq = K + p.k.at(sq.b, sq.k_start, h / group);
      const scalar_t* v_seq = V + p.v.at(sq.b, sq.k_start, h / group);
      // Keys that some row of this block may see (lo and hi grow with the row).
      const int64_t j_begin = mask.lo(i0), j_end = mask.hi(i0 + rows - 1);
      for (int64_t j0 = j_begin; j0 < j_end; j0 += BK) {
        const int64_t cols = std::min(BK, j_end - j0);
        int64_t kld, vld;
        const float* k_tile = rows_as_float(k_seq + j0 * p.k.row, cols, D, p.k.row, k_buf.data(), kld);
        const float* v_tile = rows_as_float(v_seq + j0 * p.v.row, cols, D, p.v.row, v_buf.data(), vld);
        float* s = s_buf.data();
        gemm_f32(false, true, rows, cols, D, 1.f, q_tile, D, k_tile, kld, 0.f, s, BK);
        for (int64_t r = 0; r < rows; ++r) {
          float* srow = s + r * BK;
          const int64_t a = std::clamp<int64_t>(mask.lo(i0 + r) - j0, 0, cols);
          const int64_t e = std::clamp<int64_t>(mask.hi(i0 + r) - j0, 0, cols);
          if (a >= e) {  // nothing to attend in this tile
            fill(srow, cols, 0.f);
            continue;
          }
          if (cap > 0.f) softcap_row(srow + a, e - a, 1.f, cap, nullptr);
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
        gemm_f32(false, false, rows, D, cols, 1.f, s, BK, v_tile, vld, 1.f, acc.data(), D);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        const float l = row_sum[r];
        float* a = acc.data() + r * D;
        float& lse = L[p.lse.at(sq.b, qi + r, h)];
        if (l > 0.f) {
          scale_row(a, D, 1.f / l);
          lse = row_max[r] + std::log(l);
        } else if (mask.lo(i) >= mask.hi(i)) {  // no key to attend: 0, lse = -inf
          fill(a, D, 0.f);
          lse = kNegInf;
        } else {  // a NaN or +inf score (l is NaN), or only -inf scores: softmax is undefined
          fill(a, D, kNaN);
          lse = kNaN;
        }
      }
      store_rows(acc.data(), D, O + p.out.at(sq.b, qi, h), p.out.row, rows, D);
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
void bwd_kernel(const AttnProblem& p, const scalar_t* dO, const scalar_t* Q, const scalar_t* K,
                const scalar_t* V, const float* L, const float* dL, scalar_t* dQ, scalar_t* dK,
                scalar_t* dV) {
  const int64_t H = p.H, Hkv = p.Hkv, D = p.D, group = H / Hkv;
  const int64_t BQ = choose_blocks(D).bwd_q;
  const float scale = p.scale, cap = p.softcap;
  constexpr bool kF32 = std::is_same_v<scalar_t, float>;

  // Tasks: (sequence, kv head); cost = query rows x keys they reach, over the group's heads.
  std::vector<int64_t> cost;
  int64_t S_max = 0;
  for (const AttnSeq& sq : p.seqs) {
    const AttnMask mask = mask_of(p, sq);
    int64_t c = sq.S * D;
    for (int64_t i0 = 0; i0 < sq.T; i0 += BQ) {
      const int64_t rows = std::min(BQ, sq.T - i0);
      c += group * rows * (std::max<int64_t>(mask.hi(i0 + rows - 1) - mask.lo(i0), 0) + D);
    }
    for (int64_t hkv = 0; hkv < Hkv; ++hkv) cost.push_back(c);
    S_max = std::max(S_max, sq.S);
  }
  const std::vector<int64_t> order = longest_first(cost);
  const int64_t n_tasks = static_cast<int64_t>(cost.size());

  parallel_tasks(n_tasks, [&](auto take) {
    // Probabilities and their gradients for BQ query rows x the keys they see.
    std::vector<float> p_buf(BQ * S_max), dp_buf(BQ * S_max), tanh_buf(cap > 0.f ? S_max : 0);
    std::vector<float> q_buf(kF32 ? 0 : BQ * D), do_buf(kF32 ? 0 : BQ * D), dq_buf(BQ * D),
        k_buf(kF32 ? 0 : S_max * D), v_buf(kF32 ? 0 : S_max * D);
    // fp32 accumulators of dK, dV, their compensations, and one block's contribution.
    std::vector<float> dk_acc(S_max * D), dv_acc(S_max * D), dk_comp(S_max * D),
        dv_comp(S_max * D), contrib(S_max * D);
    for (int64_t t; (t = take()) < n_tasks;) {
      const int64_t task = order[t];
      const AttnSeq& sq = p.seqs[task / Hkv];
      const int64_t hkv = task % Hkv, T = sq.T, S = sq.S;
      const AttnMask mask = mask_of(p, sq);
      int64_t kld, vld;
      const float* k_h = rows_as_float(K + p.k.at(sq.b, sq.k_start, hkv), S, D, p.k.row,
                                       k_buf.data(), kld);
      const float* v_h = rows_as_float(V + p.v.at(sq.b, sq.k_start, hkv), S, D, p.v.row,
                                       v_buf.data(), vld);
      fill(dk_acc.data(), S * D, 0.f);
      fill(dv_acc.data(), S * D, 0.f);
      fill(dk_comp.data(), S * D, 0.f);
      fill(dv_comp.data(), S * D, 0.f);
      for (int64_t h = hkv * group; h < (hkv + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < T; i0 += BQ) {
          const int64_t rows = std::min(BQ, T - i0), qi = sq.q_start + i0;
          // Keys this block sees: [c0, c1) (lo and hi grow with the row).
          const int64_t c0 = mask.lo(i0), c1 = mask.hi(i0 + rows - 1), W = c1 - c0;
          // fp32: dQ written in place by the last GEMM; else through dq_buf.
          scalar_t* dq_dst = dQ + p.dq.at(sq.b, qi, h);
          float* dq_out = dq_buf.data();
          int64_t dq_ld = D;
          if constexpr (kF32) {
            dq_out = dq_dst;
            dq_ld = p.dq.row;
          }
          if (W <= 0) {  // no row of the block sees a key
            for (int64_t r = 0; r < rows; ++r) fill(dq_out + r * dq_ld, D, 0.f);
            if (!kF32) store_rows(dq_out, dq_ld, dq_dst, p.dq.row, rows, D);
            continue;
          }
          int64_t qld, dold;
          const float* q_tile = rows_as_float(Q + p.q.at(sq.b, qi, h), rows, D, p.q.row,
                                              q_buf.data(), qld);
          const float* do_tile = rows_as_float(dO + p.grad_out.at(sq.b, qi, h), rows, D,
                                               p.grad_out.row, do_buf.data(), dold);
          float* pt = p_buf.data();
          float* dp = dp_buf.data();
          gemm_f32(false, true, rows, W, D, 1.f, q_tile, qld, k_h + c0 * kld, kld, 0.f, pt, W);
          gemm_f32(false, true, rows, W, D, 1.f, do_tile, dold, v_h + c0 * vld, vld, 0.f, dp, W);
          for (int64_t r = 0; r < rows; ++r) {
            float* prow = pt + r * W;
            float* dprow = dp + r * W;
            const int64_t i = i0 + r;
            const int64_t a = std::clamp<int64_t>(mask.lo(i) - c0, 0, W);
            const int64_t e = std::clamp<int64_t>(mask.hi(i) - c0, 0, W);
            if (a >= e) {
              fill(prow, W, 0.f);
              fill(dprow, W, 0.f);
              continue;
            }
            // P = exp(s - lse), renormalized by its own sum: the saved lse is rounded to
            // fp32, and an exactly normalized row keeps dS = P (dP - sum P dP) as exact as
            // PyTorch's softmax backward (a one-key row gives dS = 0).
            const float lse = L[p.lse.at(sq.b, sq.q_start + i, h)];
            float sum;
            if (cap > 0.f) {
              softcap_row(prow + a, e - a, scale, cap, tanh_buf.data());
              sum = exp_and_sum(prow, a, e, 1.f, lse);
            } else {
              sum = exp_and_sum(prow, a, e, scale, lse);
            }
            scale_row(prow + a, e - a, 1.f / sum);
            fill(prow, a, 0.f);
            fill(prow + e, W - e, 0.f);
            // delta = sum_j P dP (= dO . O) minus grad_lse (d lse / d s = P).
            const float delta =
                dot_range(prow, dprow, a, e) - (dL ? dL[p.lse.at(sq.b, sq.q_start + i, h)] : 0.f);
            const Vec vdelta(delta), vs(scale), one(1.f);
            if (cap > 0.f) {  // d(cap tanh(x / cap)) / dx = 1 - tanh^2
              // tanh_buf[c - a]: tanh of score c (softcap_row above)
              at::vec::map3(
                  [&](Vec pv, Vec dpv, Vec tv) { return pv * (dpv - vdelta) * (one - tv * tv) * vs; },
                  dprow + a, prow + a, dprow + a, tanh_buf.data(), e - a);
            } else {
              at::vec::map2([&](Vec pv, Vec dpv) { return pv * (dpv - vdelta) * vs; },
                            dprow + a, prow + a, dprow + a, e - a);
            }
            fill(dprow, a, 0.f);
            fill(dprow + e, W - e, 0.f);
          }
          gemm_f32(true, false, W, D, rows, 1.f, pt, W, do_tile, dold, 0.f, contrib.data(), D);
          add_compensated(dv_acc.data() + c0 * D, dv_comp.data() + c0 * D, contrib.data(), W * D);
          gemm_f32(true, false, W, D, rows, 1.f, dp, W, q_tile, qld, 0.f, contrib.data(), D);
          add_compensated(dk_acc.data() + c0 * D, dk_comp.data() + c0 * D, contrib.data(), W * D);
          gemm_f32(false, false, rows, D, W, 1.f, dp, W, k_h + c0 * kld, kld, 0.f, dq_out, dq_ld);
          // A row that sees no key has dS = 0, but 0 times a NaN/inf in K is NaN: its dQ is 0.
          for (int64_t r = 0; r < rows; ++r)
            if (mask.lo(i0 + r) >= mask.hi(i0 + r)) fill(dq_out + r * dq_ld, D, 0.f);
          if (!kF32) store_rows(dq_out, dq_ld, dq_dst, p.dq.row, rows, D);
        }
      }
      store_rows(dk_acc.data(), D, dK + p.dk.at(sq.b, sq.k_start, hkv), p.dk.row, S, D);
      store_rows(dv_acc.data(), D, dV + p.dv.at(sq.b, sq.k_start, hkv), p.dv.row, S, D);
    }
  });
}

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

void attention_fwd_core(const AttnProblem& p, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, at::Tensor& out, at::Tensor& lse) {
  dispatch_float_types(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    fwd_kernel<T>(p, q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(),
                  out.data_ptr<T>(), lse.data_ptr<float>());
  });
}

void attention_bwd_core(const AttnProblem& p, const at::Tensor& grad_out, const at::Tensor& q,
                        const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                        const std::optional<at::Tensor>& grad_lse, at::Tensor& dq,
                        at::Tensor& dk, at::Tensor& dv) {
  dispatch_float_types(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    bwd_kernel<T>(p, grad_out.const_data_ptr<T>(), q.const_data_ptr<T>(), k.const_data_ptr<T>(),
                  v.const_data_ptr<T>(), lse.const_data_ptr<float>(),
                  grad_lse ? grad_lse->const_data_ptr<float>() : nullptr, dq.data_ptr<T>(),
                  dk.data_ptr<T>(), dv.data_ptr<T>());
  });
}

// The core reads rows of D contiguous elements at any row and head stride.
at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

}  // namespace

AttnProblem attention_problem(std::vector<AttnSeq> seqs, int64_t H, int64_t Hkv, int64_t D,
                              double scale, bool is_causal, int64_t window_left,
                              int64_t window_right, double softcap) {
  AttnProblem p;
  p.seqs = std::move(seqs);
  p.H = H;
  p.Hkv = Hkv;
  p.D = D;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.is_causal = is_causal;
  p.window_left = window_left;
  p.window_right = window_right;
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(AttnProblem p, LayoutOf layout,
                                                     const at::Tensor& query,
                                                     const at::Tensor& key,
                                                     const at::Tensor& value,
                                                     at::IntArrayRef lse_shape) {
  const at::Tensor q = last_dim_contiguous(query), k = last_dim_contiguous(key),
                   v = last_dim_contiguous(value);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(lse_shape, q.options().dtype(at::kFloat));
  p.q = layout(q);
  p.k = layout(k);
  p.v = layout(v);
  p.out = layout(out);
  p.lse = layout(lse);
  attention_fwd_core(p, q, k, v, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    AttnProblem p, LayoutOf layout, const at::Tensor& grad_out, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const at::Tensor& lse,
    const std::optional<at::Tensor>& grad_lse) {
  const at::Tensor q = last_dim_contiguous(query), k = last_dim_contiguous(key),
                   v = last_dim_contiguous(value), g = last_dim_contiguous(grad_out);
  const at::Tensor l = lse.contiguous();  // lse and grad_lse share one layout: both contiguous
  std::optional<at::Tensor> gl;
  if (grad_lse) gl = grad_lse->contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  p.q = layout(q);
  p.k = layout(k);
  p.v = layout(v);
  p.lse = layout(l);
  p.grad_out = layout(g);
  p.dq = layout(dq);
  p.dk = layout(dk);
  p.dv = layout(dv);
  attention_bwd_core(p, g, q, k, v, l, gl, dq, dk, dv);
  return {dq, dk, dv};
}

}  // namespace lmk
