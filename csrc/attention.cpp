// Schemas and argument checks of torch.ops.lmkernels.attention_fwd / attention_bwd (CPU kernel:
// cpu/attention_cpu.cpp, registered for the CPU key; CUDA tensors: lmkernels/ops/attention.py
// runs the Triton launchers of lmkernels/triton/attention.py after these same checks, reached
// through lmkernels._C). Messages raise ValueError/TypeError in Python, as the wrapper's own do.
// The varlen op's schemas and checks: attention_varlen.cpp.
#include "attention.h"

#include <torch/library.h>

#include <cmath>

#include "checks.h"

namespace lmk {

void check_qkv(const char* op, const at::Tensor& query, const at::Tensor& key,
               const at::Tensor& value, int64_t dims, const char* shape) {
  const std::pair<const char*, const at::Tensor*> all[] = {
      {"query", &query}, {"key", &key}, {"value", &value}};
  for (const auto& [name, t] : all) {
    TORCH_CHECK_VALUE(t->dim() == dims, op, ": ", name, " must be ", dims, "-D ", shape,
                      "; got shape ", t->sizes());
    const auto d = t->scalar_type();
    TORCH_CHECK_TYPE(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, op, ": ", name,
                     " must be float32, bfloat16 or float16; got ", d);
    TORCH_CHECK_VALUE(t->layout() == at::kStrided, op, ": ", name,
                      " must be a dense (strided) tensor; got ", t->layout());
    TORCH_CHECK_TYPE(d == query.scalar_type(), op, ": ", name, " has dtype ", d,
                     " but query has ", query.scalar_type());
    TORCH_CHECK_VALUE(t->device() == query.device(), op, ": ", name, " is on ", t->device(),
                      " but query is on ", query.device());
  }
  TORCH_CHECK_VALUE(key.sizes() == value.sizes(), op,
                    ": key and value must have one shape; got ", key.sizes(), " and ",
                    value.sizes());
  const int64_t H = query.size(1), D = query.size(dims - 1), Hkv = key.size(1);
  TORCH_CHECK_VALUE(key.size(dims - 1) == D, op, ": key head dim ", key.size(dims - 1),
                    " differs from query head dim ", D);
  TORCH_CHECK_VALUE(D % 8 == 0 && D >= 8 && D <= kMaxHeadDim, op,
                    ": head dim D must be a multiple of 8 in [8, ", kMaxHeadDim, "]; got ", D);
  TORCH_CHECK_VALUE(Hkv > 0 && H % Hkv == 0, op, ": query heads H=", H,
                    " must be a multiple of key/value heads Hkv=", Hkv);
}

void check_window_and_softcap(const char* op, int64_t window_left, int64_t window_right,
                              double softcap) {
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, op,
                    ": window (left, right) must be >= -1 (-1: unbounded); got (", window_left,
                    ", ", window_right, ")");
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, op,
                    ": softcap must be a finite number >= 0 (0: off); got ", softcap);
}

void check_bwd_tensors(const char* op, const at::Tensor& query, const at::Tensor& grad_out,
                       const at::Tensor& out, const at::Tensor& lse,
                       const std::optional<at::Tensor>& grad_lse,
                       const std::vector<int64_t>& lse_shape, const char* lse_shape_name) {
  const std::pair<const char*, const at::Tensor*> like_query[] = {
      {"grad_out", &grad_out}, {"out", &out}};
  for (const auto& [name, t] : like_query) {
    TORCH_CHECK_VALUE(t->sizes() == query.sizes(), op, ": ", name, " must have query's shape ",
                      query.sizes(), "; got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == query.scalar_type(), op, ": ", name,
                     " must have query's dtype ", query.scalar_type(), "; got ",
                     t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == query.device(), op, ": ", name, " is on ", t->device(),
                      " but query is on ", query.device());
  }
  std::pair<const char*, const at::Tensor*> stats[] = {{"lse", &lse}, {"grad_lse", nullptr}};
  if (grad_lse) stats[1].second = &*grad_lse;
  for (const auto& [name, t] : stats) {
    if (t == nullptr) continue;
    TORCH_CHECK_VALUE(t->sizes() == lse_shape && t->scalar_type() == at::kFloat, op, ": ", name,
                      " must be float32 of shape ", lse_shape_name, at::IntArrayRef(lse_shape),
                      "; got ", t->scalar_type(), " ", t->sizes());
    TORCH_CHECK_VALUE(t->device() == query.device(), op, ": ", name, " is on ", t->device(),
                      " but query is on ", query.device());
  }
}

void check_attention_args(const char* op, const at::Tensor& query, const at::Tensor& key,
                          const at::Tensor& value, int64_t window_left, int64_t window_right,
                          double softcap) {
  check_qkv(op, query, key, value, 4, "(B, H, T, D)");
  const int64_t B = query.size(0), H = query.size(1), T = query.size(2);
  const int64_t S = key.size(2);
  TORCH_CHECK_VALUE(key.size(0) == B, op, ": key batch ", key.size(0),
                    " differs from query batch ", B);
  TORCH_CHECK_VALUE(B > 0 && H > 0 && T > 0 && S > 0, op, ": empty input: query ",
                    query.sizes(), ", key ", key.sizes());
  check_window_and_softcap(op, window_left, window_right, softcap);
}

void check_attention_bwd_args(const at::Tensor& grad_out, const at::Tensor& query,
                              const at::Tensor& key, const at::Tensor& value,
                              const at::Tensor& out, const at::Tensor& lse,
                              const std::optional<at::Tensor>& grad_lse, int64_t window_left,
                              int64_t window_right, double softcap) {
  const char* op = "attention_bwd";
  check_attention_args(op, query, key, value, window_left, window_right, softcap);
  check_bwd_tensors(op, query, grad_out, out, lse, grad_lse,
                    {query.size(0), query.size(1), query.size(2)}, "");
}

}  // namespace lmk

TORCH_LIBRARY_FRAGMENT(lmkernels, m) {
  // Returns (out (B, H, T, D) in query's dtype, lse (B, H, T) float32).
  // softcap > 0: scores s become softcap * tanh(s / softcap) before masking (0: off).
  // backend: "auto", "cpu" or "triton" (there is no CUDA C++ attention kernel).
  m.def(
      "attention_fwd(Tensor query, Tensor key, Tensor value, float scale, bool is_causal, "
      "int window_left, int window_right, float softcap=0.0, *, str backend=\"auto\") -> "
      "(Tensor, Tensor)");
  // grad_lse: gradient flowing into lse (None when lse was not used). Returns (dq, dk, dv).
  m.def(
      "attention_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor lse, Tensor? grad_lse, float scale, bool is_causal, int window_left, "
      "int window_right, float softcap=0.0, *, str backend=\"auto\") -> (Tensor, Tensor, Tensor)");
}
