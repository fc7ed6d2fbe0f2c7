// Schemas and argument checks of torch.ops.lmkernels.rms_norm_fwd / add_rms_norm_fwd /
// rms_norm_bwd (CPU kernel: cpu/rms_norm_cpu.cpp; CUDA tensors: lmkernels/ops/rms_norm.py runs
// the Triton launchers of lmkernels/triton/rms_norm.py). Math: lmkernels/reference/rms_norm.py.
#include "rms_norm.h"

#include <torch/library.h>

#include "autograd_fn.h"

#include <cmath>

namespace lmk {

namespace {
bool is_float_type(at::ScalarType d) {
  return d == at::kFloat || d == at::kBFloat16 || d == at::kHalf;
}
}  // namespace

void check_rms_norm_args(const char* op, const at::Tensor& x, const at::Tensor* residual,
                         const at::Tensor& weight, double eps) {
  TORCH_CHECK_VALUE(x.layout() == at::kStrided && weight.layout() == at::kStrided, op,
                    ": x and weight must be dense (strided) tensors; got ", x.layout(), " and ",
                    weight.layout());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, op,
                    ": x must have a non-empty last (hidden) dimension; got shape ", x.sizes());
  TORCH_CHECK_TYPE(is_float_type(x.scalar_type()), op,
                   ": x must be float32, bfloat16 or float16; got ", x.scalar_type());
  const int64_t H = x.size(-1);
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == H, op,
                    ": weight must be 1-D of size H=", H, " (x's last dimension); got shape ",
                    weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
                   op, ": weight must have x's dtype (", x.scalar_type(),
                   ") or float32; got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), op, ": weight is on ", weight.device(),
                    " but x is on ", x.device());
  if (residual != nullptr) {
    TORCH_CHECK_VALUE(residual->layout() == at::kStrided, op,
                      ": residual must be a dense (strided) tensor; got ", residual->layout());
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), op, ": residual must have x's shape ",
                      x.sizes(), "; got ", residual->sizes());
    TORCH_CHECK_TYPE(residual->scalar_type() == x.scalar_type(), op,
                     ": residual must have x's dtype ", x.scalar_type(), "; got ",
                     residual->scalar_type());
    TORCH_CHECK_VALUE(residual->device() == x.device(), op, ": residual is on ",
                      residual->device(), " but x is on ", x.device());
  }
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0; got ",
                    eps);
}

void check_rms_norm_bwd_args(const at::Tensor& grad_out, const at::Tensor& x,
                             const at::Tensor& weight, const at::Tensor& rstd,
                             const std::optional<at::Tensor>& grad_sum) {
  const char* op = "rms_norm_bwd";
  check_rms_norm_args(op, x, nullptr, weight, 0.0);
  TORCH_CHECK_VALUE(grad_out.layout() == at::kStrided && grad_out.sizes() == x.sizes(), op,
                    ": grad_out must be a dense tensor of x's shape ", x.sizes(), "; got ",
                    grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == weight.scalar_type(), op,
                   ": grad_out must have the output's dtype (weight's, ", weight.scalar_type(),
                   "); got ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == x.device(), op, ": grad_out is on ", grad_out.device(),
                    " but x is on ", x.device());
  const int64_t rows = x.numel() / x.size(-1);
  TORCH_CHECK_VALUE(rstd.layout() == at::kStrided && rstd.scalar_type() == at::kFloat &&
                        rstd.numel() == rows && rstd.device() == x.device(),
                    op, ": rstd must be float32 on ", x.device(), " with ", rows,
                    " elements (one per row of x); got ", rstd.scalar_type(), " ", rstd.sizes(),
                    " on ", rstd.device());
  if (grad_sum) {
    TORCH_CHECK_VALUE(grad_sum->layout() == at::kStrided && grad_sum->sizes() == x.sizes() &&
                          grad_sum->scalar_type() == x.scalar_type() &&
                          grad_sum->device() == x.device(),
                      op, ": grad_sum must be like x (", x.scalar_type(), " ", x.sizes(), " on ",
                      x.device(), "); got ", grad_sum->scalar_type(), " ", grad_sum->sizes(),
                      " on ", grad_sum->device());
  }
}

}  // namespace lmk

