// fused_linear_cross_entropy: declarations shared by the schema file and the CPU kernel.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace lmk {

enum class Reduction { kNone, kMean, kSum };

// "none" | "mean" | "sum", else an error naming the argument.
Reduction parse_reduction(const char* op, const std::string& reduction);

// Validates shapes, dtypes, devices and options (names the offending argument). Target values
// are checked by the kernels (they read the data anyway).
void check_flce_args(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                     const at::Tensor& target, const std::optional<at::Tensor>& bias,
                     double label_smoothing, double z_loss, std::optional<double> softcap,
                     int64_t chunk_size);

}  // namespace lmk
