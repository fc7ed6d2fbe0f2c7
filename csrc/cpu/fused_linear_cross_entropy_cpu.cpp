// CPU kernels of fused_linear_cross_entropy_fwd / _bwd: the LM head and the cross-entropy
// chunk by chunk over tokens, so only C x V logits (C = chunk rows) ever exist.
//
// Per chunk of C rows (GEMMs through at::mm / at::addmm on fp32 copies of the chunk):
//   X  = h_c W^T + b                                            (C x V, fp32)
//   y  = softcap * tanh(X / softcap)          (or y = X)        in place
//   lse = max(y) + log sum exp(y - max)
//   loss_r = (1 - eps)(lse - y_t) + eps (lse - mean_j y_j) + z lse^2      (0 on ignored rows)
//   dy_j = s_r (p_j - eps / V - (1 - eps)[j == t]) + s_r 2 z lse p_j,  p = exp(y - lse)
//   dX = dy (1 - (y / softcap)^2)             (or dX = dy)      in place over X
//   dh_c = dX W,  dW += dX^T h_c,  db += colsum dX               (GEMMs)
// s_r is the row's share of the upstream gradient: 1/n_valid (mean), 1 (sum), or grad_loss[r]
// (none, backward only). The forward computes the gradients in its own chunk loop when asked
// (3 GEMMs in all, as eager's forward + backward) instead of recomputing X in the backward
// (4 GEMMs); bench/bench_flce.py measures both.
// A vocab-parallel shard (vocab_size > 0) runs the same loop on its V columns: t is then a
// global class id (no one-hot term when another shard holds it), eps / vocab_size spreads the
// smoothing, and its forward stores partial statistics (LossOptions::partial).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <tuple>

#include "../checks.h"
#include "../fused_linear_cross_entropy.h"

