// Argument checks shared by every op: each message names the argument and says what was
// expected and what was given, so bad input never reaches a kernel.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <ostream>
#include <string>
#include <string_view>

namespace lmk {

// "list[i]", for messages. The checks below take the parts and format only on failure:
// they run for every tensor of every call, so the passing path must not allocate.
inline std::string item_name(const char* list, size_t i) {
  return std::string(list) + "[" + std::to_string(i) + "]";
}

// A tensor's name: (list, index), a plain argument name, or an already formatted string.
struct Name {
  static constexpr size_t kNoIndex = static_cast<size_t>(-1);
  Name(const char* list, size_t index = kNoIndex) : list(list), index(index) {}
  Name(std::string formatted) : list(nullptr), formatted(std::move(formatted)) {}
  std::string str() const {
    if (list == nullptr) return formatted;
    return index == kNoIndex ? std::string(list) : item_name(list, index);
  }
  const char* list;
  size_t index = kNoIndex;
  std::string formatted;
};
inline std::ostream& operator<<(std::ostream& os, const Name& n) { return os << n.str(); }

inline void check_same_length(const char* op, const char* a, size_t na, const char* b, size_t nb) {
  TORCH_CHECK(na == nb, op, ": ", b, " must have one tensor per entry of ", a, " (", na,
              "); got ", nb);
}

inline void check_float_dtype(const char* op, const Name& name, const at::Tensor& t) {
  auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, op, ": ", name.str(),
              " must be float32, bfloat16 or float16; got ", d);
}

inline void check_dense_contiguous(const char* op, const Name& name, const at::Tensor& t) {
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name.str(),
              " must be a dense (strided) tensor; got ", t.layout());
  TORCH_CHECK(!t.is_complex(), op, ": ", name.str(), " must be real; got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name.str(), " must be contiguous; got strides ",
              t.strides(), " for shape ", t.sizes());
}

// `t` must match `ref` (the parameter it belongs to) in shape, device and, unless
// `allow_fp32`, dtype (moment buffers may be float32 for low-precision parameters).
inline void check_like(const char* op, const Name& name, const at::Tensor& t, const Name& ref_name,
                       const at::Tensor& ref, bool allow_fp32) {
  check_dense_contiguous(op, name, t);
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name.str(), " is on ", t.device(), " but ",
              ref_name.str(), " is on ", ref.device());
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name.str(), " has shape ", t.sizes(), " but ",
              ref_name.str(), " has shape ", ref.sizes());
  bool ok = t.scalar_type() == ref.scalar_type() || (allow_fp32 && t.scalar_type() == at::kFloat);
  TORCH_CHECK(ok, op, ": ", name.str(), " has dtype ", t.scalar_type(), " but ", ref_name.str(),
              " has dtype ", ref.scalar_type(), allow_fp32 ? " (float32 is also accepted)" : "");
}

// A one-element float32 tensor read by the kernel (step counts, lr, inv_scale, found_inf).
inline void check_scalar_f32(const char* op, const Name& name, const at::Tensor& t,
                             const at::Device& device) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name.str(), " must hold exactly one value; got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name.str(), " must be float32; got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name.str(), " must be on ", device, "; got ",
              t.device());
}

// The schema's trailing `backend` argument, as seen by a C++ CPU kernel. CPU tensors have one
// kernel, so only "auto" and "cpu" run; LMK_BACKEND (a choice among GPU kernels) is not read
// here. `triton_launcher`: the plain function that runs the op's Triton kernel on CPU tensors
// under TRITON_INTERPRET=1 (nullptr: the op has no Triton kernel).
inline void check_cpu_backend(const char* op, std::string_view backend, const char* triton_launcher) {
  if (backend == "auto" || backend == "cpu") return;
  TORCH_CHECK_VALUE(backend == "cuda" || backend == "triton", op,
                    ": backend must be one of ('auto', 'cpu', 'cuda', 'triton'); got '", backend,
                    "'");
  if (backend == "triton" && triton_launcher != nullptr) {
    TORCH_CHECK_VALUE(false, op, ": backend 'triton' needs CUDA tensors; got CPU tensors (under "
                      "TRITON_INTERPRET=1 call ", triton_launcher, " directly)");
  }
  TORCH_CHECK_VALUE(false, op, ": backend '", backend, "' needs CUDA tensors; got CPU tensors");
}

}  // namespace lmk
