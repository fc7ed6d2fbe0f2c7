// The one CPU flash-attention core (cpu/attention_kernel.cpp) behind attention_fwd/bwd (dense,
// cpu/attention_cpu.cpp) and attention_varlen_fwd/bwd (packed, cpu/attention_varlen_cpu.cpp).
//
// Both ops are a list of independent sequences that share heads: sequence b has T_b query rows
// and S_b key rows. A tensor's element (sequence b, head h, row i) sits at
//     b * batch + (start_b + i) * row + h * head        (the last dim D is contiguous)
// Dense (B, H, T, D):     one sequence per batch entry, start 0, strides from the tensor.
// Packed (total, H, D):   batch stride 0, start = cu_seqlens[b], row and head strides from
//                         the tensor (H * D and D when contiguous).
// lse follows the same rule with D = 1: dense (B, H, T), packed (H, total).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace lmk {

// Element strides of one tensor in the rule above.
struct RowLayout {
  int64_t batch, row, head;
  int64_t at(int64_t b, int64_t start, int64_t h) const { return b * batch + start * row + h * head; }
};

// A (B, H, T, D) tensor (or (B, H, T) for lse) as a RowLayout.
inline RowLayout dense_layout(const at::Tensor& t) {
  return RowLayout{t.stride(0), t.stride(2), t.stride(1)};
}

// A packed (total, H, D) tensor (or (H, total) for lse) as a RowLayout.
inline RowLayout packed_layout(const at::Tensor& t) {
  return t.dim() == 3 ? RowLayout{0, t.stride(0), t.stride(1)} : RowLayout{0, t.stride(1), t.stride(0)};
}

struct AttnSeq {
  int64_t b, q_start, k_start, T, S;
};

// Everything the core needs besides the data pointers. Masking: AttnMask (attention.h) per
// sequence, so causal alignment and windows are per sequence, exactly as the dense op on each
// sequence alone.
struct AttnProblem {
  std::vector<AttnSeq> seqs;
  int64_t H, Hkv, D;
  float scale, softcap;  // softcap 0: off
  bool is_causal;
  int64_t window_left, window_right;
  RowLayout q, k, v, out, lse;  // lse: also grad_lse's layout in the backward
  RowLayout grad_out, dq, dk, dv;  // backward only
};

// The problem's scalars and sequences; the tensor layouts are set by the runs below.
AttnProblem attention_problem(std::vector<AttnSeq> seqs, int64_t H, int64_t Hkv, int64_t D,
                              double scale, bool is_causal, int64_t window_left,
                              int64_t window_right, double softcap);

// How an op's tensors map onto RowLayout: dense_layout or packed_layout.
using LayoutOf = RowLayout (*)(const at::Tensor&);

// Forward: query/key/value are read where they lie (only a non-contiguous last dim is copied);
// returns (out like query, lse float32 of lse_shape). Raises on dtypes the core does not handle
// (checked before by the ops).
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(AttnProblem p, LayoutOf layout,
                                                     const at::Tensor& query,
                                                     const at::Tensor& key,
                                                     const at::Tensor& value,
                                                     at::IntArrayRef lse_shape);

// Backward: returns (dq, dk, dv) shaped like query, key, value. out is not read: delta = dO . O
// is recomputed as sum_j P dP from the tiles.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    AttnProblem p, LayoutOf layout, const at::Tensor& grad_out, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const at::Tensor& lse,
    const std::optional<at::Tensor>& grad_lse);

}  // namespace lmk