namespace lmk {
namespace {

using Vec = at::vec::Vectorized<float>;

struct LossOptions {
  int64_t ignore_index;
  float eps;       // label smoothing
  float z;         // z-loss coefficient
  float softcap;   // 0: none
  // A vocab-parallel shard holds the classes [vocab_start, vocab_start + V) of vocab_size (the
  // whole vocabulary: 0 and V). The smoothing's uniform part is eps / vocab_size per class.
  int64_t vocab_start;
  double vocab_size;
  bool partial;    // shard forward: per-row partial statistics (see the schema's comment)
};

// NaN-propagating max (a NaN logit makes the loss NaN, as in PyTorch).
inline float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

// y = softcap * tanh(x / softcap) in place (when softcap > 0); returns max(y).
float softcap_and_max(float* x, int64_t V, float softcap) {
  Vec vmax(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  if (softcap > 0.f) {
    const Vec c(softcap), inv_c(1.f / softcap);
    for (; j + Vec::size() <= V; j += Vec::size()) {
      Vec y = c * (Vec::loadu(x + j) * inv_c).tanh();
      y.store(x + j);
      vmax = at::vec::maximum(vmax, y);
    }
    for (int64_t k = j; k < V; ++k) x[k] = softcap * std::tanh(x[k] / softcap);
  } else {
    for (; j + Vec::size() <= V; j += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(x + j));
  }
  float m = at::vec::vec_reduce_all<float>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  for (; j < V; ++j) m = nan_max(x[j], m);
  return m;
}

// (sum_j exp(y_j - m), sum_j y_j), accumulated in fp32 lanes then double.
std::pair<double, double> sum_exp_and_sum(const float* y, int64_t V, float m) {
  const Vec vm(m);
  Vec vs(0.f), vy(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= V; j += Vec::size()) {
    Vec v = Vec::loadu(y + j);
    vs = vs + (v - vm).exp();
    vy = vy + v;
  }
  auto add = [](Vec& a, Vec& b) { return a + b; };
  double s = at::vec::vec_reduce_all<float>(add, vs), sy = at::vec::vec_reduce_all<float>(add, vy);
  for (; j < V; ++j) {
    s += std::exp(y[j] - m);
    sy += y[j];
  }
  return {s, sy};
}

// Overwrites y with d(loss)/dX for one valid row (see the header comment), as
// (p - q) s + p c with q the smoothed one-hot target (eps / V, and 1 - eps + eps / V at the
// target, formed in double: exactly 1 when V = 1; V = o.vocab_size, the whole vocabulary's) and
// c = 2 z lse s; p - q first keeps the cancellation near p = q as exact as in PyTorch.
// t: the target's column in y, or outside [0, V) when another vocab-parallel shard holds it.
void row_grad(float* y, int64_t V, int64_t t, float lse, float scale, const LossOptions& o) {
  const float c = scale * 2.f * o.z * lse;
  const float q = float(double(o.eps) / o.vocab_size);
  const float q_t = float(1.0 - double(o.eps) + double(o.eps) / o.vocab_size);
  const bool here = t >= 0 && t < V;
  const float yt = here ? y[t] : 0.f;
  const float pt = std::exp(yt - lse);
  float dt = (pt - q_t) * scale + pt * c;
  const Vec vs(scale), vc(c), vq(q), vlse(lse);
  int64_t j = 0;
  if (o.softcap > 0.f) {
    const Vec one(1.f), inv_c(1.f / o.softcap);
    for (; j + Vec::size() <= V; j += Vec::size()) {
      Vec v = Vec::loadu(y + j);
      Vec p = (v - vlse).exp();
      Vec r = v * inv_c;
      (((p - vq) * vs + p * vc) * (one - r * r)).store(y + j);
    }
    for (; j < V; ++j) {
      const float p = std::exp(y[j] - lse), r = y[j] / o.softcap;
      y[j] = ((p - q) * scale + p * c) * (1.f - r * r);
    }
    const float r = yt / o.softcap;
    dt *= 1.f - r * r;
  } else {
    for (; j + Vec::size() <= V; j += Vec::size()) {
      Vec p = (Vec::loadu(y + j) - vlse).exp();
      ((p - vq) * vs + p * vc).store(y + j);
    }
    for (; j < V; ++j) {
      const float p = std::exp(y[j] - lse);
      y[j] = (p - q) * scale + p * c;
    }
  }
  if (here) y[t] = dt;
}

int64_t default_chunk_rows(int64_t N, int64_t V) {
  // 32M logits (128 MB fp32) per chunk: 1024 rows at V = 32K. Each chunk reads and writes all
  // of dW (V x H fp32) in its addmm, so fewer, larger chunks cut that traffic (256-row chunks:
  // fused 0.93x eager at N=4096, H=1024, V=32768 on a loaded 2-core Xeon); the chunk is still
  // 1/4 of eager's N x V logits there. Same size, one run (bench_flce.py --chunks 512,2048, 5
  // reps, 2-core Xeon under load): 512 rows 1.05x, 1024 1.14x, 2048 1.11x eager; the GEMMs run
  // at eager's rate, the gain is the row loop (0.6 s vs eager's 2.7 s of softmax and fill in a
  // profile). LMK_FLCE_CHUNK=rows overrides.
  static const char* env = std::getenv("LMK_FLCE_CHUNK");
  int64_t c = env != nullptr ? std::atoll(env) : (int64_t(32) << 20) / V;
  return std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(c, 16), N));
}

// V: the whole vocabulary's size (targets are global class ids in a vocab-parallel shard too).
void check_targets(const char* op, const at::Tensor& target, int64_t V, int64_t ignore_index) {
  const int64_t* t = target.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < target.numel(); ++r) {
    TORCH_CHECK(t[r] == ignore_index || (t[r] >= 0 && t[r] < V), op, ": target[", r, "] = ", t[r],
                " is out of range for V = ", V, " classes (and is not ignore_index = ",
                ignore_index, ")");
  }
}

struct Outputs {
  at::Tensor loss_rows, z_rows, lse;   // (N,) fp32
  at::Tensor grad_hidden, grad_weight, grad_bias;  // fp32 (N, H), (V, H), (V,) or undefined
};

