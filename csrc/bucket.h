// Gradient-bucket ops (bucket_pack_, bucket_unpack_, bucket_scale_): declarations shared by the
// schema/check file (bucket.cpp) and the CPU and CUDA kernels.
//
// All three are one operation over a list of contiguous runs: dst[i] = cast(src[i] * scale).
// bucket_pack_ copies tensors one after another into a flat buffer, bucket_unpack_ copies the
// flat buffer's pieces back into the tensors, bucket_scale_ scales tensors in place. The
// product is formed in float32 (float64 when either side is float64), rounded once to dst.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace lmk {

struct CopySegment {
  const void* src;
  void* dst;
  int64_t numel;
};

// What a kernel needs: the runs, their (uniform) source and destination dtypes, the device.
struct BucketPlan {
  std::vector<CopySegment> segments;
  at::ScalarType src_dtype = at::kFloat;
  at::ScalarType dst_dtype = at::kFloat;
  at::Device device = at::Device(at::kCPU);
};

// Validate the arguments (messages name the argument, the expectation and what was given)
// and lay out the runs. Each op's CPU and CUDA kernel calls its plan function first.
BucketPlan plan_bucket_pack(at::TensorList tensors, const at::Tensor& flat);
BucketPlan plan_bucket_unpack(const at::Tensor& flat, at::TensorList tensors);
BucketPlan plan_bucket_scale(at::TensorList tensors);

// The CUDA kernels (cuda/bucket_cuda.cu; each plans, i.e. checks, first). Bound into
// lmkernels._C (module.cpp) for the CUDA backend table of lmkernels/ops/bucket.py.
void bucket_pack_cuda(at::TensorList tensors, const at::Tensor& flat, double scale);
void bucket_unpack_cuda(const at::Tensor& flat, at::TensorList tensors, double scale);
void bucket_scale_cuda(at::TensorList tensors, double scale);

}  // namespace lmk
