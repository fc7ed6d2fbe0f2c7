// rotary_embedding: the argument checks shared by the schema file (rotary_embedding.cpp) and the
// CPU kernel (cpu/rotary_embedding_cpu.cpp).
#pragma once
#include <ATen/ATen.h>

namespace lmk {

// q (B, H, T, D), k (B, Hkv, T, D): one float dtype, D even, any strides; cos and sin
// (Bc, T, D) with Bc 1 or B, float32 or q's dtype; all on one device.
void check_rotary_embedding_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                 const at::Tensor& sin);

}  // namespace lmk
