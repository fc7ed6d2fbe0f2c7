// Schemas and argument checks of torch.ops.lmkernels.fused_linear_cross_entropy_fwd / _bwd
// (CPU kernel: cpu/fused_linear_cross_entropy_cpu.cpp, registered for the CPU key; CUDA tensors:
// lmkernels/ops/fused_linear_cross_entropy.py runs the Triton launchers of
// lmkernels/triton/fused_linear_cross_entropy.py after these same checks, reached through
// lmkernels._C). backend: "auto", "cpu" or "triton" (there is no CUDA C++ kernel).
#include "fused_linear_cross_entropy.h"

#include <torch/library.h>

#include "checks.h"

namespace lmk {

Reduction parse_reduction(const char* op, const std::string& reduction) {
  if (reduction == "mean") return Reduction::kMean;
  if (reduction == "sum") return Reduction::kSum;
  if (reduction == "none") return Reduction::kNone;
  TORCH_CHECK(false, op, ": reduction must be 'mean', 'sum' or 'none'; got '", reduction, "'");
}

void check_flce_args(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                     const at::Tensor& target, const std::optional<at::Tensor>& bias,
                     double label_smoothing, double z_loss, std::optional<double> softcap,
                     int64_t chunk_size) {
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be 2-D (N, H); got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (V, H); got shape ", weight.sizes());
  check_float_dtype(op, "hidden", hidden);
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), op, ": weight has dtype ",
              weight.scalar_type(), " but hidden has ", hidden.scalar_type());
  TORCH_CHECK(hidden.layout() == at::kStrided && weight.layout() == at::kStrided, op,
              ": hidden and weight must be dense (strided) tensors");
  TORCH_CHECK(weight.device() == hidden.device(), op, ": weight is on ", weight.device(),
              " but hidden is on ", hidden.device());
  TORCH_CHECK(weight.size(1) == hidden.size(1), op, ": weight must be (V, H) with H = ",
              hidden.size(1), " (hidden's last dim); got shape ", weight.sizes());
  TORCH_CHECK(weight.size(0) >= 1 && hidden.size(1) >= 1, op,
              ": vocabulary size V and hidden size H must be >= 1; got weight shape ",
              weight.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == hidden.size(0), op,
              ": target must be 1-D (N,) with N = ", hidden.size(0), "; got shape ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64 (class indices); got ",
              target.scalar_type());
  TORCH_CHECK(target.device() == hidden.device(), op, ": target is on ", target.device(),
              " but hidden is on ", hidden.device());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == weight.size(0), op, ": bias must be (V,) with V = ",
                weight.size(0), "; got shape ", b.sizes());
    TORCH_CHECK(b.scalar_type() == hidden.scalar_type(), op, ": bias has dtype ", b.scalar_type(),
                " but hidden has ", hidden.scalar_type());
    TORCH_CHECK(b.device() == hidden.device(), op, ": bias is on ", b.device(),
                " but hidden is on ", hidden.device());
  }
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be in [0, 1]; got ", label_smoothing);
  TORCH_CHECK(z_loss >= 0.0, op, ": z_loss must be >= 0; got ", z_loss);
  TORCH_CHECK(!softcap.has_value() || *softcap > 0.0, op, ": softcap must be None or > 0; got ",
              softcap.value_or(0.0));
  TORCH_CHECK(chunk_size >= 0, op, ": chunk_size must be >= 1 (or 0/None: automatic); got ",
              chunk_size);
}

bool check_vocab_shard(const char* op, const at::Tensor& weight, int64_t vocab_start,
                       int64_t vocab_size) {
  TORCH_CHECK(vocab_size >= 0, op, ": vocab_size must be 0 (weight is the whole vocabulary) or "
              "the full vocabulary size of a vocab-parallel shard; got ", vocab_size);
  if (vocab_size == 0) {
    TORCH_CHECK(vocab_start == 0, op, ": vocab_start must be 0 without vocab_size; got ",
                vocab_start);
    return false;
  }
  TORCH_CHECK(vocab_start >= 0 && vocab_start + weight.size(0) <= vocab_size, op,
              ": a vocab-parallel shard of ", weight.size(0), " rows (weight's V) starting at "
              "vocab_start must lie inside [0, vocab_size = ", vocab_size, "); got vocab_start = ",
              vocab_start);
  return true;
}

