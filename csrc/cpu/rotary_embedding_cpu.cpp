// CPU kernel of rotary_embedding. One task per (b, t) position: its cos/sin rows are read and
// converted once, then every head of q and k at that position is rotated.
//   out[i] = x[i] * c[i] + x[p(i)] * ss[i]
// with p the partner index (rotate-half: i +- D/2; interleaved: i ^ 1) and ss the signed,
// partner-shifted sin built once per position:
//   forward: ss[i] = -s[i] for the first of a pair, +s[i] for the second
//   inverse: ss[i] = +s[p(i)] for the first,        -s[p(i)] for the second
// (inverse is the transpose of the forward map for any cos/sin, so the backward is exact even
// when the halves of cos/sin differ). q and k may have any strides with a unit last stride (HF's
// q is a (B, T, H, D) projection transposed to (B, H, T, D)); outputs are contiguous.
#include <torch/library.h>

#include <vector>

#include "../rotary_embedding.h"
#include "float_rows.h"

namespace lmk {
namespace {

using namespace float_rows;

// ss (see the file comment) from s, for one position.
void signed_sin(const float* s, float* ss, int64_t D, bool interleaved, bool inverse) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < D; ++i) {
    const bool first = interleaved ? (i % 2 == 0) : (i < h);
    const int64_t p = interleaved ? (i ^ 1) : (first ? i + h : i - h);
    ss[i] = inverse ? (first ? s[p] : -s[p]) : (first ? -s[i] : s[i]);
  }
}

// out (fp32, D) = x * c + partner(x) * ss.
void rotate_row(const float* x, const float* c, const float* ss, float* out, int64_t D,
                bool interleaved) {
  if (!interleaved) {
    const int64_t h = D / 2;
    auto fma3 = [](Vec xv, Vec cv, Vec pv, Vec sv) { return at::vec::fmadd(pv, sv, xv * cv); };
    int64_t i = 0;
    for (; i + Vec::size() <= h; i += Vec::size()) {
      const Vec x1 = Vec::loadu(x + i), x2 = Vec::loadu(x + h + i);
      fma3(x1, Vec::loadu(c + i), x2, Vec::loadu(ss + i)).store(out + i);
      fma3(x2, Vec::loadu(c + h + i), x1, Vec::loadu(ss + h + i)).store(out + h + i);
    }
    for (; i < h; ++i) {
      out[i] = x[i] * c[i] + x[h + i] * ss[i];
      out[h + i] = x[h + i] * c[h + i] + x[i] * ss[h + i];
    }
  } else {
    for (int64_t i = 0; i < D; i += 2) {
      const float a = x[i], b = x[i + 1];
      out[i] = a * c[i] + b * ss[i];
      out[i + 1] = b * c[i + 1] + a * ss[i + 1];
    }
  }
}

template <typename x_t, typename c_t>
void rotary_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                   const at::Tensor& sin, bool interleaved, bool inverse, at::Tensor& q_out,
                   at::Tensor& k_out) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1);
  const bool per_batch = cos.size(0) > 1;
  const x_t* Q = q.const_data_ptr<x_t>();
  const x_t* K = k.const_data_ptr<x_t>();
  const c_t* COS = cos.const_data_ptr<c_t>();
  const c_t* SIN = sin.const_data_ptr<c_t>();
  x_t* QO = q_out.data_ptr<x_t>();
  x_t* KO = k_out.data_ptr<x_t>();
  parallel_items(B * T, (H + Hkv) * D, [&](int64_t p0, int64_t p1) {
    std::vector<float> c(D), s(D), ss(D), x(D), o(D);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / T, t = p % T;
      const int64_t cs_off = ((per_batch ? b : 0) * T + t) * D;  // cos/sin are contiguous
      load_float(COS + cs_off, c.data(), D);
      load_float(SIN + cs_off, s.data(), D);
      signed_sin(s.data(), ss.data(), D, interleaved, inverse);
      auto heads = [&](const x_t* X, x_t* XO, const at::Tensor& src, int64_t nh) {
        for (int64_t h = 0; h < nh; ++h) {
          load_float(X + b * src.stride(0) + h * src.stride(1) + t * src.stride(2), x.data(), D);
          rotate_row(x.data(), c.data(), ss.data(), o.data(), D, interleaved);
          store_float(o.data(), XO + ((b * nh + h) * T + t) * D, D);
        }
      };
      heads(Q, QO, q, H);
      heads(K, KO, k, Hkv);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rotary_embedding_cpu(const at::Tensor& q_in,
                                                        const at::Tensor& k_in,
                                                        const at::Tensor& cos_in,
                                                        const at::Tensor& sin_in, bool interleaved,
                                                        bool inverse, c10::string_view backend) {
  check_rotary_embedding_args(q_in, k_in, cos_in, sin_in);
  check_cpu_backend("rotary_embedding", backend);
  at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in);
  at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  if (q.numel() == 0 && k.numel() == 0) return {q_out, k_out};
  dispatch_float_types(q.scalar_type(), cos.scalar_type() == at::kFloat, [&](auto x_tag, auto c_tag) {
    rotary_kernel<typename decltype(x_tag)::type, typename decltype(c_tag)::type>(
        q, k, cos, sin, interleaved, inverse, q_out, k_out);
  });
  return {q_out, k_out};
}

}  // namespace
}  // namespace lmk

TORCH_LIBRARY_IMPL(lmkernels, CPU, m) {
  m.impl("rotary_embedding", &lmk::rotary_embedding_cpu);
}
