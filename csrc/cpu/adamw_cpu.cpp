// CPU kernel of fused_adamw_: one at::parallel_for over (tensor, chunk) work items of all
// tensors, so a list of many small tensors costs one parallel region instead of one each
// (torch's fused CPU AdamW pays ~19 us per tensor for that). Math in fp32 with at::vec;
// bf16/fp16 storage is staged through small fp32 tiles.
//
// Per element (g = grad * inv_scale, negated if maximize; Adam-L2 adds wd * p to g):
//   p  *= 1 - lr * wd                        (AdamW only)
//   m   = m + (1 - beta1) * (g - m)
//   v   = beta2 * v + (1 - beta2) * g^2       (vmax = max(vmax, v) with amsgrad; use vmax)
//   p  -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// computed as (lr sqrt(1 - beta2^t) / (1 - beta1^t)) * m / (sqrt(v) + eps sqrt(1 - beta2^t)).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../adamw.h"
#include "../checks.h"

namespace lmk {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 16384;  // elements per work item: 64 KB of fp32, L2-friendly
constexpr int64_t kTile = 256;     // fp32 staging tile for bf16/fp16 storage (stays in L1)

struct Hyper {
  // 1 - beta is formed in double on the host: 1.f - 0.9f is 2e-7 off 0.1, which moves m by ulps.
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, inv_scale;
  bool amsgrad, maximize, adam_w_mode;
};

// The update on fp32 arrays; `vmax` is null unless amsgrad.
void adam_math(float* p, const float* g, float* m, float* v, float* vmax, int64_t n,
               const Hyper& h, float step_size, float eps_hat) {
  const float decay = h.adam_w_mode ? 1.f - h.lr * h.weight_decay : 1.f;
  const float l2 = h.adam_w_mode ? 0.f : h.weight_decay;
  const float gsign = h.maximize ? -h.inv_scale : h.inv_scale;
  const Vec vdecay(decay), vl2(l2), vgs(gsign), vb1c(h.one_minus_beta1), vb2(h.beta2),
      vb2c(h.one_minus_beta2), veps(eps_hat), vstep(-step_size);
  int64_t i = 0;
  auto body = [&](int64_t off, int64_t cnt) {
    Vec pv = Vec::loadu(p + off, cnt);
    Vec gv = Vec::loadu(g + off, cnt) * vgs;
    if (l2 != 0.f) gv = at::vec::fmadd(pv, vl2, gv);
    pv = pv * vdecay;
    Vec mv = Vec::loadu(m + off, cnt);
    mv = at::vec::fmadd(gv - mv, vb1c, mv);
    Vec vv = at::vec::fmadd(vb2c * gv, gv, Vec::loadu(v + off, cnt) * vb2);
    Vec vden = vv;
    if (vmax != nullptr) {
      vden = at::vec::maximum(Vec::loadu(vmax + off, cnt), vv);
      vden.store(vmax + off, cnt);
    }
    Vec denom = vden.sqrt() + veps;
    pv = at::vec::fmadd(vstep, mv / denom, pv);
    pv.store(p + off, cnt);
    mv.store(m + off, cnt);
    vv.store(v + off, cnt);
  };
  for (; i + Vec::size() <= n; i += Vec::size()) body(i, Vec::size());
  if (i < n) body(i, n - i);
}

// Rounds fp32 to bf16 stochastically: adding 16 random low bits before truncation rounds
// up with probability equal to the discarded fraction (unbiased in expectation).
inline c10::BFloat16 round_stochastic(float x, uint32_t rnd) {
  if (!std::isfinite(x)) return c10::BFloat16(x);
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits += rnd >> 16;  // 16 random bits (the hash's high half)
  return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
}

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

struct Work {
  int64_t tensor, begin, end;
};

template <typename param_t, typename state_t>
void run(const AdamWArgs& a, const Hyper& h, double lr) {
  const size_t n = a.params.size();
  const bool master = !a.master_params.empty();
  const bool sr = a.stochastic_rounding_seed >= 0;
  std::vector<float> step_size(n), eps_hat(n);
  std::vector<Work> work;
  double last_step = -1.0;  // the tensors of a group usually share a step count: pow once
  for (size_t t = 0; t < n; ++t) {
    const double step = *static_cast<const float*>(a.state_steps[t].const_data_ptr());
    if (step != last_step) {
      // Bias corrections in double from the double betas: 1 - beta2^t is a small difference,
      // and float(0.999) alone moves it by 1e-5 relative.
      // lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps) = (lr * sqrt(bc2) / bc1) * m / (sqrt(v) + eps * sqrt(bc2)):
      // both factors rounded once from double, one division per element fewer.
      const double bc2_sqrt = std::sqrt(1.0 - std::pow(a.beta2, step));
      step_size[t] = static_cast<float>(lr * bc2_sqrt / (1.0 - std::pow(a.beta1, step)));
      eps_hat[t] = static_cast<float>(a.eps * bc2_sqrt);
      last_step = step;
    } else {
      step_size[t] = step_size[t - 1];
      eps_hat[t] = eps_hat[t - 1];
    }
    const int64_t numel = a.params[t].numel();
    for (int64_t b = 0; b < numel; b += kChunk) work.push_back({int64_t(t), b, std::min(numel, b + kChunk)});
  }
  at::parallel_for(0, int64_t(work.size()), 1, [&](int64_t w0, int64_t w1) {
    float pbuf[kTile], gbuf[kTile], mbuf[kTile], vbuf[kTile], xbuf[kTile];
    for (int64_t w = w0; w < w1; ++w) {
      const Work& job = work[w];
      const size_t t = job.tensor;
      // Untyped data_ptr(): check_adamw_args checked the dtypes, and the typed accessor's
      // dtype check per call is measurable for 1000s of small tensors.
      param_t* P = static_cast<param_t*>(a.params[t].data_ptr());
      const param_t* G = static_cast<const param_t*>(a.grads[t].const_data_ptr());
      state_t* M = static_cast<state_t*>(a.exp_avgs[t].data_ptr());
      state_t* V = static_cast<state_t*>(a.exp_avg_sqs[t].data_ptr());
      state_t* X = a.amsgrad ? static_cast<state_t*>(a.max_exp_avg_sqs[t].data_ptr()) : nullptr;
      float* W = master ? static_cast<float*>(a.master_params[t].data_ptr()) : nullptr;
      if constexpr (std::is_same_v<param_t, float> && std::is_same_v<state_t, float>) {
        // fp32 everywhere: update the storage directly, no staging.
        const int64_t b = job.begin, len = job.end - job.begin;
        adam_math(P + b, G + b, M + b, V + b, X ? X + b : nullptr, len, h, step_size[t],
                  eps_hat[t]);
        continue;
      }
      for (int64_t b = job.begin; b < job.end; b += kTile) {
        const int64_t len = std::min(kTile, job.end - b);
        float* p = W ? W + b : pbuf;
        if (!W) to_float(P + b, pbuf, len);
        to_float(G + b, gbuf, len);
        float* m = mbuf;
        float* v = vbuf;
        float* x = X ? xbuf : nullptr;
        if constexpr (std::is_same_v<state_t, float>) {
          m = M + b;
          v = V + b;
          x = X ? X + b : nullptr;
        } else {
          to_float(M + b, mbuf, len);
          to_float(V + b, vbuf, len);
          if (X) to_float(X + b, xbuf, len);
        }
        adam_math(p, gbuf, m, v, x, len, h, step_size[t], eps_hat[t]);
        if constexpr (!std::is_same_v<state_t, float>) {
          from_float(mbuf, M + b, len);
          from_float(vbuf, V + b, len);
          if (X) from_float(xbuf, X + b, len);
        }
        if constexpr (std::is_same_v<param_t, c10::BFloat16>) {
          if (sr) {
            const uint32_t seed = static_cast<uint32_t>(a.stochastic_rounding_seed);
            for (int64_t j = 0; j < len; ++j)
              P[b + j] = round_stochastic(p[j], sr_hash(seed, uint32_t(t), uint32_t(b + j)));
            continue;
          }
        }
        from_float(p, P + b, len);
      }
    }
  });
}

// The kernel proper, on arguments check_adamw_args accepted (the op and FusedAdamWCpuPlan).
void adamw_cpu_kernel(const AdamWArgs& a) {
  if (a.params.empty()) return;
  TORCH_CHECK(a.params[0].is_cpu(), "fused_adamw_ (CPU kernel): params must be CPU tensors");
  // A GradScaler found inf/NaN gradients: the step changes nothing.
  if (a.found_inf && *a.found_inf->const_data_ptr<float>() != 0.f) return;
  const double lr_value = a.lr_tensor ? double(*a.lr_tensor->const_data_ptr<float>()) : a.lr;
  Hyper h{static_cast<float>(lr_value),
          float(a.beta1), float(a.beta2), float(1.0 - a.beta1), float(1.0 - a.beta2), float(a.eps),
          float(a.weight_decay),
          a.inv_scale ? *a.inv_scale->const_data_ptr<float>() : 1.f, a.amsgrad, a.maximize,
          a.adam_w_mode};
  const bool state_f32 = a.exp_avgs[0].scalar_type() == at::kFloat;
  switch (a.params[0].scalar_type()) {
    case at::kFloat: return run<float, float>(a, h, lr_value);
    case at::kBFloat16:
      return state_f32 ? run<c10::BFloat16, float>(a, h, lr_value) : run<c10::BFloat16, c10::BFloat16>(a, h, lr_value);
    case at::kHalf:
      return state_f32 ? run<c10::Half, float>(a, h, lr_value) : run<c10::Half, c10::Half>(a, h, lr_value);
    default: TORCH_CHECK(false, "unreachable: dtype checked above");
  }
}

void fused_adamw_cpu(LMK_ADAMW_PARAMS) {
  const AdamWArgs a = LMK_ADAMW_ARGS;
  check_adamw_args(a);
  adamw_cpu_kernel(a);
}


// --- FusedAdamWCpuPlan: a parameter group's CPU tensors, held across steps -------------------
// For many small tensors the per-call cost of fused_adamw_ (lists of n tensors through Python,
// the dispatcher and the boxing, every step) outweighs the maths: 1000 tensors of 1000 elements
// spent ~4 of 5.7 ms there (bench/results/adamw-cpu.md). lmkernels.optim.FusedAdamW builds one
// plan per group and kind of tensor and re-builds it when the tensors change (a state tensor
// replaced, a param added, a param without state getting a grad); a step passes only the
// hyperparameters.
// Every step still reads each param's current grad, increments the step counts here, and runs
// the op's full argument checks (check_adamw_args, well under a microsecond per tensor), so a
// step is checked exactly as a call of the op would be.
class FusedAdamWCpuPlan : public torch::CustomClassHolder {
 public:
  // steps: float32 [n] on the CPU; FusedAdamW's state[p]["step"] are 0-d views of it.
  FusedAdamWCpuPlan(std::vector<at::Tensor> params, std::vector<at::Tensor> exp_avgs,
                    std::vector<at::Tensor> exp_avg_sqs, std::vector<at::Tensor> max_exp_avg_sqs,
                    std::vector<at::Tensor> master_params, at::Tensor steps)
      : params_(std::move(params)), exp_avgs_(std::move(exp_avgs)),
        exp_avg_sqs_(std::move(exp_avg_sqs)), max_exp_avg_sqs_(std::move(max_exp_avg_sqs)),
        master_params_(std::move(master_params)), steps_(std::move(steps)) {
    const char* op = "FusedAdamWCpuPlan";
    const size_t n = params_.size();
    check_same_length(op, "params", n, "exp_avgs", exp_avgs_.size());
    check_same_length(op, "params", n, "exp_avg_sqs", exp_avg_sqs_.size());
    TORCH_CHECK_VALUE(max_exp_avg_sqs_.empty() || max_exp_avg_sqs_.size() == n, op,
                      ": max_exp_avg_sqs must be empty or have one tensor per parameter (", n,
                      "); got ", max_exp_avg_sqs_.size());
    TORCH_CHECK_VALUE(master_params_.empty() || master_params_.size() == n, op,
                      ": master_params must be empty or have one tensor per parameter (", n,
                      "); got ", master_params_.size());
    TORCH_CHECK_VALUE(steps_.is_cpu() && steps_.scalar_type() == at::kFloat && steps_.dim() == 1 &&
                          steps_.is_contiguous() && steps_.numel() == int64_t(n),
                      op, ": steps must be a contiguous float32 CPU vector of ", n,
                      " step counts; got ", steps_.scalar_type(), " ", steps_.sizes(), " on ",
                      steps_.device());
    step_views_.reserve(n);
    for (size_t i = 0; i < n; ++i) step_views_.push_back(steps_.select(0, int64_t(i)));
  }

