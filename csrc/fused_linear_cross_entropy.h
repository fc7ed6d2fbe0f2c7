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

// vocab_size = 0: weight is the whole vocabulary. vocab_size > 0: weight holds the rows
// [vocab_start, vocab_start + V) of a vocab_size vocabulary (a vocab-parallel shard); checks
// that they fit and returns true.
bool check_vocab_shard(const char* op, const at::Tensor& weight, int64_t vocab_start,
                       int64_t vocab_size);

// All of fused_linear_cross_entropy_fwd's checks (schema order, without backend); returns the
// parsed reduction. One place for the C++ kernel and the Triton path (through lmkernels._C).
Reduction check_flce_fwd_args(const at::Tensor& hidden, const at::Tensor& weight,
                              const at::Tensor& target, const std::optional<at::Tensor>& bias,
                              double label_smoothing, double z_loss, std::optional<double> softcap,
                              const std::string& reduction, int64_t chunk_size, bool compute_grad,
                              int64_t vocab_start, int64_t vocab_size);

// fused_linear_cross_entropy_bwd's checks (schema order, without ignore_index and backend).
Reduction check_flce_bwd_args(const at::Tensor& grad_loss, const at::Tensor& hidden,
                              const at::Tensor& weight, const at::Tensor& target,
                              const std::optional<at::Tensor>& bias, const at::Tensor& lse,
                              double label_smoothing, double z_loss, std::optional<double> softcap,
                              const std::string& reduction, int64_t chunk_size,
                              int64_t vocab_start, int64_t vocab_size);

}  // namespace lmk
