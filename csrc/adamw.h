// fused_adamw_: shared declarations for the CPU and CUDA implementations.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string_view>

namespace lmk {

// One call updates one parameter group: the hyperparameters are shared, the step count is
// per tensor (state_steps[i], float32, already incremented by the caller, as torch does).
struct AdamWArgs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps;
  double lr, beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize, adam_w_mode;
  std::optional<at::Tensor> lr_tensor, inv_scale, found_inf;
  int64_t stochastic_rounding_seed;  // < 0: round to nearest
};

// Validates every argument (names the offending one) and returns the device they share.
// Also reachable from Python as lmkernels._C.check_fused_adamw_args (the Triton path).
// Step counts and lr_tensor are range-checked only when on the CPU (no device sync).
at::Device check_adamw_args(const AdamWArgs& a);

// The CUDA C++ kernel (cuda/adamw_cuda.cu; checks its arguments first). Bound into
// lmkernels._C (module.cpp) for the CUDA backend table of lmkernels/ops/adamw.py.
void fused_adamw_cuda(const AdamWArgs& args);

// The op's argument list, in schema order (shared by every registered implementation).
#define LMK_ADAMW_PARAMS                                                                       \
  at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,                       \
      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList master_params, \
      at::TensorList state_steps, double lr, double beta1, double beta2, double eps,            \
      double weight_decay, bool amsgrad, bool maximize, bool adam_w_mode,                       \
      const std::optional<at::Tensor>&lr_tensor, const std::optional<at::Tensor>&inv_scale,     \
      const std::optional<at::Tensor>&found_inf, int64_t stochastic_rounding_seed
// The same names, to forward them (the CPU op's wrapper passes them on to the kernel).
#define LMK_ADAMW_NAMES                                                                        \
  params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, lr, beta1, \
      beta2, eps, weight_decay, amsgrad, maximize, adam_w_mode, lr_tensor, inv_scale, found_inf, \
      stochastic_rounding_seed
#define LMK_ADAMW_ARGS                                                                         \
  AdamWArgs {                                                                                   \
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, lr,      \
        beta1, beta2, eps, weight_decay, amsgrad, maximize, adam_w_mode, lr_tensor, inv_scale,  \
        found_inf, stochastic_rounding_seed                                                     \
  }

// One 32-bit hash per (seed, tensor, element): the random bits for stochastic rounding.
// The same function is used by the CPU, CUDA and Triton kernels.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline uint32_t sr_hash(uint32_t seed, uint32_t tensor, uint32_t index) {
  uint32_t h = seed ^ (tensor * 0x9E3779B1u) ^ (index * 0x85EBCA77u);
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x846CA68Bu;
  h ^= h >> 16;
  return h;
}

}  // namespace lmk
