// Schema and argument checks of torch.ops.lmkernels.rotary_embedding (CPU kernel:
// cpu/rotary_embedding_cpu.cpp; CUDA tensors: lmkernels/ops/rotary_embedding.py runs the Triton
// launcher of lmkernels/triton/rotary_embedding.py). Math: lmkernels/reference/rotary_embedding.py.
#include "rotary_embedding.h"

#include <torch/library.h>

namespace lmk {

void check_rotary_embedding_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                 const at::Tensor& sin) {
  const char* op = "rotary_embedding";
  const std::pair<const char*, const at::Tensor*> all[] = {
      {"q", &q}, {"k", &k}, {"cos", &cos}, {"sin", &sin}};
  for (const auto& [name, t] : all) {
    TORCH_CHECK_VALUE(t->layout() == at::kStrided, op, ": ", name,
                      " must be a dense (strided) tensor; got ", t->layout());
    const auto d = t->scalar_type();
    TORCH_CHECK_TYPE(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, op, ": ", name,
                     " must be float32, bfloat16 or float16; got ", d);
    TORCH_CHECK_VALUE(t->device() == q.device(), op, ": ", name, " is on ", t->device(),
                      " but q is on ", q.device());
  }
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be 4-D (B, H, T, D); got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, op, ": k must be 4-D (B, Hkv, T, D); got shape ", k.sizes());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), op, ": k has dtype ", k.scalar_type(),
                   " but q has ", q.scalar_type());
  const int64_t B = q.size(0), T = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(D > 0 && D % 2 == 0, op, ": head dim D must be even and > 0; got q shape ",
                    q.sizes());
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(2) == T && k.size(3) == D, op,
                    ": k must be (B, Hkv, T, D) = (", B, ", Hkv, ", T, ", ", D,
                    ") like q; got shape ", k.sizes());
  for (const auto& [name, t] : {std::pair{"cos", &cos}, std::pair{"sin", &sin}}) {
    TORCH_CHECK_VALUE(t->dim() == 3 && (t->size(0) == 1 || t->size(0) == B) &&
                          t->size(1) == T && t->size(2) == D,
                      op, ": ", name, " must be (1 or B, T, D) = (1 or ", B, ", ", T, ", ", D,
                      "); got shape ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == q.scalar_type(), op,
                     ": ", name, " must be float32 or q's dtype (", q.scalar_type(), "); got ",
                     t->scalar_type());
  }
  TORCH_CHECK_VALUE(sin.sizes() == cos.sizes() && sin.scalar_type() == cos.scalar_type(), op,
                    ": sin must match cos; got ", sin.scalar_type(), " ", sin.sizes(), " and ",
                    cos.scalar_type(), " ", cos.sizes());
}

}  // namespace lmk

TORCH_LIBRARY_FRAGMENT(lmkernels, m) {
  // Rotates q and k by the angles whose cos/sin are given per position (and batch entry):
  //   out = x * cos + rot(x) * sin
  // rot: rotate-half (HF Llama, (-x[D/2:], x[:D/2])) or, with interleaved, GPT-J pairs
  // ((-x[1], x[0]), (-x[3], x[2]), ...). inverse rotates by the opposite angles (the transpose:
  // the backward). Returns (q_rot, k_rot), contiguous, in q's dtype.
  m.def(
      "rotary_embedding(Tensor q, Tensor k, Tensor cos, Tensor sin, bool interleaved, "
      "bool inverse, *, str backend=\"auto\") -> (Tensor, Tensor)");
}
