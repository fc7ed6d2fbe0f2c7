// Schema and argument checks of torch.ops.lmkernels.rotary_embedding (CPU kernel:
// cpu/rotary_embedding_cpu.cpp; CUDA tensors: lmkernels/ops/rotary_embedding.py runs the Triton
// launcher of lmkernels/triton/rotary_embedding.py). Math: lmkernels/reference/rotary_embedding.py.
#include "rotary_embedding.h"

#include <torch/library.h>

#include "autograd_fn.h"

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

namespace lmk {
namespace {

using RotarySignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                           const at::Tensor&, const at::Tensor&,
                                                           bool, bool, c10::string_view);

// Autograd in C++ (not torch.library.register_autograd: see csrc/swiglu.cpp for the cost of
// the Python path). The backward is the same op with `inverse` flipped (the rotation's
// transpose, i.e. the rotation by -theta); cos and sin get no gradient.
struct RotaryFunction : torch::autograd::Function<RotaryFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& cos, const at::Tensor& sin,
                                                bool interleaved, bool inverse,
                                                const std::string& backend) {
    static const auto op = op_handle<RotarySignature>("rotary_embedding");
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["interleaved"] = interleaved;
    ctx->saved_data["inverse"] = inverse;
    ctx->saved_data["backend"] = backend;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [q_rot, k_rot] = op.call(q, k, cos, sin, interleaved, inverse, backend);
    return {q_rot, k_rot};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op = op_handle<RotarySignature>("rotary_embedding");
    const auto saved = ctx->get_saved_variables();  // cos, sin
    auto [dq, dk] = op.call(grads[0], grads[1], saved[0], saved[1],
                            ctx->saved_data["interleaved"].toBool(),
                            !ctx->saved_data["inverse"].toBool(),
                            ctx->saved_data["backend"].toStringRef());
    return {dq, dk, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> rotary_embedding_autograd(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& cos, const at::Tensor& sin,
                                                             bool interleaved, bool inverse,
                                                             c10::string_view backend) {
  auto outs = RotaryFunction::apply(q, k, cos, sin, interleaved, inverse, std::string(backend));
  return {outs[0], outs[1]};
}

}  // namespace
}  // namespace lmk

TORCH_LIBRARY_IMPL(lmkernels, Autograd, m) {
  m.impl("rotary_embedding", &lmk::rotary_embedding_autograd);
}
