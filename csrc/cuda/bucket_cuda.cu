// CUDA kernels of bucket_pack_, bucket_unpack_ and bucket_scale_: dst[i] = cast(src[i] * scale)
// over a list of runs (bucket.h). Self-contained multi-tensor launch: the host cuts the runs
// into chunks of kChunk elements and passes up to kBlocksPerLaunch (src, dst, length) triples
// by value in the kernel's parameters (no device-side table to allocate or copy); block b
// copies chunk b. A bucket of many small gradients is a handful of launches instead of one
// per tensor.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../bucket.h"

namespace lmk {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;                      // independent loads in flight per thread
constexpr int64_t kChunk = 16 * kThreads * kPerThread;  // 16384 elements per block
constexpr int kBlocksPerLaunch = 160;              // 160 * 20 B of triples < 4 KB of parameters

struct ChunkTable {
  const void* src[kBlocksPerLaunch];
  void* dst[kBlocksPerLaunch];
  int len[kBlocksPerLaunch];
};

template <typename src_t, typename dst_t>
__global__ void __launch_bounds__(kThreads) copy_scale_cast_kernel(ChunkTable table, double scale) {
  using opmath_t = std::conditional_t<std::is_same_v<src_t, double> || std::is_same_v<dst_t, double>,
                                      double, float>;
  const src_t* __restrict__ src = static_cast<const src_t*>(table.src[blockIdx.x]);
  dst_t* __restrict__ dst = static_cast<dst_t*>(table.dst[blockIdx.x]);
  const int n = table.len[blockIdx.x];
  const opmath_t s = static_cast<opmath_t>(scale);
  for (int base = 0; base < n; base += kThreads * kPerThread) {
    opmath_t v[kPerThread];
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {  // all loads first, then all stores (in place is safe:
      const int i = base + k * kThreads + threadIdx.x;  // each element is owned by one thread)
      v[k] = i < n ? static_cast<opmath_t>(src[i]) * s : opmath_t(0);
    }
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int i = base + k * kThreads + threadIdx.x;
      if (i < n) dst[i] = static_cast<dst_t>(v[k]);
    }
  }
}

void run_plan(const BucketPlan& plan, double scale) {
  if (plan.segments.empty()) return;
  TORCH_CHECK(plan.device.is_cuda(), "bucket ops (CUDA kernel): tensors must be CUDA tensors; got ",
              plan.device);
  c10::cuda::CUDAGuard guard(plan.device);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, plan.src_dtype, "bucket_src", [&] {
    using src_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, plan.dst_dtype, "bucket_dst", [&] {
      using dst_t = scalar_t;
      ChunkTable table;
      int used = 0;
      auto flush = [&] {
        if (used == 0) return;
        copy_scale_cast_kernel<src_t, dst_t><<<used, kThreads, 0, stream>>>(table, scale);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        used = 0;
      };
      for (const CopySegment& seg : plan.segments) {
        for (int64_t b = 0; b < seg.numel; b += kChunk) {
          table.src[used] = static_cast<const src_t*>(seg.src) + b;
          table.dst[used] = static_cast<dst_t*>(seg.dst) + b;
          table.len[used] = static_cast<int>(std::min(kChunk, seg.numel - b));
          if (++used == kBlocksPerLaunch) flush();
        }
      }
      flush();
    });
  });
}

void bucket_pack_cuda(at::TensorList tensors, const at::Tensor& flat, double scale) {
  run_plan(plan_bucket_pack(tensors, flat), scale);
}

void bucket_unpack_cuda(const at::Tensor& flat, at::TensorList tensors, double scale) {
  run_plan(plan_bucket_unpack(flat, tensors), scale);
}

void bucket_scale_cuda(at::TensorList tensors, double scale) {
  run_plan(plan_bucket_scale(tensors), scale);
}

}  // namespace
}  // namespace lmk

TORCH_LIBRARY_IMPL(lmkernels, CUDA, m) {
  m.impl("bucket_pack_", &lmk::bucket_pack_cuda);
  m.impl("bucket_unpack_", &lmk::bucket_unpack_cuda);
  m.impl("bucket_scale_", &lmk::bucket_scale_cuda);
}
