// rms_norm_fwd / add_rms_norm_fwd / rms_norm_bwd: the argument checks shared by the schema file
// (rms_norm.cpp) and the CPU kernel (cpu/rms_norm_cpu.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace lmk {

// x (..., H) float32/bfloat16/float16; weight (H,) in x's dtype or float32 (the output takes
// weight's dtype, as HF's `weight * normed.to(x.dtype)` promotes); residual (add_rms_norm
// only, may be nullptr) like x; eps >= 0.
void check_rms_norm_args(const char* op, const at::Tensor& x, const at::Tensor* residual,
                         const at::Tensor& weight, double eps);

// grad_out like the forward's output (x's shape, weight's dtype); rstd float32 with
// x.numel() / H elements; grad_sum (optional) like x.
void check_rms_norm_bwd_args(const at::Tensor& grad_out, const at::Tensor& x,
                             const at::Tensor& weight, const at::Tensor& rstd,
                             const std::optional<at::Tensor>& grad_sum);

}  // namespace lmk