// The chunk loop shared by the forward (have_lse = false: computes lse, losses, and gradients
// when row_scale is defined) and the backward (have_lse = true: gradients from the saved lse).
Outputs chunk_loop(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                   const std::optional<at::Tensor>& bias, const LossOptions& o,
                   int64_t chunk_size, const at::Tensor& row_scale, const at::Tensor& saved_lse) {
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const bool want_grad = row_scale.defined(), have_lse = saved_lse.defined();
  const at::Tensor w = weight.to(at::kFloat).contiguous();  // no copy for contiguous fp32
  const at::Tensor wt = w.t();
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const auto f32 = hidden.options().dtype(at::kFloat);
  Outputs out;
  out.lse = have_lse ? saved_lse.contiguous() : at::zeros({N}, f32);
  if (!have_lse) {
    out.loss_rows = at::zeros({N}, f32);
    out.z_rows = at::zeros({N}, f32);
  }
  if (want_grad) {
    out.grad_hidden = at::empty({N, H}, f32);
    // written by the first chunk's GEMM (beta = 0): no separate zero-fill pass over V x H
    out.grad_weight = N > 0 ? at::empty({V, H}, f32) : at::zeros({V, H}, f32);
    if (bias.has_value()) out.grad_bias = at::zeros({V}, f32);
  }
  const int64_t C = chunk_size > 0 ? std::min(chunk_size, std::max<int64_t>(N, 1))
                                   : default_chunk_rows(N, V);
  at::Tensor buf = at::empty({std::min(C, N), V}, f32);
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  float* lse = out.lse.data_ptr<float>();
  float* loss = have_lse ? nullptr : out.loss_rows.data_ptr<float>();
  float* zr = have_lse ? nullptr : out.z_rows.data_ptr<float>();
  const float* scale = want_grad ? row_scale.const_data_ptr<float>() : nullptr;

  for (int64_t n0 = 0; n0 < N; n0 += C) {
    const int64_t c = std::min(C, N - n0);
    at::Tensor x = buf.narrow(0, 0, c);
    const at::Tensor h = hidden.narrow(0, n0, c).to(at::kFloat);
    if (b.defined()) {
      at::addmm_out(x, b, h, wt);
    } else {
      at::mm_out(x, h, wt);
    }
    float* X = x.data_ptr<float>();
    at::parallel_for(0, c, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t r = n0 + i;
        float* y = X + i * V;
        if (tgt[r] == o.ignore_index) {  // no loss, no gradient
          if (want_grad) std::fill(y, y + V, 0.f);
          continue;
        }
        const int64_t t = tgt[r] - o.vocab_start;  // the target's column, if this shard has it
        const float m = softcap_and_max(y, V, o.softcap);
        if (!have_lse) {
          const auto [s, sum_y] = sum_exp_and_sum(y, V, m);
          const double l = double(m) + std::log(s);
          const double yt = t >= 0 && t < V ? double(y[t]) : 0.0;
          lse[r] = float(l);
          if (o.partial) {
            zr[r] = 0.f;
            loss[r] = float(-(1.0 - o.eps) * yt - o.eps * sum_y / o.vocab_size);
          } else {
            const double z = double(o.z) * l * l;
            zr[r] = float(z);
            loss[r] = float((1.0 - o.eps) * (l - yt) + o.eps * (l - sum_y / o.vocab_size) + z);
          }
        }
        if (want_grad) row_grad(y, V, t, lse[r], scale[r], o);
      }
    });
    if (want_grad) {
      at::Tensor gh = out.grad_hidden.narrow(0, n0, c);
      at::mm_out(gh, x, w);
      if (n0 == 0) {
        at::mm_out(out.grad_weight, x.t(), h);
      } else {
        out.grad_weight.addmm_(x.t(), h);
      }
      if (out.grad_bias.defined()) out.grad_bias.add_(x.sum(0));
    }
  }
  return out;
}

// Per-row share of a unit (or the given) upstream gradient; n_valid counts non-ignored rows.
at::Tensor row_scales(const at::Tensor& target, int64_t ignore_index, Reduction red,
                      const at::Tensor& grad_loss) {
  const int64_t N = target.size(0);
  const auto f32 = target.options().dtype(at::kFloat);
  if (red == Reduction::kNone) return grad_loss.to(at::kFloat).reshape({N}).contiguous();
  const double g = grad_loss.defined() ? grad_loss.item<double>() : 1.0;
  if (red == Reduction::kSum) return at::full({N}, g, f32);
  const int64_t n_valid = target.ne(ignore_index).sum().item<int64_t>();
  // n_valid = 0: every row is ignored, the scale is never read (loss = 0/0 = NaN as in PyTorch)
  return at::full({N}, n_valid > 0 ? g / double(n_valid) : 0.0, f32);
}

