// attention_fwd / attention_bwd: shared declarations for the checks (attention.cpp) and the CPU
// kernel (cpu/attention_cpu.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace lmk {

// The masking rule of every attention kernel. Query row i (of T) may attend key column j
// (of S) when lo(i) <= j <= hi(i) with off = S - T (bottom-right alignment, FlashAttention-2):
//   lo(i) = i + off - left   (left  < 0: unbounded, lo = 0)
//   hi(i) = i + off + right  (right < 0: unbounded, hi = S - 1)
// is_causal clips right to 0. A row with lo > hi attends nothing: out = 0, lse = -inf.
struct AttnMask {
  int64_t T, S, left, right;
  AttnMask(int64_t T_, int64_t S_, bool is_causal, int64_t left_, int64_t right_)
      : T(T_), S(S_), left(left_), right(is_causal ? (right_ < 0 ? 0 : std::min<int64_t>(right_, 0)) : right_) {}
  int64_t lo(int64_t i) const { return left < 0 ? 0 : std::max<int64_t>(0, i + S - T - left); }
  // One past the last allowed key.
  int64_t hi(int64_t i) const { return right < 0 ? S : std::min<int64_t>(S, i + S - T + right + 1); }
};

constexpr int64_t kMaxHeadDim = 256;

// Validate the forward's / backward's arguments (names the offending one). One source of truth
// for every backend: the CPU op calls them in C++, the Triton path through lmkernels._C.
void check_attention_args(const char* op, const at::Tensor& query, const at::Tensor& key,
                          const at::Tensor& value, int64_t window_left, int64_t window_right);
void check_attention_bwd_args(const at::Tensor& grad_out, const at::Tensor& query,
                              const at::Tensor& key, const at::Tensor& value,
                              const at::Tensor& out, const at::Tensor& lse,
                              const std::optional<at::Tensor>& grad_lse, int64_t window_left,
                              int64_t window_right);

}  // namespace lmk