TORCH_LIBRARY_FRAGMENT(lmkernels, m) {
  // out = weight * (x * rstd).to(x.dtype), rstd = 1 / sqrt(mean(x^2, -1) + eps) (fp32).
  // Returns (out: x's shape, weight's dtype; rstd: x.shape[:-1] float32).
  m.def(
      "rms_norm_fwd(Tensor x, Tensor weight, float eps, *, str backend=\"auto\") "
      "-> (Tensor, Tensor)");
  // sum = (x + residual).to(x.dtype); out = rms_norm(sum). Returns (out, sum, rstd).
  m.def(
      "add_rms_norm_fwd(Tensor x, Tensor residual, Tensor weight, float eps, *, "
      "str backend=\"auto\") -> (Tensor, Tensor, Tensor)");
  // x: the forward's normalized input (add_rms_norm: the sum). grad_sum (optional): gradient
  // flowing into add_rms_norm's returned sum, added to dx. Returns (dx: x's dtype, dweight:
  // weight's dtype).
  m.def(
      "rms_norm_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor rstd, Tensor? grad_sum, *, "
      "str backend=\"auto\") -> (Tensor, Tensor)");
}

namespace lmk {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Autograd in C++ (not torch.library.register_autograd): the Python path costs ~65-150 us of
// interpreter time per forward+backward, as much as the kernels at the trainer's sizes (see
// csrc/swiglu.cpp). Both forwards' backward is the rms_norm_bwd op; rstd is not differentiable.
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_op(const at::Tensor& grad_out, const at::Tensor& x,
                                                   const at::Tensor& weight, const at::Tensor& rstd,
                                                   const std::optional<at::Tensor>& grad_sum,
                                                   const std::string& backend) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const std::optional<at::Tensor>&, c10::string_view)>("rms_norm_bwd");
  return op.call(grad_out, x, weight, rstd, grad_sum, backend);
}

struct RmsNormFunction : torch::autograd::Function<RmsNormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               double eps, const std::string& backend) {
    static const auto fwd = op_handle<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, double, c10::string_view)>("rms_norm_fwd");
    at::Tensor out, rstd;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out, rstd) = fwd.call(x, weight, eps, backend);
    }
    ctx->mark_non_differentiable({rstd});
    ctx->save_for_backward({x, weight, rstd});
    ctx->saved_data["backend"] = backend;
    return {out, rstd};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();  // x, weight, rstd
    auto [dx, dweight] = rms_norm_bwd_op(grads[0], saved[0], saved[1], saved[2], std::nullopt,
                                         ctx->saved_data["backend"].toStringRef());
    return {dx, dweight, at::Tensor(), at::Tensor()};
  }
};

struct AddRmsNormFunction : torch::autograd::Function<AddRmsNormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& residual,
                               const at::Tensor& weight, double eps, const std::string& backend) {
    static const auto fwd = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, double, c10::string_view)>(
        "add_rms_norm_fwd");
    at::Tensor out, sum, rstd;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out, sum, rstd) = fwd.call(x, residual, weight, eps, backend);
    }
    ctx->mark_non_differentiable({rstd});
    ctx->save_for_backward({sum, weight, rstd});  // the sum is what was normalized
    ctx->saved_data["backend"] = backend;
    // An unused output's gradient stays undefined: no zeros are made for a sum nobody reads
    // (the last layer's), it is passed to rms_norm_bwd as None.
    ctx->set_materialize_grads(false);
    return {out, sum, rstd};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();  // sum, weight, rstd
    const at::Tensor& sum = saved[0];
    const at::Tensor grad_out = grads[0].defined()
        ? grads[0] : at::zeros(sum.sizes(), sum.options().dtype(saved[1].scalar_type()));
    std::optional<at::Tensor> grad_sum;
    if (grads[1].defined()) grad_sum = grads[1];
    auto [dsum, dweight] = rms_norm_bwd_op(grad_out, sum, saved[1], saved[2], grad_sum,
                                           ctx->saved_data["backend"].toStringRef());
    return {dsum, dsum, dweight, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                         double eps, c10::string_view backend) {
  auto outs = RmsNormFunction::apply(x, weight, eps, std::string(backend));
  return {outs[0], outs[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd_autograd(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps,
    c10::string_view backend) {
  auto outs = AddRmsNormFunction::apply(x, residual, weight, eps, std::string(backend));
  return {outs[0], outs[1], outs[2]};
}

}  // namespace
}  // namespace lmk

TORCH_LIBRARY_IMPL(lmkernels, Autograd, m) {
  m.impl("rms_norm_fwd", &lmk::rms_norm_fwd_autograd);
  m.impl("add_rms_norm_fwd", &lmk::add_rms_norm_fwd_autograd);
}