at::Tensor reduce(const at::Tensor& rows, const at::Tensor& target, int64_t ignore_index,
                  Reduction red) {
  if (red == Reduction::kNone) return rows;
  at::Tensor total = rows.to(at::kDouble).sum();
  if (red == Reduction::kMean) total = total / target.ne(ignore_index).sum().to(at::kDouble);
  return total.to(at::kFloat);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
flce_fwd_cpu(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
             const std::optional<at::Tensor>& bias, int64_t ignore_index, double label_smoothing,
             double z_loss, std::optional<double> softcap, c10::string_view reduction,
             int64_t chunk_size, bool compute_grad, int64_t vocab_start, int64_t vocab_size) {
  const char* op = "fused_linear_cross_entropy";
  const Reduction red = check_flce_fwd_args(hidden, weight, target, bias, label_smoothing, z_loss,
                                            softcap, std::string(reduction), chunk_size,
                                            compute_grad, vocab_start, vocab_size);
  const at::Tensor tgt = target.contiguous();
  const bool shard = vocab_size > 0;
  const int64_t V_all = shard ? vocab_size : weight.size(0);
  check_targets(op, tgt, V_all, ignore_index);
  const LossOptions o{ignore_index, float(label_smoothing), float(z_loss),
                      float(softcap.value_or(0.0)), vocab_start, double(V_all), shard};
  const at::Tensor scale = compute_grad ? row_scales(tgt, ignore_index, red, at::Tensor()) : at::Tensor();
  Outputs r = chunk_loop(hidden, weight, tgt, bias, o, chunk_size, scale, at::Tensor());
  at::Tensor loss = reduce(r.loss_rows, tgt, ignore_index, red);
  at::Tensor z = reduce(r.z_rows, tgt, ignore_index, red);
  // Distinct empty tensors: outputs of an op may not alias each other.
  auto none = [&] { return hidden.new_empty({0}); };
  if (!compute_grad) return {loss, z, r.lse, none(), none(), none()};
  return {loss, z, r.lse, r.grad_hidden.to(hidden.scalar_type()),
          r.grad_weight.to(weight.scalar_type()),
          bias.has_value() ? r.grad_bias.to(bias->scalar_type()) : none()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flce_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& target, const std::optional<at::Tensor>& bias, const at::Tensor& lse,
    int64_t ignore_index, double label_smoothing, double z_loss, std::optional<double> softcap,
    c10::string_view reduction, int64_t chunk_size, int64_t vocab_start, int64_t vocab_size) {
  const Reduction red = check_flce_bwd_args(grad_loss, hidden, weight, target, bias, lse,
                                            label_smoothing, z_loss, softcap,
                                            std::string(reduction), chunk_size, vocab_start,
                                            vocab_size);
  const at::Tensor tgt = target.contiguous();
  const int64_t V_all = vocab_size > 0 ? vocab_size : weight.size(0);
  // The op can be called on its own: unchecked targets would index out of bounds.
  check_targets("fused_linear_cross_entropy (backward)", tgt, V_all, ignore_index);
  const LossOptions o{ignore_index, float(label_smoothing), float(z_loss),
                      float(softcap.value_or(0.0)), vocab_start, double(V_all), false};
  const at::Tensor scale = row_scales(tgt, ignore_index, red, grad_loss);
  Outputs r = chunk_loop(hidden, weight, tgt, bias, o, chunk_size, scale, lse);
  return {r.grad_hidden.to(hidden.scalar_type()), r.grad_weight.to(weight.scalar_type()),
          bias.has_value() ? r.grad_bias.to(bias->scalar_type()) : hidden.new_empty({0})};
}

// The schemas' CPU entries: the trailing `backend` argument, then the kernels above.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
flce_fwd_cpu_op(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                const std::optional<at::Tensor>& bias, int64_t ignore_index,
                double label_smoothing, double z_loss, std::optional<double> softcap,
                c10::string_view reduction, int64_t chunk_size, bool compute_grad,
                int64_t vocab_start, int64_t vocab_size, std::string_view backend) {
  check_cpu_backend("fused_linear_cross_entropy_fwd", backend,
                    "lmkernels.triton.fused_linear_cross_entropy.flce_fwd");
  return flce_fwd_cpu(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss,
                      softcap, reduction, chunk_size, compute_grad, vocab_start, vocab_size);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flce_bwd_cpu_op(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& target, const std::optional<at::Tensor>& bias, const at::Tensor& lse,
    int64_t ignore_index, double label_smoothing, double z_loss, std::optional<double> softcap,
    c10::string_view reduction, int64_t chunk_size, int64_t vocab_start, int64_t vocab_size,
    std::string_view backend) {
  check_cpu_backend("fused_linear_cross_entropy_bwd", backend,
                    "lmkernels.triton.fused_linear_cross_entropy.flce_bwd");
  return flce_bwd_cpu(grad_loss, hidden, weight, target, bias, lse, ignore_index,
                      label_smoothing, z_loss, softcap, reduction, chunk_size, vocab_start,
                      vocab_size);
}

}  // namespace
}  // namespace lmk

TORCH_LIBRARY_IMPL(lmkernels, CPU, m) {
  m.impl("fused_linear_cross_entropy_fwd", &lmk::flce_fwd_cpu_op);
  m.impl("fused_linear_cross_entropy_bwd", &lmk::flce_bwd_cpu_op);
}
