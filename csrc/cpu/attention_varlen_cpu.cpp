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

at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

AttnProblem packed_problem(const VarlenBounds& bounds, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, double scale, bool is_causal,
                           int64_t window_left, int64_t window_right, double softcap) {
  AttnProblem p;
  const auto& cq = bounds.cu_q;
  const auto& ck = bounds.cu_k;
  for (size_t b = 0; b + 1 < cq.size(); ++b)
    p.seqs.push_back({0, cq[b], ck[b], cq[b + 1] - cq[b], ck[b + 1] - ck[b]});
  p.H = q.size(1);
  p.Hkv = k.size(1);
  p.D = q.size(2);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.is_causal = is_causal;
  p.window_left = window_left;
  p.window_right = window_right;
  p.q = packed_layout(q);
  p.k = packed_layout(k);
  p.v = packed_layout(v);
  return p;
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
  const at::Tensor q = last_dim_contiguous(query), k = last_dim_contiguous(key),
                   v = last_dim_contiguous(value);
  AttnProblem p = packed_problem(bounds, q, k, v, scale, is_causal, window_left, window_right,
                                 softcap);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  p.out = packed_layout(out);
  p.lse = packed_layout(lse);
  attention_fwd_core(p, q, k, v, out, lse);
  return {out, lse};
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
  const at::Tensor q = last_dim_contiguous(query), k = last_dim_contiguous(key),
                   v = last_dim_contiguous(value), g = last_dim_contiguous(grad_out);
  const at::Tensor l = lse.contiguous();  // lse and grad_lse share one layout
  std::optional<at::Tensor> gl;
  if (grad_lse) gl = grad_lse->contiguous();
  AttnProblem p = packed_problem(bounds, q, k, v, scale, is_causal, window_left, window_right,
                                 softcap);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  p.lse = packed_layout(l);
  p.grad_out = packed_layout(g);
  p.dq = packed_layout(dq);
  p.dk = packed_layout(dk);
  p.dv = packed_layout(dv);
  attention_bwd_core(p, g, q, k, v, l, gl, dq, dk, dv);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace lmk

TORCH_LIBRARY_IMPL(lmkernels, CPU, m) {
  m.impl("attention_varlen_fwd", &lmk::attention_varlen_fwd_cpu_op);
  m.impl("attention_varlen_bwd", &lmk::attention_varlen_bwd_cpu_op);
}
