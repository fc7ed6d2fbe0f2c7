// Schema and argument checks of torch.ops.lmkernels.fused_adamw_ (CPU kernel: cpu/adamw_cpu.cpp,
// registered for the CPU key; CUDA tensors: lmkernels/ops/adamw.py picks the CUDA C++ kernel
// cuda/adamw_cuda.cu or the Triton launcher lmkernels/triton/adamw.py).
#include "adamw.h"

#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include "checks.h"

namespace lmk {
namespace {
// A parameter passed as its own gradient (or moment) would be read and written at once.
void check_distinct(const char* op, const Name& name, const at::Tensor& t, const Name& pname,
                    const at::Tensor& p) {
  TORCH_CHECK_VALUE(at::get_overlap_status(t, p) == at::MemOverlapStatus::No, op, ": ", name,
                    " shares memory with ", pname, "; each must be its own tensor");
}
}  // namespace

at::Device check_adamw_args(const AdamWArgs& a) {
  const char* op = "fused_adamw_";
  const size_t n = a.params.size();
  check_same_length(op, "params", n, "grads", a.grads.size());
  check_same_length(op, "params", n, "exp_avgs", a.exp_avgs.size());
  check_same_length(op, "params", n, "exp_avg_sqs", a.exp_avg_sqs.size());
  check_same_length(op, "params", n, "state_steps", a.state_steps.size());
  if (a.amsgrad) check_same_length(op, "params", n, "max_exp_avg_sqs", a.max_exp_avg_sqs.size());
  TORCH_CHECK(a.master_params.empty() || a.master_params.size() == n, op,
              ": master_params must be empty or have one tensor per parameter (", n, "); got ",
              a.master_params.size());
  TORCH_CHECK(a.stochastic_rounding_seed < 0 || a.master_params.empty(), op,
              ": stochastic rounding is for parameters without master weights");
  TORCH_CHECK(a.beta1 >= 0 && a.beta1 < 1 && a.beta2 >= 0 && a.beta2 < 1, op,
              ": betas must be in [0, 1); got (", a.beta1, ", ", a.beta2, ")");
  TORCH_CHECK(a.eps >= 0, op, ": eps must be >= 0; got ", a.eps);
  // Written so that NaN fails too. (lr is 0 when lr_tensor carries the rate.)
  TORCH_CHECK_VALUE(a.lr >= 0, op, ": lr must be >= 0; got ", a.lr);
  TORCH_CHECK(a.weight_decay >= 0, op, ": weight_decay must be >= 0; got ", a.weight_decay);
  if (n == 0) return at::Device(at::kCPU);

  const at::Device device = a.params[0].device();
  for (size_t i = 0; i < n; ++i) {
    const Name pname{"params", i};
    const at::Tensor& p = a.params[i];
    check_float_dtype(op, pname, p);
    check_dense_contiguous(op, pname, p);
    TORCH_CHECK(p.device() == device, op, ": all params must be on one device; params[0] is on ",
                device, " but ", pname.str(), " is on ", p.device());
    TORCH_CHECK(!a.grads[i].is_sparse(), op, ": ", Name{"grads", i},
                " is sparse; fused_adamw_ does not support sparse gradients");
    check_like(op, Name{"grads", i}, a.grads[i], pname, p, /*allow_fp32=*/false);
    check_distinct(op, Name{"grads", i}, a.grads[i], pname, p);
    const bool master = !a.master_params.empty();
    if (master) {
      check_like(op, Name{"master_params", i}, a.master_params[i], pname, p, true);
      TORCH_CHECK(a.master_params[i].scalar_type() == at::kFloat, op, ": ",
                  Name{"master_params", i}, " must be float32");
    }
    check_like(op, Name{"exp_avgs", i}, a.exp_avgs[i], pname, p, true);
    check_like(op, Name{"exp_avg_sqs", i}, a.exp_avg_sqs[i], pname, p, true);
    check_distinct(op, Name{"exp_avgs", i}, a.exp_avgs[i], pname, p);
    check_distinct(op, Name{"exp_avg_sqs", i}, a.exp_avg_sqs[i], pname, p);
    TORCH_CHECK(a.exp_avg_sqs[i].scalar_type() == a.exp_avgs[i].scalar_type(), op, ": ",
                Name{"exp_avg_sqs", i}, " and ", Name{"exp_avgs", i},
                " must share a dtype");
    if (a.amsgrad) {
      check_like(op, Name{"max_exp_avg_sqs", i}, a.max_exp_avg_sqs[i], pname, p, true);
      TORCH_CHECK(a.max_exp_avg_sqs[i].scalar_type() == a.exp_avgs[i].scalar_type(), op, ": ",
                  Name{"max_exp_avg_sqs", i}, " must have the dtype of ",
                  Name{"exp_avgs", i});
    }
    check_scalar_f32(op, Name{"state_steps", i}, a.state_steps[i], device);
    // Step 0 divides by 1 - beta^0 = 0 (NaN weights). Read only where it costs no device sync:
    // CUDA step counts are not checked (documented in lmkernels/ops/adamw.py).
    if (a.state_steps[i].is_cpu()) {
      const float step = *a.state_steps[i].const_data_ptr<float>();
      TORCH_CHECK_VALUE(step >= 1, op, ": ", Name{"state_steps", i},
                        " must be >= 1 (the caller increments it before the step, as "
                        "torch.optim does); got ", step);
    }
  }
  if (n > 1) {
    // One kernel instantiation per call: the dtypes must be uniform across the list.
    for (size_t i = 1; i < n; ++i) {
      TORCH_CHECK(a.params[i].scalar_type() == a.params[0].scalar_type() &&
                      a.exp_avgs[i].scalar_type() == a.exp_avgs[0].scalar_type(),
                  op, ": all params (and all exp_avgs) of one call must share a dtype; ",
                  Name{"params", i}, " is ", a.params[i].scalar_type(), " but params[0] is ",
                  a.params[0].scalar_type());
    }
  }
  if (a.lr_tensor) {
    check_scalar_f32(op, Name{"lr_tensor"}, *a.lr_tensor, device);
    if (a.lr_tensor->is_cpu()) {
      const float lr = *a.lr_tensor->const_data_ptr<float>();
      TORCH_CHECK_VALUE(lr >= 0, op, ": lr must be >= 0; got lr_tensor = ", lr);
    }
  }
  if (a.inv_scale) check_scalar_f32(op, Name{"inv_scale"}, *a.inv_scale, device);
  if (a.found_inf) check_scalar_f32(op, Name{"found_inf"}, *a.found_inf, device);
  return device;
}

namespace {
// A sparse tensor anywhere sends the call to the Sparse* keys: answer with the checks' message
// (which names the sparse argument) instead of the dispatcher's "could not run".
void fused_adamw_sparse(LMK_ADAMW_PARAMS, std::string_view /*backend*/) {
  check_adamw_args(LMK_ADAMW_ARGS);
  TORCH_CHECK(false, "fused_adamw_: sparse tensors are not supported");
}
}  // namespace

}  // namespace lmk

TORCH_LIBRARY_FRAGMENT(lmkernels, m) {
  // Mutates params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs and master_params in place.
  // backend: "auto", "cpu", "cuda" or "triton" (lmkernels/ops/_common.py says how it is chosen).
  m.def(
      "fused_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, "
      "Tensor[] state_steps, *, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, bool amsgrad, bool maximize, bool adam_w_mode, "
      "Tensor? lr_tensor=None, Tensor? inv_scale=None, Tensor? found_inf=None, "
      "int stochastic_rounding_seed=-1, str backend=\"auto\") -> ()");
}

TORCH_LIBRARY_IMPL(lmkernels, SparseCPU, m) { m.impl("fused_adamw_", &lmk::fused_adamw_sparse); }
TORCH_LIBRARY_IMPL(lmkernels, SparseCUDA, m) { m.impl("fused_adamw_", &lmk::fused_adamw_sparse); }
