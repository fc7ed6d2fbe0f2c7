// CPU kernels of bucket_pack_, bucket_unpack_ and bucket_scale_: every op is a list of runs
// dst[i] = cast(src[i] * scale) (see bucket.h), split into fixed-size work items and run in one
// at::parallel_for, so a bucket of many small gradients costs one parallel region.
// Dtype conversion is staged through a small float tile (at::vec::convert, vectorized for
// bf16/fp16), the scale is an at::vec multiply; equal dtypes with scale 1 are a memcpy.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "../bucket.h"
#include "../checks.h"

namespace lmk {
namespace {

constexpr int64_t kChunk = 32768;  // elements per work item
constexpr int64_t kTile = 512;     // float staging tile (2 KB, stays in L1)

struct Work {
  int64_t segment, begin, end;
};

template <typename src_t, typename dst_t>
void copy_run(const src_t* src, dst_t* dst, int64_t n, double scale) {
  constexpr bool same = std::is_same_v<src_t, dst_t>;
  if constexpr (std::is_same_v<src_t, double> || std::is_same_v<dst_t, double>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<dst_t>(static_cast<double>(src[i]) * scale);
    return;
  } else {
    if (same && scale == 1.0) {
      if (static_cast<const void*>(src) != static_cast<void*>(dst))
        std::memcpy(dst, src, n * sizeof(src_t));
      return;
    }
    using Vec = at::vec::Vectorized<float>;
    const float s = static_cast<float>(scale);
    if constexpr (std::is_same_v<src_t, float> && std::is_same_v<dst_t, float>) {
      at::vec::map([s](Vec x) { return x * Vec(s); }, dst, src, n);
      return;
    }
    float tile[kTile];
    for (int64_t b = 0; b < n; b += kTile) {
      const int64_t len = std::min(kTile, n - b);
      at::vec::convert(src + b, tile, len);
      at::vec::map([s](Vec x) { return x * Vec(s); }, tile, tile, len);
      at::vec::convert(tile, dst + b, len);
    }
  }
}

void run_plan(const BucketPlan& plan, double scale) {
  if (plan.segments.empty()) return;
  TORCH_CHECK(plan.device.is_cpu(), "bucket ops (CPU kernel): tensors must be CPU tensors; got ",
              plan.device);
  std::vector<Work> work;
  for (size_t s = 0; s < plan.segments.size(); ++s)
    for (int64_t b = 0; b < plan.segments[s].numel; b += kChunk)
      work.push_back({int64_t(s), b, std::min(plan.segments[s].numel, b + kChunk)});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, plan.src_dtype, "bucket_src", [&] {
    using src_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, plan.dst_dtype, "bucket_dst", [&] {
      using dst_t = scalar_t;
      at::parallel_for(0, int64_t(work.size()), 1, [&](int64_t w0, int64_t w1) {
        for (int64_t w = w0; w < w1; ++w) {
          const Work& job = work[w];
          const CopySegment& seg = plan.segments[job.segment];
          copy_run(static_cast<const src_t*>(seg.src) + job.begin,
                   static_cast<dst_t*>(seg.dst) + job.begin, job.end - job.begin, scale);
        }
      });
    });
  });
}

void bucket_pack_cpu(at::TensorList tensors, const at::Tensor& flat, double scale) {
  run_plan(plan_bucket_pack(tensors, flat), scale);
}

void bucket_unpack_cpu(const at::Tensor& flat, at::TensorList tensors, double scale) {
  run_plan(plan_bucket_unpack(flat, tensors), scale);
}

void bucket_scale_cpu(at::TensorList tensors, double scale) {
  run_plan(plan_bucket_scale(tensors), scale);
}

}  // namespace
}  // namespace lmk

namespace lmk {
namespace {
// The ops' CPU entries: the schema's trailing backend must name this kernel (checks.h).
void bucket_pack_cpu_op(at::TensorList tensors, const at::Tensor& flat, double scale,
                        std::string_view backend) {
  check_cpu_backend("bucket_pack_", backend, nullptr);
  bucket_pack_cpu(tensors, flat, scale);
}
void bucket_unpack_cpu_op(const at::Tensor& flat, at::TensorList tensors, double scale,
                          std::string_view backend) {
  check_cpu_backend("bucket_unpack_", backend, nullptr);
  bucket_unpack_cpu(flat, tensors, scale);
}
void bucket_scale_cpu_op(at::TensorList tensors, double scale, std::string_view backend) {
  check_cpu_backend("bucket_scale_", backend, nullptr);
  bucket_scale_cpu(tensors, scale);
}
}  // namespace
}  // namespace lmk

TORCH_LIBRARY_IMPL(lmkernels, CPU, m) {
  m.impl("bucket_pack_", &lmk::bucket_pack_cpu_op);
  m.impl("bucket_unpack_", &lmk::bucket_unpack_cpu_op);
  m.impl("bucket_scale_", &lmk::bucket_scale_cpu_op);
}
