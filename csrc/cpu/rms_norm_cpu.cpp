// CPU kernels of rms_norm_fwd / add_rms_norm_fwd / rms_norm_bwd, one pass over each row.
//
// Forward, row r of x (H values; add_rms_norm first forms s = round(x + residual) and stores it):
//   rstd = 1 / sqrt(sum(x^2) / H + eps)          (fp32)
//   out  = round_out(w * round_x(x * rstd))       (HF LlamaRMSNorm: normalize in fp32, cast to
//                                                  x's dtype, then multiply by weight)
// Backward (n = x * rstd in fp32, dn = g * w):
//   dx = rstd * (dn - n * sum(dn * n) / H)  [+ grad_sum],   dweight = sum over rows of g * n
// dweight: rows are split into one block per thread, each summing into its own fp32 row of a
// (blocks, H) buffer, reduced in a fixed order afterwards (deterministic, no atomics). Within a
// block rows are summed in chunks of kChunkRows first (two-level summation): a plain running
// sum over 512 rows had 4x the error of torch's cascade sum (fp32, 1025 x 40).
// bf16/fp16 rows are converted to fp32 in a per-thread buffer; all arithmetic is fp32.
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../rms_norm.h"
#include "float_rows.h"

namespace lmk {
namespace {

using namespace float_rows;
constexpr int64_t kChunkRows = 32;

// v = float(T(v)): the rounding a store in T and a reload would do (identity for float).
template <typename T>
void round_through(float* v, T* scratch, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) {
    at::vec::convert(v, scratch, n);
    at::vec::convert(scratch, v, n);
  }
}

float sum_of_squares(const float* x, int64_t n) {
  return at::vec::map_reduce_all<float>([](Vec v) { return v * v; },
                                        [](Vec a, Vec b) { return a + b; }, x, n);
}

// x_t: x's (and residual's) type; w_t: weight's, which is also the output's (x_t or float).
template <typename x_t, typename w_t>
void forward_kernel(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
                    double eps, at::Tensor& out, at::Tensor* sum, at::Tensor& rstd) {
  const int64_t rows = x.size(0), H = x.size(1);
  const int64_t sx = x.stride(0), sr = residual ? residual->stride(0) : 0;
  const x_t* X = x.const_data_ptr<x_t>();
  const x_t* R = residual ? residual->const_data_ptr<x_t>() : nullptr;
  x_t* S = sum ? sum->data_ptr<x_t>() : nullptr;
  w_t* O = out.data_ptr<w_t>();
  float* RSTD = rstd.data_ptr<float>();
  std::vector<float> w(H);
  load_float(weight.const_data_ptr<w_t>(), w.data(), H);
  const float epsf = static_cast<float>(eps);
  parallel_items(rows, H, [&](int64_t r0, int64_t r1) {
    std::vector<float> a(H), b(R ? H : 0);
    std::vector<x_t> scratch(std::is_same_v<x_t, float> ? 0 : H);
    for (int64_t r = r0; r < r1; ++r) {
      load_float(X + r * sx, a.data(), H);
      if (R) {
        load_float(R + r * sr, b.data(), H);
        at::vec::map2([](Vec p, Vec q) { return p + q; }, a.data(), a.data(), b.data(), H);
        store_float(a.data(), S + r * H, H);
        if constexpr (!std::is_same_v<x_t, float>) load_float(S + r * H, a.data(), H);
      }
      // mean as sum / H, as torch's mean does (not sum * (1/H): one rounding fewer to differ).
      const float rs = 1.f / std::sqrt(sum_of_squares(a.data(), H) / static_cast<float>(H) + epsf);
      RSTD[r] = rs;
      const Vec vrs(rs);
      at::vec::map([vrs](Vec v) { return v * vrs; }, a.data(), a.data(), H);
      round_through<x_t>(a.data(), scratch.data(), H);
      at::vec::map2([](Vec v, Vec ww) { return v * ww; }, a.data(), a.data(), w.data(), H);
      store_float(a.data(), O + r * H, H);
    }
  });
}

template <typename x_t, typename w_t>
void backward_kernel(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& rstd, const at::Tensor* grad_sum, at::Tensor& dx,
                     at::Tensor& dweight) {
  const int64_t rows = x.size(0), H = x.size(1);
  const int64_t sg = g.stride(0), sx = x.stride(0), ss = grad_sum ? grad_sum->stride(0) : 0;
  const w_t* G = g.const_data_ptr<w_t>();
  const x_t* X = x.const_data_ptr<x_t>();
  const x_t* GS = grad_sum ? grad_sum->const_data_ptr<x_t>() : nullptr;
  const float* RSTD = rstd.const_data_ptr<float>();
  x_t* DX = dx.data_ptr<x_t>();
  std::vector<float> w(H);
  load_float(weight.const_data_ptr<w_t>(), w.data(), H);
  const float inv_h = 1.f / static_cast<float>(H);
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  const int64_t per_block = (rows + blocks - 1) / blocks;
  std::vector<float> partial(blocks * H, 0.f);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> xv(H), gv(H), dn(H), extra(GS ? H : 0), dw(H);
    for (int64_t blk = b0; blk < b1; ++blk) {
      float* dw_total = partial.data() + blk * H;
      const int64_t r_end = std::min(rows, (blk + 1) * per_block);
      for (int64_t r = blk * per_block; r < r_end; ++r) {
        if ((r - blk * per_block) % kChunkRows == 0) std::fill(dw.begin(), dw.end(), 0.f);
        const float rs = RSTD[r];
        const Vec vrs(rs);
        load_float(X + r * sx, xv.data(), H);
        load_float(G + r * sg, gv.data(), H);
        at::vec::map([vrs](Vec v) { return v * vrs; }, xv.data(), xv.data(), H);  // n
        at::vec::map2([](Vec gg, Vec ww) { return gg * ww; }, dn.data(), gv.data(), w.data(), H);
        // dweight += g * n
        at::vec::map3([](Vec acc, Vec gg, Vec n) { return at::vec::fmadd(gg, n, acc); },
                      dw.data(), dw.data(), gv.data(), xv.data(), H);
        const float c = at::vec::map2_reduce_all<float>(
                            [](Vec p, Vec q) { return p * q; },
                            [](Vec p, Vec q) { return p + q; }, dn.data(), xv.data(), H) *
                        inv_h;
        const Vec vc(c);
        at::vec::map2([vrs, vc](Vec d, Vec n) { return vrs * (d - n * vc); }, dn.data(),
                      dn.data(), xv.data(), H);
        if (GS) {
          load_float(GS + r * ss, extra.data(), H);
          at::vec::map2([](Vec p, Vec q) { return p + q; }, dn.data(), dn.data(), extra.data(), H);
        }
        store_float(dn.data(), DX + r * H, H);
        if ((r + 1 - blk * per_block) % kChunkRows == 0 || r + 1 == r_end) {
          at::vec::map2([](Vec p, Vec q) { return p + q; }, dw_total, dw_total, dw.data(), H);
        }
      }
    }
  });
  // Fixed-order reduction of the per-block partial sums.
  std::vector<float> total(H, 0.f);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    at::vec::map2([](Vec p, Vec q) { return p + q; }, total.data(), total.data(),
                  partial.data() + blk * H, H);
  }
  store_float(total.data(), dweight.data_ptr<w_t>(), H);
}

