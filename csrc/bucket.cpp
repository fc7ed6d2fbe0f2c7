// Schemas and argument checks of the gradient-bucket ops (CPU kernel: cpu/bucket_cpu.cpp,
// registered for the CPU key; CUDA tensors: lmkernels/ops/bucket.py picks the CUDA kernel
// cuda/bucket_cuda.cu; Python wrapper + fakes: lmkernels/ops/bucket.py).
#include "bucket.h"

#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <string>

#include "checks.h"

namespace lmk {
namespace {

void check_bucket_dtype(const char* op, const Name& name, const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf || d == at::kDouble, op,
              ": ", name, " must be float32, bfloat16, float16 or float64; got ", d);
}

// Checks the tensor list against `device` (that of flat, or of tensors[0]) and returns the
// total element count.
int64_t check_list(const char* op, const char* list, at::TensorList tensors,
                   const at::Device& device) {
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Name name{list, i};  // formatted only if a check fails
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), op, ": ", name, " is undefined (None)");
    check_dense_contiguous(op, name, t);
    check_bucket_dtype(op, name, t);
    TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but expected ",
                device);
    TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type(), op, ": all ", list,
                " of one call must share a dtype; ", name, " is ", t.scalar_type(), " but ", list,
                "[0] is ", tensors[0].scalar_type());
    total += t.numel();
  }
  return total;
}

void check_flat(const char* op, const at::Tensor& flat, at::TensorList tensors, int64_t total) {
  TORCH_CHECK(flat.numel() == total, op, ": flat must hold exactly the tensors' ", total,
              " elements (their sizes summed); got ", flat.numel());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto overlap = at::get_overlap_status(flat, tensors[i]);
    TORCH_CHECK(overlap == at::MemOverlapStatus::No || tensors[i].numel() == 0, op,
                ": flat and ", Name{"tensors", i},
                " share memory; the source and destination must be distinct buffers");
  }
}

BucketPlan make_plan(at::ScalarType src, at::ScalarType dst, const at::Device& device) {
  BucketPlan plan;
  plan.src_dtype = src;
  plan.dst_dtype = dst;
  plan.device = device;
  return plan;
}

}  // namespace

BucketPlan plan_bucket_pack(at::TensorList tensors, const at::Tensor& flat) {
  const char* op = "bucket_pack_";
  check_dense_contiguous(op, "flat", flat);
  check_bucket_dtype(op, "flat", flat);
  const int64_t total = check_list(op, "tensors", tensors, flat.device());
  check_flat(op, flat, tensors, total);
  BucketPlan plan = make_plan(tensors.empty() ? flat.scalar_type() : tensors[0].scalar_type(),
                              flat.scalar_type(), flat.device());
  char* out = static_cast<char*>(flat.data_ptr());
  const int64_t step = flat.element_size();
  int64_t offset = 0;
  for (const at::Tensor& t : tensors) {
    if (t.numel() > 0) plan.segments.push_back({t.const_data_ptr(), out + offset * step, t.numel()});
    offset += t.numel();
  }
  return plan;
}

BucketPlan plan_bucket_unpack(const at::Tensor& flat, at::TensorList tensors) {
  const char* op = "bucket_unpack_";
  check_dense_contiguous(op, "flat", flat);
  check_bucket_dtype(op, "flat", flat);
  const int64_t total = check_list(op, "tensors", tensors, flat.device());
  check_flat(op, flat, tensors, total);
  BucketPlan plan = make_plan(flat.scalar_type(),
                              tensors.empty() ? flat.scalar_type() : tensors[0].scalar_type(),
                              flat.device());
  const char* in = static_cast<const char*>(flat.const_data_ptr());
  const int64_t step = flat.element_size();
  int64_t offset = 0;
  for (const at::Tensor& t : tensors) {
    if (t.numel() > 0) plan.segments.push_back({in + offset * step, t.data_ptr(), t.numel()});
    offset += t.numel();
  }
  return plan;
}

BucketPlan plan_bucket_scale(at::TensorList tensors) {
  const char* op = "bucket_scale_";
  if (tensors.empty()) return BucketPlan{};
  const at::Device device = tensors[0].device();
  check_list(op, "tensors", tensors, device);
  BucketPlan plan = make_plan(tensors[0].scalar_type(), tensors[0].scalar_type(), device);
  for (const at::Tensor& t : tensors)
    if (t.numel() > 0) plan.segments.push_back({t.data_ptr(), t.data_ptr(), t.numel()});
  return plan;
}

}  // namespace lmk

TORCH_LIBRARY_FRAGMENT(lmkernels, m) {
  // backend: "auto", "cpu" or "cuda" (there is no Triton bucket kernel).
  // flat[o_i : o_i + n_i] = cast(tensors[i] * scale), o_i = sizes of tensors[:i] summed.
  m.def(
      "bucket_pack_(Tensor[] tensors, Tensor(a!) flat, float scale=1.0, *, "
      "str backend=\"auto\") -> ()");
  // tensors[i] = cast(flat[o_i : o_i + n_i] * scale).
  m.def(
      "bucket_unpack_(Tensor flat, Tensor(a!)[] tensors, float scale=1.0, *, "
      "str backend=\"auto\") -> ()");
  // tensors[i] *= scale.
  m.def("bucket_scale_(Tensor(a!)[] tensors, float scale, *, str backend=\"auto\") -> ()");
}
