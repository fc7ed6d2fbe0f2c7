// The pybind11 entry of lmkernels._C. The ops themselves register through
// TORCH_LIBRARY_FRAGMENT(lmkernels, ...) in their own files (one schema per op, csrc/<op>.cpp),
// so loading this module is what makes torch.ops.lmkernels.* exist. Besides build_info it
// exposes what the ops' Python CUDA entries (lmkernels/ops/<op>.py) call: the argument checks
// for the Triton path and, in a CUDA build, the CUDA C++ kernels. These are plain functions,
// not ops: the op (and its backend argument) is the public contract.
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "adamw.h"
#include "attention.h"
#include "bucket.h"
#include "fused_linear_cross_entropy.h"

#define LMK_STR2(x) #x
#define LMK_STR(x) LMK_STR2(x)

namespace {

using Tensors = std::vector<at::Tensor>;
using OptTensor = std::optional<at::Tensor>;

pybind11::dict build_info() {
  pybind11::dict info;
  pybind11::list backends;
  backends.append("cpu");
#ifdef LMK_WITH_CUDA
  backends.append("cuda");
#endif
  info["compiled_backends"] = backends;
  info["simd"] = LMK_STR(CPU_CAPABILITY);
#ifdef LMK_WITH_CUDA
  info["cuda_archs"] = std::string(LMK_STR(LMK_CUDA_ARCHS));
#else
  info["cuda_archs"] = std::string();
#endif
  info["torch_version"] = std::string(TORCH_VERSION);
  info["openmp_threads"] = at::get_num_threads();
  return info;
}

// fused_adamw_'s arguments in schema order (without backend), as one AdamWArgs for `fn`.
template <typename Fn>
auto with_adamw_args(Fn fn) {
  return [fn](const Tensors& params, const Tensors& grads, const Tensors& exp_avgs,
              const Tensors& exp_avg_sqs, const Tensors& max_exp_avg_sqs,
              const Tensors& master_params, const Tensors& state_steps, double lr, double beta1,
              double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
              bool adam_w_mode, const OptTensor& lr_tensor, const OptTensor& inv_scale,
              const OptTensor& found_inf, int64_t stochastic_rounding_seed) {
    fn(lmk::AdamWArgs{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params,
                      state_steps, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                      adam_w_mode, lr_tensor, inv_scale, found_inf, stochastic_rounding_seed});
  };
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lmkernels compiled kernels; the ops live under torch.ops.lmkernels";
  m.def("build_info", &build_info, "What this build of lmkernels._C contains");

  // Argument checks, for the Triton path (the C++ kernels call them themselves).
  m.def("check_fused_adamw_args",
        with_adamw_args([](const lmk::AdamWArgs& a) { lmk::check_adamw_args(a); }),
        "fused_adamw_'s argument checks (schema order, without backend)");
  // softcap defaults to 0.0 (off), as in the schemas.
  m.def(
      "check_attention_args",
      [](const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
         int64_t window_left, int64_t window_right, double softcap) {
        lmk::check_attention_args("attention_fwd", query, key, value, window_left, window_right,
                                  softcap);
      },
      "attention_fwd's argument checks (query, key, value, window_left, window_right, softcap)",
      pybind11::arg("query"), pybind11::arg("key"), pybind11::arg("value"),
      pybind11::arg("window_left"), pybind11::arg("window_right"),
      pybind11::arg("softcap") = 0.0);
  m.def("check_attention_bwd_args", &lmk::check_attention_bwd_args,
        "attention_bwd's argument checks (grad_out, query, key, value, out, lse, grad_lse, "
        "window_left, window_right, softcap)",
        pybind11::arg("grad_out"), pybind11::arg("query"), pybind11::arg("key"),
        pybind11::arg("value"), pybind11::arg("out"), pybind11::arg("lse"),
        pybind11::arg("grad_lse"), pybind11::arg("window_left"), pybind11::arg("window_right"),
        pybind11::arg("softcap") = 0.0);
  // The varlen checks read cu_seqlens' values: one device-to-host copy per call on CUDA.
  m.def(
      "check_attention_varlen_args",
      [](const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
         const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
         int64_t max_seqlen_k, int64_t window_left, int64_t window_right, double softcap) {
        lmk::check_attention_varlen_args("attention_varlen_fwd", query, key, value, cu_seqlens_q,
                                         cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left,
                                         window_right, softcap);
      },
      "attention_varlen_fwd's argument checks (schema order, without scale, is_causal and "
      "backend)");
  m.def(
      "check_attention_varlen_bwd_args",
      [](const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
         const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
         const OptTensor& grad_lse, const at::Tensor& cu_seqlens_q,
         const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
         int64_t window_left, int64_t window_right, double softcap) {
        lmk::check_attention_varlen_bwd_args(grad_out, query, key, value, out, lse, grad_lse,
                                             cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                             max_seqlen_k, window_left, window_right, softcap);
      },
      "attention_varlen_bwd's argument checks (schema order, without scale, is_causal, "
      "deterministic and backend)");
  m.def(
      "check_flce_fwd_args",
      [](const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
         const OptTensor& bias, double label_smoothing, double z_loss,
         std::optional<double> softcap, const std::string& reduction, int64_t chunk_size,
         bool compute_grad) {
        lmk::check_flce_fwd_args(hidden, weight, target, bias, label_smoothing, z_loss, softcap,
                                 reduction, chunk_size, compute_grad);
      },
      "fused_linear_cross_entropy_fwd's argument checks (schema order, without ignore_index "
      "and backend)");
  m.def(
      "check_flce_bwd_args",
      [](const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
         const at::Tensor& target, const OptTensor& bias, const at::Tensor& lse,
         double label_smoothing, double z_loss, std::optional<double> softcap,
         const std::string& reduction, int64_t chunk_size) {
        lmk::check_flce_bwd_args(grad_loss, hidden, weight, target, bias, lse, label_smoothing,
                                 z_loss, softcap, reduction, chunk_size);
      },
      "fused_linear_cross_entropy_bwd's argument checks (schema order, without ignore_index "
      "and backend)");

#ifdef LMK_WITH_CUDA
  // The CUDA C++ kernels, for the ops' CUDA backend tables (each checks its arguments).
  m.def("fused_adamw_cuda", with_adamw_args(&lmk::fused_adamw_cuda),
        "fused_adamw_'s CUDA C++ kernel (schema order, without backend)");
  m.def(
      "bucket_pack_cuda",
      [](const Tensors& tensors, const at::Tensor& flat, double scale) {
        lmk::bucket_pack_cuda(tensors, flat, scale);
      },
      "bucket_pack_'s CUDA kernel");
  m.def(
      "bucket_unpack_cuda",
      [](const at::Tensor& flat, const Tensors& tensors, double scale) {
        lmk::bucket_unpack_cuda(flat, tensors, scale);
      },
      "bucket_unpack_'s CUDA kernel");
  m.def(
      "bucket_scale_cuda",
      [](const Tensors& tensors, double scale) { lmk::bucket_scale_cuda(tensors, scale); },
      "bucket_scale_'s CUDA kernel");
#endif
}
