// CPU kernels of attention_fwd / attention_bwd (dense (B, H, T, D)): B sequences of equal
// length for the shared flash core (attention_kernel.cpp), addressed through the inputs' own
// strides (a (B, T, H, D) buffer viewed as (B, H, T, D) is read in place, not copied).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../attention.h"
#include "../checks.h"
#include "attention_kernel.h"

namespace lmk {
namespace {

std::vector<AttnSeq> equal_sequences(const at::Tensor& q, const at::Tensor& k) {
  std::vector<AttnSeq> seqs;
  for (int64_t b = 0; b < q.size(0); ++b) seqs.push_back({b, 0, 0, q.size(2), k.size(2)});
  return seqs;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu_op(const at::Tensor& query,
                                                        const at::Tensor& key,
                                                        const at::Tensor& value, double scale,
                                                        bool is_causal, int64_t window_left,
                                                        int64_t window_right, double softcap,
                                                        std::string_view backend) {
  check_cpu_backend("attention_fwd", backend, "lmkernels.triton.attention.attention_fwd");
  check_attention_args("attention_fwd", query, key, value, window_left, window_right, softcap);
  AttnProblem p = attention_problem(equal_sequences(query, key), query.size(1), key.size(1),
                                    query.size(3), scale, is_causal, window_left, window_right,
                                    softcap);
  return attention_fwd_cpu(std::move(p), dense_layout, query, key, value,
                           {query.size(0), query.size(1), query.size(2)});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu_op(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& grad_lse, double scale, bool is_causal,
    int64_t window_left, int64_t window_right, double softcap, std::string_view backend) {
  check_cpu_backend("attention_bwd", backend, "lmkernels.triton.attention.attention_bwd");
  check_attention_bwd_args(grad_out, query, key, value, out, lse, grad_lse, window_left,
                           window_right, softcap);
  AttnProblem p = attention_problem(equal_sequences(query, key), query.size(1), key.size(1),
                                    query.size(3), scale, is_causal, window_left, window_right,
                                    softcap);
  return attention_bwd_cpu(std::move(p), dense_layout, grad_out, query, key, value, lse, grad_lse);
}

}  // namespace
}  // namespace lmk

TORCH_LIBRARY_IMPL(lmkernels, CPU, m) {
  m.impl("attention_fwd", &lmk::attention_fwd_cpu_op);
  m.impl("attention_bwd", &lmk::attention_bwd_cpu_op);
}