  // One step of every planned param that has a grad. Returns how many tensors were stepped (0
  // when found_inf is set: a skipped step does not count).
  int64_t step(double lr, double beta1, double beta2, double eps, double weight_decay,
               bool amsgrad, bool maximize, bool adam_w_mode,
               const std::optional<at::Tensor>& lr_tensor,
               const std::optional<at::Tensor>& inv_scale,
               const std::optional<at::Tensor>& found_inf, int64_t stochastic_rounding_seed) {
    const size_t n = params_.size();
    grads_.clear();
    stepped_.clear();
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& g = params_[i].grad();
      if (g.defined()) stepped_.push_back(int64_t(i));
      grads_.push_back(g);
    }
    // Usually every param has a grad and the plan's own lists are the call's; otherwise the
    // call gets the sublists of those that do (a param without a grad is skipped, as in torch).
    const bool all = stepped_.size() == n;
    if (!all) take_sublists();
    const auto pick = [&](const std::vector<at::Tensor>& full, const std::vector<at::Tensor>& sub) {
      return all ? at::TensorList(full) : at::TensorList(sub);
    };
    const AdamWArgs a{pick(params_, sub_.params), pick(grads_, sub_.grads),
                      pick(exp_avgs_, sub_.exp_avgs), pick(exp_avg_sqs_, sub_.exp_avg_sqs),
                      pick(max_exp_avg_sqs_, sub_.max_exp_avg_sqs),
                      pick(master_params_, sub_.master_params), pick(step_views_, sub_.steps),
                      lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, adam_w_mode,
                      lr_tensor, inv_scale, found_inf, stochastic_rounding_seed};
    float* count = steps_.data_ptr<float>();
    for (int64_t i : stepped_) count[i] += 1.f;  // before the checks: they want step >= 1
    const auto undo = [&] {
      for (int64_t i : stepped_) count[i] -= 1.f;
      release();
    };
    try {
      check_adamw_args(a);
    } catch (...) {
      undo();
      throw;
    }
    if (found_inf && *found_inf->const_data_ptr<float>() != 0.f) {
      undo();
      return 0;
    }
    adamw_cpu_kernel(a);
    const int64_t stepped = int64_t(stepped_.size());
    release();
    return stepped;
  }

