// Schemas and argument checks of torch.ops.lmkernels.attention_fwd / attention_bwd
// (CPU kernel: cpu/attention_cpu.cpp; Triton kernels: lmkernels/triton/attention.py).
#include "attention.h"

#include <torch/library.h>

#include "checks.h"

namespace lmk {

void check_attention_args(const char* op, const at::Tensor& query, const at::Tensor& key,
                          const at::Tensor& value, int64_t window_left, int64_t window_right) {
  const std::pair<const char*, const at::Tensor*> all[] = {
      {"query", &query}, {"key", &key}, {"value", &value}};
  for (const auto& [name, t] : all) {
    TORCH_CHECK(t->dim() == 4, op, ": ", name, " must be 4-D (B, H, T, D); got shape ", t->sizes());
    check_float_dtype(op, name, *t);
    TORCH_CHECK(t->layout() == at::kStrided, op, ": ", name,
                " must be a dense (strided) tensor; got ", t->layout());
    TORCH_CHECK(t->scalar_type() == query.scalar_type(), op, ": ", name, " has dtype ",
                t->scalar_type(), " but query has ", query.scalar_type());
    TORCH_CHECK(t->device() == query.device(), op, ": ", name, " is on ", t->device(),
                " but query is on ", query.device());
  }
  TORCH_CHECK(key.sizes() == value.sizes(), op, ": key and value must have one shape; got ",
              key.sizes(), " and ", value.sizes());
  const int64_t B = query.size(0), H = query.size(1), T = query.size(2), D = query.size(3);
  const int64_t Hkv = key.size(1), S = key.size(2);
  TORCH_CHECK(key.size(0) == B, op, ": key batch ", key.size(0), " differs from query batch ", B);
  TORCH_CHECK(key.size(3) == D, op, ": key head dim ", key.size(3),
              " differs from query head dim ", D);
  TORCH_CHECK(D % 8 == 0 && D >= 8 && D <= 256, op,
              ": head dim D must be a multiple of 8 in [8, 256]; got ", D);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, op, ": query heads H=", H,
              " must be a multiple of key/value heads Hkv=", Hkv);
  TORCH_CHECK(B > 0 && H > 0 && T > 0 && S > 0, op, ": empty input: query ", query.sizes(),
              ", key ", key.sizes());
  TORCH_CHECK(window_left >= -1 && window_right >= -1, op,
              ": window (left, right) must be >= -1 (-1: unbounded); got (", window_left, ", ",
              window_right, ")");
}

}  // namespace lmk

TORCH_LIBRARY_FRAGMENT(lmkernels, m) {
  // Returns (out (B, H, T, D) in query's dtype, lse (B, H, T) float32).
  m.def(
      "attention_fwd(Tensor query, Tensor key, Tensor value, float scale, bool is_causal, "
      "int window_left, int window_right) -> (Tensor, Tensor)");
  // grad_lse: gradient flowing into lse (None when lse was not used). Returns (dq, dk, dv).
  m.def(
      "attention_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor lse, Tensor? grad_lse, float scale, bool is_causal, int window_left, "
      "int window_right) -> (Tensor, Tensor, Tensor)");
}
