// attention_fwd / attention_bwd and attention_varlen_fwd / attention_varlen_bwd: shared
// declarations for the checks (attention.cpp, attention_varlen.cpp) and the CPU kernels
// (cpu/attention_cpu.cpp, cpu/attention_varlen_cpu.cpp, both on cpu/attention_kernel.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace lmk {

// The masking rule of every attention kernel. Query row i (of T) may attend key column j
// (of S) when lo(i) <= j <= hi(i) with off = S - T (bottom-right alignment, FlashAttention-2):
//   lo(i) = i + off - left   (left  < 0: unbounded, lo = 0)
//   hi(i) = i + off + right  (right < 0: unbounded, hi = S - 1)
// is_causal clips right to 0. A row with lo > hi attends nothing: out = 0, lse = -inf.
// Varlen: the same rule with each sequence's own T and S.
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
                          const at::Tensor& value, int64_t window_left, int64_t window_right,
                          double softcap);
void check_attention_bwd_args(const at::Tensor& grad_out, const at::Tensor& query,
                              const at::Tensor& key, const at::Tensor& value,
                              const at::Tensor& out, const at::Tensor& lse,
                              const std::optional<at::Tensor>& grad_lse, int64_t window_left,
                              int64_t window_right, double softcap);

// Shared by both ops. check_qkv: query/key/value are `dims`-D (`shape` names the axes for
// messages) with heads on axis 1 and the head dim last; dtypes, layout, devices, key/value
// shapes, head dim D (multiple of 8 in [8, 256]) and H a multiple of Hkv.
void check_qkv(const char* op, const at::Tensor& query, const at::Tensor& key,
               const at::Tensor& value, int64_t dims, const char* shape);
// Window sides >= -1, softcap finite and >= 0.
// Backward's grad_out and out (query's shape, dtype, device) and lse / grad_lse (float32 of
// lse_shape; lse_shape_name prefixes the shape in the message).
void check_bwd_tensors(const char* op, const at::Tensor& query, const at::Tensor& grad_out,
                       const at::Tensor& out, const at::Tensor& lse,
                       const std::optional<at::Tensor>& grad_lse,
                       const std::vector<int64_t>& lse_shape, const char* lse_shape_name);
void check_window_and_softcap(const char* op, int64_t window_left, int64_t window_right,
                              double softcap);

// Sequence boundaries of a varlen call, read on the host (cu_seqlens_q[b], cu_seqlens_k[b]).
struct VarlenBounds {
  std::vector<int64_t> cu_q, cu_k;
};

// attention_varlen's checks, including the values of cu_seqlens_q/k (starts at 0,
// non-decreasing, last entry = total rows, no length above max_seqlen), which it reads once:
// for CUDA tensors that is one small device-to-host copy (and a sync) per call.
VarlenBounds check_attention_varlen_args(const char* op, const at::Tensor& query,
                                         const at::Tensor& key, const at::Tensor& value,
                                         const at::Tensor& cu_seqlens_q,
                                         const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                         int64_t max_seqlen_k, int64_t window_left,
                                         int64_t window_right, double softcap);
VarlenBounds check_attention_varlen_bwd_args(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    int64_t window_left, int64_t window_right, double softcap);

}  // namespace lmk