 private:
  struct Lists {
    std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params,
        steps;
  };

  void take_sublists() {
    sub_ = Lists{};
    for (int64_t i : stepped_) {
      sub_.params.push_back(params_[i]);
      sub_.grads.push_back(grads_[i]);
      sub_.exp_avgs.push_back(exp_avgs_[i]);
      sub_.exp_avg_sqs.push_back(exp_avg_sqs_[i]);
      if (!max_exp_avg_sqs_.empty()) sub_.max_exp_avg_sqs.push_back(max_exp_avg_sqs_[i]);
      if (!master_params_.empty()) sub_.master_params.push_back(master_params_[i]);
      sub_.steps.push_back(step_views_[i]);
    }
  }

  // Drops this step's references to the grads: zero_grad(set_to_none=True) must free them.
  void release() {
    grads_.clear();
    sub_ = Lists{};
  }

  std::vector<at::Tensor> params_, exp_avgs_, exp_avg_sqs_, max_exp_avg_sqs_, master_params_;
  at::Tensor steps_;
  std::vector<at::Tensor> step_views_;
  std::vector<at::Tensor> grads_;  // this step's, released after it
  std::vector<int64_t> stepped_;
  Lists sub_;
};

}  // namespace
}  // namespace lmk

namespace lmk {
namespace {
// The op's CPU entry: the schema's trailing backend must name this kernel (checks.h).
void fused_adamw_cpu_op(LMK_ADAMW_PARAMS, std::string_view backend) {
  check_cpu_backend("fused_adamw_", backend, "lmkernels.triton.adamw.fused_adamw");
  fused_adamw_cpu(LMK_ADAMW_NAMES);
}
}  // namespace
}  // namespace lmk

TORCH_LIBRARY_IMPL(lmkernels, CPU, m) { m.impl("fused_adamw_", &lmk::fused_adamw_cpu_op); }

TORCH_LIBRARY_FRAGMENT(lmkernels, m) {
  m.class_<lmk::FusedAdamWCpuPlan>("FusedAdamWCpuPlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>())
      .def("step", &lmk::FusedAdamWCpuPlan::step);
}
