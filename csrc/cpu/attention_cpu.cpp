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

// The core reads rows of D contiguous elements at any row and head stride.
at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

AttnProblem dense_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          double scale, bool is_causal, int64_t window_left,
                          int64_t window_right, double softcap) {
  AttnProblem p;
  const int64_t B = q.size(0), T = q.size(2), S = k.size(2);
  for (int64_t b = 0; b < B; ++b) p.seqs.push_back({b, 0, 0, T, S});
  p.H = q.size(1);
  p.Hkv = k.size(1);
  p.D = q.size(3);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.is_causal = is_causal;
  p.window_left = window_left;
  p.window_right = window_right;
  p.q = dense_layout(q);
  p.k = dense_layout(k);
  p.v = dense_layout(v);
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu_op(const at::Tensor& query,
                                                        const at::Tensor& key,
                                                        const at::Tensor& value, double scale,
                                                        bool is_causal, int64_t window_left,
                                                        int64_t window_right, double softcap,
                                                        std::string_view backend) {
  check_cpu_backend("attention_fwd", backend, "lmkernels.triton.attention.attention_fwd");
  check_attention_args("attention_fwd", query, key, value, window_left, window_right, softcap);
  const at::Tensor q = last_dim_contiguous(query), k = last_dim_contiguous(key),
                   v = last_dim_contiguous(value);
  AttnProblem p = dense_problem(q, k, v, scale, is_causal, window_left, window_right, softcap);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  p.out = dense_layout(out);
  p.lse = dense_layout(lse);
  attention_fwd_core(p, q, k, v, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu_op(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& grad_lse, double scale, bool is_causal,
    int64_t window_left, int64_t window_right, double softcap, std::string_view backend) {
  check_cpu_backend("attention_bwd", backend, "lmkernels.triton.attention.attention_bwd");
  check_attention_bwd_args(grad_out, query, key, value, out, lse, grad_lse, window_left,
                           window_right, softcap);
  const at::Tensor q = last_dim_contiguous(query), k = last_dim_contiguous(key),
                   v = last_dim_contiguous(value), g = last_dim_contiguous(grad_out);
  // out is not read: delta = dO . O is recomputed as sum_j P dP from the tiles (see the core).
  // lse and grad_lse share one layout: both contiguous.
  const at::Tensor l = lse.contiguous();
  std::optional<at::Tensor> gl;
  if (grad_lse) gl = grad_lse->contiguous();
  AttnProblem p = dense_problem(q, k, v, scale, is_causal, window_left, window_right, softcap);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  p.lse = dense_layout(l);
  p.grad_out = dense_layout(g);
  p.dq = dense_layout(dq);
  p.dk = dense_layout(dk);
  p.dv = dense_layout(dv);
  attention_bwd_core(p, g, q, k, v, l, gl, dq, dk, dv);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace lmk

TORCH_LIBRARY_IMPL(lmkernels, CPU, m) {
  m.impl("attention_fwd", &lmk::attention_fwd_cpu_op);
  m.impl("attention_bwd", &lmk::attention_bwd_cpu_op);
}
