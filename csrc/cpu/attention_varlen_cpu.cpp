// CPU kernels of attention_varlen_fwd / attention_varlen_bwd (packed (total, H, D)): the
// sequences of cu_seqlens for the shared flash core (attention_kernel.cpp). The CPU kernel is
// always deterministic (each task owns its outputs), so `deterministic` changes nothing here.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../attention.h"
#include "../checks.h"
#include "attention_kernel.h"

namespace lmk {
namespace {

std::vector<AttnSeq> packed_sequences(const VarlenBounds& bounds) {
  const auto& cq = bounds.cu_q;
  const auto& ck = bounds.cu_k;
  std::vector<AttnSeq> seqs;
  for (size_t b = 0; b + 1 < cq.size(); ++b)
    seqs.push_back({0, cq[b], ck[b], cq[b + 1] - cq[b], ck[b + 1] - ck[b]});
  return seqs;
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_cpu_op(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, bool is_causal, int64_t window_left,
    int64_t window_right, double softcap, std::string_view backend) {
  const char* op = "attention_varlen_fwd";
  check_cpu_backend(op, backend, "lmkernels.triton.attention.attention_varlen_fwd");
  const VarlenBounds bounds =
      check_attention_varlen_args(op, query, key, value, cu_seqlens_q, cu_seqlens_k,
                                  max_seqlen_q, max_seqlen_k, window_left, window_right, softcap);
  AttnProblem p = attention_problem(packed_sequences(bounds), query.size(1), key.size(1),
                                    query.size(2), scale, is_causal, window_left, window_right,
                                    softcap);
  return attention_fwd_cpu(std::move(p), packed_layout, query, key, value,
                           {query.size(1), query.size(0)});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd_cpu_op(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    bool is_causal, int64_t window_left, int64_t window_right, double softcap,
    bool /*deterministic*/, std::string_view backend) {
  check_cpu_backend("attention_varlen_bwd", backend,
                    "lmkernels.triton.attention.attention_varlen_bwd");
  const VarlenBounds bounds = check_attention_varlen_bwd_args(
      grad_out, query, key, value, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, window_left, window_right, softcap);
  AttnProblem p = attention_problem(packed_sequences(bounds), query.size(1), key.size(1),
                                    query.size(2), scale, is_causal, window_left, window_right,
                                    softcap);
  return attention_bwd_cpu(std::move(p), packed_layout, grad_out, query, key, value, lse,
                           grad_lse);
}

}  // namespace
}  // namespace lmk

TORCH_LIBRARY_IMPL(lmkernels, CPU, m) {
  m.impl("attention_varlen_fwd", &lmk::attention_varlen_fwd_cpu_op);
  m.impl("attention_varlen_bwd", &lmk::attention_varlen_bwd_cpu_op);
}
