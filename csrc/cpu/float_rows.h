// What the row-wise CPU kernels (rms_norm, rotary_embedding, swiglu) share: each one reads a
// row of bf16/fp16/fp32 values into fp32, computes in fp32, and writes the row back, with rows
// split across threads. Written once here so that the kernels hold only their maths.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <string_view>
#include <type_traits>

namespace lmk::float_rows {

using Vec = at::vec::Vectorized<float>;

// (rows, n) view with unit stride along the last dimension; a copy only when no such view exists
// (a gate/up pair chunked from one fused projection, or HF's transposed q/k, need none).
inline at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}
inline at::Tensor rows_view(const at::Tensor& t) {
  return unit_last_stride(t.reshape({-1, t.size(-1)}));
}

template <typename T>
void load_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) std::copy(src, src + n, dst);
  else at::vec::convert(src, dst, n);
}

template <typename T>
void store_float(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) std::copy(src, src + n, dst);
  else at::vec::convert(src, dst, n);
}

// fp32 view of n elements: the data itself for float (no copy), else converted into buf.
template <typename T>
const float* as_float(const T* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) return src;
  load_float(src, buf, n);
  return buf;
}

// Where to compute an output row: straight into dst for float, else into buf (then store_float).
template <typename T>
float* out_float(T* dst, float* buf) {
  if constexpr (std::is_same_v<T, float>) return dst;
  return buf;
}

// The CPU kernels answer only backend "auto" or "cpu"; the message says where Triton runs.
inline void check_cpu_backend(const char* op, std::string_view backend) {
  TORCH_CHECK_VALUE(backend == "auto" || backend == "cpu", op,
                    ": on CPU tensors backend must be 'auto' or 'cpu' (the Triton kernels run on "
                    "CPU tensors only through their launchers under TRITON_INTERPRET=1); got '",
                    backend, "'");
}

// at::parallel_for over n items of `elements_per_item` values each, about 16K values (64 KB of
// fp32) per task: enough work to amortize a task, small enough to balance rows across threads.
template <typename Fn>
void parallel_items(int64_t n, int64_t elements_per_item, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, elements_per_item));
  at::parallel_for(0, n, grain, fn);
}

template <typename T>
struct Type { using type = T; };

// Calls fn(Type<x_t>{}, Type<p_t>{}): x_t the C++ type of `dtype` (float, BFloat16, Half) and
// p_t the type of a second operand that is either x's dtype or float32 (norm weight, cos/sin).
template <typename Fn>
void dispatch_float_types(at::ScalarType dtype, bool second_is_float, const Fn& fn) {
  switch (dtype) {
    case at::kFloat: fn(Type<float>{}, Type<float>{}); break;
    case at::kBFloat16:
      if (second_is_float) fn(Type<at::BFloat16>{}, Type<float>{});
      else fn(Type<at::BFloat16>{}, Type<at::BFloat16>{});
      break;
    case at::kHalf:
      if (second_is_float) fn(Type<at::Half>{}, Type<float>{});
      else fn(Type<at::Half>{}, Type<at::Half>{});
      break;
    default: TORCH_CHECK(false, "unreachable: dtype checked before dispatch");
  }
}

}  // namespace lmk::float_rows
