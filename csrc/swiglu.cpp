// Schemas and argument checks of torch.ops.lmkernels.swiglu_fwd / swiglu_bwd (CPU kernel:
// cpu/swiglu_cpu.cpp; CUDA tensors: lmkernels/ops/swiglu.py runs the Triton launchers of
// lmkernels/triton/swiglu.py). Math: lmkernels/reference/swiglu.py.
#include "swiglu.h"

#include <torch/library.h>

namespace lmk {

void check_swiglu_args(const char* op, const at::Tensor& gate, const at::Tensor& up,
                       const at::Tensor* grad_out) {
  const std::pair<const char*, const at::Tensor*> all[] = {
      {"gate", &gate}, {"up", &up}, {"grad_out", grad_out}};
  for (const auto& [name, t] : all) {
    if (t == nullptr) continue;
    TORCH_CHECK_VALUE(t->layout() == at::kStrided, op, ": ", name,
                      " must be a dense (strided) tensor; got ", t->layout());
    const auto d = t->scalar_type();
    TORCH_CHECK_TYPE(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, op, ": ", name,
                     " must be float32, bfloat16 or float16; got ", d);
    TORCH_CHECK_TYPE(d == gate.scalar_type(), op, ": ", name, " has dtype ", d,
                     " but gate has ", gate.scalar_type());
    TORCH_CHECK_VALUE(t->sizes() == gate.sizes(), op, ": ", name, " has shape ", t->sizes(),
                      " but gate has shape ", gate.sizes());
    TORCH_CHECK_VALUE(t->device() == gate.device(), op, ": ", name, " is on ", t->device(),
                      " but gate is on ", gate.device());
  }
  TORCH_CHECK_VALUE(gate.dim() >= 1, op, ": gate and up must be at least 1-D; got a scalar");
}

}  // namespace lmk

TORCH_LIBRARY_FRAGMENT(lmkernels, m) {
  // silu(gate) * up, silu(x) = x / (1 + exp(-x)); fp32 math, one rounding to the inputs' dtype.
  m.def("swiglu_fwd(Tensor gate, Tensor up, *, str backend=\"auto\") -> Tensor");
  // Recomputes silu from gate. Returns (dgate, dup).
  m.def(
      "swiglu_bwd(Tensor grad_out, Tensor gate, Tensor up, *, str backend=\"auto\") "
      "-> (Tensor, Tensor)");
}
