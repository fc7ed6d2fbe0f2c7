// swiglu_fwd / swiglu_bwd: the argument checks shared by the schema file (swiglu.cpp) and the
// CPU kernel (cpu/swiglu_cpu.cpp).
#pragma once
#include <ATen/ATen.h>

namespace lmk {

// gate and up: one shape (at least 1-D), one float dtype (float32/bfloat16/float16), one device.
// grad_out (backward only, may be nullptr): like gate.
void check_swiglu_args(const char* op, const at::Tensor& gate, const at::Tensor& up,
                       const at::Tensor* grad_out);

}  // namespace lmk