Reduction check_flce_fwd_args(const at::Tensor& hidden, const at::Tensor& weight,
                              const at::Tensor& target, const std::optional<at::Tensor>& bias,
                              double label_smoothing, double z_loss, std::optional<double> softcap,
                              const std::string& reduction, int64_t chunk_size, bool compute_grad,
                              int64_t vocab_start, int64_t vocab_size) {
  const char* op = "fused_linear_cross_entropy";
  check_flce_args(op, hidden, weight, target, bias, label_smoothing, z_loss, softcap, chunk_size);
  const Reduction red = parse_reduction(op, reduction);
  TORCH_CHECK(!(compute_grad && red == Reduction::kNone), op,
              ": compute_grad needs reduction 'mean' or 'sum' (a scalar loss)");
  if (check_vocab_shard(op, weight, vocab_start, vocab_size)) {
    TORCH_CHECK(red == Reduction::kNone && !compute_grad, op,
                ": a vocab-parallel shard's forward returns per-row partial statistics: it needs "
                "reduction 'none' and compute_grad false; got reduction '", reduction,
                "', compute_grad ", compute_grad);
  }
  return red;
}

Reduction check_flce_bwd_args(const at::Tensor& grad_loss, const at::Tensor& hidden,
                              const at::Tensor& weight, const at::Tensor& target,
                              const std::optional<at::Tensor>& bias, const at::Tensor& lse,
                              double label_smoothing, double z_loss, std::optional<double> softcap,
                              const std::string& reduction, int64_t chunk_size,
                              int64_t vocab_start, int64_t vocab_size) {
  const char* op = "fused_linear_cross_entropy (backward)";
  check_flce_args(op, hidden, weight, target, bias, label_smoothing, z_loss, softcap, chunk_size);
  check_vocab_shard(op, weight, vocab_start, vocab_size);
  const Reduction red = parse_reduction(op, reduction);
  const int64_t N = hidden.size(0);
  TORCH_CHECK(red == Reduction::kNone ? grad_loss.numel() == N : grad_loss.numel() == 1, op,
              ": grad_loss must have the loss's shape; got ", grad_loss.sizes());
  TORCH_CHECK(grad_loss.device() == hidden.device(), op, ": grad_loss is on ", grad_loss.device(),
              " but hidden is on ", hidden.device());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == N && lse.scalar_type() == at::kFloat, op,
              ": lse must be float32 (N,) with N = ", N, "; got ", lse.scalar_type(), " ",
              lse.sizes());
  TORCH_CHECK(lse.device() == hidden.device(), op, ": lse is on ", lse.device(),
              " but hidden is on ", hidden.device());
  return red;
}

}  // namespace lmk

TORCH_LIBRARY_FRAGMENT(lmkernels, m) {
  // loss: () for mean/sum, (N,) for none; z: the z-loss term inside loss (same reduction), for
  // logging; lse (N,) float32 (0 on ignored rows). With compute_grad (mean/sum only) it also
  // returns d(loss)/d(hidden, weight, bias) for a unit upstream gradient, computed in the same
  // chunk loop; otherwise those three are empty.
  // Vocab-parallel shard (vocab_size > 0: weight holds the classes [vocab_start, vocab_start + V)
  // of vocab_size; targets are global class ids; reduction 'none', no compute_grad): per-row
  // partial statistics of this shard instead, which the shards combine into the loss
  // (lmkernels/distributed/vocab_parallel.py): lse = logsumexp of this shard's logits, loss =
  // -(1 - eps) y_target [target in this shard] - eps sum_j y_j / vocab_size, z = 0; so that
  // loss_r = lse_r + sum over shards of loss + z_loss lse_r^2, with lse_r = logsumexp over shards.
  m.def(
      "fused_linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, "
      "int ignore_index, float label_smoothing, float z_loss, float? softcap, str reduction, "
      "int chunk_size, bool compute_grad, int vocab_start=0, int vocab_size=0, *, "
      "str backend=\"auto\") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Recomputes the logits chunk by chunk from the saved lse. grad_loss: () or (N,) as loss.
  // Returns (grad_hidden, grad_weight, grad_bias); grad_bias is empty without bias. For a
  // vocab-parallel shard (vocab_size > 0) lse is the full vocabulary's and the gradients are
  // this shard's part (grad_hidden: to be summed over the shards).
  m.def(
      "fused_linear_cross_entropy_bwd(Tensor grad_loss, Tensor hidden, Tensor weight, "
      "Tensor target, Tensor? bias, Tensor lse, int ignore_index, float label_smoothing, "
      "float z_loss, float? softcap, str reduction, int chunk_size, int vocab_start=0, "
      "int vocab_size=0, *, str backend=\"auto\") -> (Tensor, Tensor, Tensor)");
}