// Runs BODY with x_t, w_t bound to the dtypes of x and weight (w_t: x_t or float).
#define LMK_RMS_NORM_DISPATCH(x, weight, BODY)                                      \
  dispatch_float_types((x).scalar_type(), (weight).scalar_type() == at::kFloat,     \
                       [&](auto x_tag_, auto w_tag_) {                              \
                         using x_t = typename decltype(x_tag_)::type;               \
                         using w_t = typename decltype(w_tag_)::type;               \
                         BODY;                                                      \
                       })

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_common(const char* op, const at::Tensor& x,
                                                               const at::Tensor* residual,
                                                               const at::Tensor& weight, double eps,
                                                               std::string_view backend) {
  check_rms_norm_args(op, x, residual, weight, eps);
  check_cpu_backend(op, backend);
  const int64_t H = x.size(-1);
  at::Tensor x2 = rows_view(x);
  at::Tensor r2 = residual ? rows_view(*residual) : at::Tensor();
  at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(weight.scalar_type()));
  at::Tensor sum = residual ? at::empty(x.sizes(), x.options()) : at::Tensor();
  auto lead = x.sizes().vec();
  lead.pop_back();
  at::Tensor rstd = at::empty(lead, x.options().dtype(at::kFloat));
  if (x2.size(0) > 0) {
    at::Tensor out2 = out.view({-1, H});
    at::Tensor sum2 = residual ? sum.view({-1, H}) : at::Tensor();
    LMK_RMS_NORM_DISPATCH(x, weight, (forward_kernel<x_t, w_t>(
        x2, residual ? &r2 : nullptr, w, eps, out2, residual ? &sum2 : nullptr, rstd)));
  }
  return {out, sum, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                    double eps, c10::string_view backend) {
  auto [out, sum, rstd] = forward_common("rms_norm_fwd", x, nullptr, weight, eps, backend);
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd_cpu(const at::Tensor& x,
                                                                    const at::Tensor& residual,
                                                                    const at::Tensor& weight,
                                                                    double eps,
                                                                    c10::string_view backend) {
  return forward_common("add_rms_norm_fwd", x, &residual, weight, eps, backend);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& grad_out,
                                                    const at::Tensor& x, const at::Tensor& weight,
                                                    const at::Tensor& rstd,
                                                    const std::optional<at::Tensor>& grad_sum,
                                                    c10::string_view backend) {
  check_rms_norm_bwd_args(grad_out, x, weight, rstd, grad_sum);
  check_cpu_backend("rms_norm_bwd", backend);
  at::Tensor x2 = rows_view(x), g2 = rows_view(grad_out);
  at::Tensor gs2 = grad_sum ? rows_view(*grad_sum) : at::Tensor();
  at::Tensor r = rstd.contiguous(), w = weight.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dweight = at::zeros({x.size(-1)}, weight.options());
  if (x2.size(0) > 0) {
    at::Tensor dx2 = dx.view({-1, x.size(-1)});
    LMK_RMS_NORM_DISPATCH(x, weight, (backward_kernel<x_t, w_t>(
        g2, x2, w, r, grad_sum ? &gs2 : nullptr, dx2, dweight)));
  }
  return {dx, dweight};
}

}  // namespace
}  // namespace lmk

TORCH_LIBRARY_IMPL(lmkernels, CPU, m) {
  m.impl("rms_norm_fwd", &lmk::rms_norm_fwd_cpu);
  m.impl("add_rms_norm_fwd", &lmk::add_rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &lmk::rms_norm_bwd_cpu);
}
