// CPU kernels of swiglu_fwd / swiglu_bwd: one pass, fp32 math, one rounding per output.
//   out   = silu(g) * u,                      silu(g) = g * s,  s = 1 / (1 + exp(-g))
//   dgate = grad * u * s * (1 + g * (1 - s)),  dup = grad * silu(g)
// (PyTorch's own silu and silu_backward formulas, so inf/NaN behave as they do.) The backward
// recomputes s from gate instead of reading a saved silu. Inputs are viewed as (rows, I) with
// unit stride along I (a gate/up pair chunked from one fused projection needs no copy).
#include <torch/library.h>

#include "../swiglu.h"
#include "float_rows.h"

namespace lmk {
namespace {

using namespace float_rows;
constexpr int64_t kChunk = 1024;  // elements converted to fp32 at a time (4 KB per buffer)

inline Vec sigmoid(Vec g) { return Vec(1.f) / (Vec(1.f) + g.neg().exp()); }

// Calls fn(row, column offset, count) over (rows, I) in chunks of kChunk columns.
template <typename Fn>
void for_each_chunk(int64_t rows, int64_t I, const Fn& fn) {
  const int64_t per_row = (I + kChunk - 1) / kChunk;
  parallel_items(rows * per_row, kChunk, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int64_t r = i / per_row, c0 = (i % per_row) * kChunk;
      fn(r, c0, std::min(kChunk, I - c0));
    }
  });
}

template <typename T>
void forward_kernel(const at::Tensor& gate, const at::Tensor& up, at::Tensor& out) {
  const int64_t rows = gate.size(0), I = gate.size(1);
  const int64_t sg = gate.stride(0), su = up.stride(0);
  const T* G = gate.const_data_ptr<T>();
  const T* U = up.const_data_ptr<T>();
  T* O = out.data_ptr<T>();
  for_each_chunk(rows, I, [&](int64_t r, int64_t c0, int64_t n) {
    alignas(64) float gb[kChunk], ub[kChunk];
    const float* g = as_float(G + r * sg + c0, gb, n);
    const float* u = as_float(U + r * su + c0, ub, n);
    float* o = out_float(O + r * I + c0, gb);
    at::vec::map2([](Vec gv, Vec uv) { return gv / (Vec(1.f) + gv.neg().exp()) * uv; }, o, g, u, n);
    if constexpr (!std::is_same_v<T, float>) store_float(o, O + r * I + c0, n);
  });
}

template <typename T>
void backward_kernel(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                     at::Tensor& dgate, at::Tensor& dup) {
  const int64_t rows = gate.size(0), I = gate.size(1);
  const int64_t sd = grad.stride(0), sg = gate.stride(0), su = up.stride(0);
  const T* D = grad.const_data_ptr<T>();
  const T* G = gate.const_data_ptr<T>();
  const T* U = up.const_data_ptr<T>();
  T* DG = dgate.data_ptr<T>();
  T* DU = dup.data_ptr<T>();
  for_each_chunk(rows, I, [&](int64_t r, int64_t c0, int64_t n) {
    alignas(64) float db[kChunk], gb[kChunk], ub[kChunk], dgb[kChunk], dub[kChunk];
    const float* d = as_float(D + r * sd + c0, db, n);
    const float* g = as_float(G + r * sg + c0, gb, n);
    const float* u = as_float(U + r * su + c0, ub, n);
    float* dg = out_float(DG + r * I + c0, dgb);
    float* du = out_float(DU + r * I + c0, dub);
    int64_t c = 0;
    for (; c + Vec::size() <= n; c += Vec::size()) {
      const Vec dv = Vec::loadu(d + c), gv = Vec::loadu(g + c), uv = Vec::loadu(u + c);
      const Vec s = sigmoid(gv);
      (dv * uv * s * (Vec(1.f) + gv * (Vec(1.f) - s))).store(dg + c);
      (dv * (gv * s)).store(du + c);
    }
    for (; c < n; ++c) {
      const float s = 1.f / (1.f + std::exp(-g[c]));
      dg[c] = d[c] * u[c] * s * (1.f + g[c] * (1.f - s));
      du[c] = d[c] * (g[c] * s);
    }
    if constexpr (!std::is_same_v<T, float>) {
      store_float(dg, DG + r * I + c0, n);
      store_float(du, DU + r * I + c0, n);
    }
  });
}

at::Tensor swiglu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up, c10::string_view backend) {
  check_swiglu_args("swiglu_fwd", gate, up, nullptr);
  check_cpu_backend("swiglu_fwd", backend);
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  if (gate.numel() == 0) return out;
  at::Tensor g2 = rows_view(gate), u2 = rows_view(up), o2 = out.view({-1, gate.size(-1)});
  dispatch_float_types(gate.scalar_type(), false, [&](auto t, auto) {
    forward_kernel<typename decltype(t)::type>(g2, u2, o2);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& gate,
                                                  const at::Tensor& up, c10::string_view backend) {
  check_swiglu_args("swiglu_bwd", gate, up, &grad_out);
  check_cpu_backend("swiglu_bwd", backend);
  at::Tensor dgate = at::empty(gate.sizes(), gate.options());
  at::Tensor dup = at::empty(gate.sizes(), gate.options());
  if (gate.numel() == 0) return {dgate, dup};
  const int64_t I = gate.size(-1);
  at::Tensor d2 = rows_view(grad_out), g2 = rows_view(gate), u2 = rows_view(up);
  at::Tensor dg2 = dgate.view({-1, I}), du2 = dup.view({-1, I});
  dispatch_float_types(gate.scalar_type(), false, [&](auto t, auto) {
    backward_kernel<typename decltype(t)::type>(d2, g2, u2, dg2, du2);
  });
  return {dgate, dup};
}

}  // namespace
}  // namespace lmk

TORCH_LIBRARY_IMPL(lmkernels, CPU, m) {
  m.impl("swiglu_fwd", &lmk::swiglu_fwd_cpu);
  m.impl("swiglu_bwd", &lmk::swiglu_bwd_cpu);
}
