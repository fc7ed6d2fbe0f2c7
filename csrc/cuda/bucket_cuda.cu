// CUDA kernels of bucket_pack_, bucket_unpack_ and bucket_scale_: dst[i] = cast(src[i] * scale)
// over a list of runs (bucket.h).
//
// Launch: the host passes up to kRunsPerLaunch runs (src, dst, numel, first block) by value in
// the kernel's parameters (no device-side table to allocate or copy). Each run is cut into
// chunks of kChunk elements, one block per chunk, and block b finds its run by binary search
// over the first blocks; a bucket of many small gradients is one launch, and a large run gets
// as many blocks as it has chunks (a 25 MB fp32 bucket: 400 blocks), enough to keep every SM
// of an H100 streaming.
//
// Memory: each thread moves kVec = 8 elements per step as 16-byte accesses (LDG.E.128 /
// STG.E.128) when the run's source and destination both start on a 16-byte boundary, two
// steps' loads issued before their stores; other runs, and the last numel % 8 elements, go
// element by element (float64 runs: one step at a time). In place (bucket_scale_: src == dst) each element is read and written by
// one thread only, so the pointers are not __restrict__.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>
#include <type_traits>

#include "../bucket.h"

namespace lmk {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;                            // elements per thread per step
constexpr int64_t kChunk = 8 * kThreads * kVec;    // 16384 elements per block
constexpr int kRunsPerLaunch = 128;

struct RunTable {
  const void* src[kRunsPerLaunch];
  void* dst[kRunsPerLaunch];
  int64_t numel[kRunsPerLaunch];
  int first_block[kRunsPerLaunch];  // block index where run r starts; runs follow each other
  int runs;
};
static_assert(sizeof(RunTable) + sizeof(double) <= 4096,
              "copy_scale_cast_kernel's parameters exceed the 4 KB kernel-parameter limit");

template <typename T>
struct alignas(16) Pack {
  T v[kVec];
};

template <typename src_t, typename dst_t>
using opmath_t = std::conditional_t<std::is_same_v<src_t, double> || std::is_same_v<dst_t, double>,
                                    double, float>;

template <typename src_t, typename dst_t>
__device__ __forceinline__ Pack<dst_t> convert(const Pack<src_t>& in, opmath_t<src_t, dst_t> s) {
  Pack<dst_t> out;
#pragma unroll
  for (int j = 0; j < kVec; ++j)
    out.v[j] = static_cast<dst_t>(static_cast<opmath_t<src_t, dst_t>>(in.v[j]) * s);
  return out;
}

template <typename src_t, typename dst_t>
__global__ void __launch_bounds__(kThreads) copy_scale_cast_kernel(RunTable table, double scale) {
  using math_t = opmath_t<src_t, dst_t>;
  // Steps whose loads are in flight together: 2 (at least 32 B per thread); float64 moves 64 B
  // in one step already (and with 2, ptxas spilled the float64 -> float32 kernel on sm_90).
  constexpr int kUnroll = sizeof(src_t) == 8 || sizeof(dst_t) == 8 ? 1 : 2;
  // The run of this block: the last r with first_block[r] <= blockIdx.x.
  int lo = 0, hi = table.runs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.first_block[mid] <= int(blockIdx.x)) lo = mid; else hi = mid - 1;
  }
  const int64_t begin = int64_t(blockIdx.x - table.first_block[lo]) * kChunk;
  const int64_t n = min(kChunk, table.numel[lo] - begin);
  const src_t* src = static_cast<const src_t*>(table.src[lo]) + begin;
  dst_t* dst = static_cast<dst_t*>(table.dst[lo]) + begin;
  const math_t s = static_cast<math_t>(scale);

  // kChunk is a multiple of kVec: a run aligned at its start is aligned at every chunk.
  const bool vec = reinterpret_cast<uintptr_t>(table.src[lo]) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(table.dst[lo]) % 16 == 0;
  const int64_t n_vec = vec ? n / kVec * kVec : 0;
  constexpr int64_t kStep = int64_t(kThreads) * kVec;
  int64_t i = int64_t(threadIdx.x) * kVec;
  for (; i + (kUnroll - 1) * kStep < n_vec; i += kUnroll * kStep) {
    Pack<src_t> in[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) in[u] = *reinterpret_cast<const Pack<src_t>*>(src + i + u * kStep);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      *reinterpret_cast<Pack<dst_t>*>(dst + i + u * kStep) = convert<src_t, dst_t>(in[u], s);
  }
  for (; i < n_vec; i += kStep)
    *reinterpret_cast<Pack<dst_t>*>(dst + i) =
        convert<src_t, dst_t>(*reinterpret_cast<const Pack<src_t>*>(src + i), s);
  // Tail and misaligned runs: element by element.
  for (int64_t j = n_vec + threadIdx.x; j < n; j += kThreads)
    dst[j] = static_cast<dst_t>(static_cast<math_t>(src[j]) * s);
}

void run_plan(const BucketPlan& plan, double scale) {
  if (plan.segments.empty()) return;
  TORCH_CHECK(plan.device.is_cuda(), "bucket ops (CUDA kernel): tensors must be CUDA tensors; got ",
              plan.device);
  const c10::cuda::CUDAGuard guard(plan.device);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, plan.src_dtype, "bucket_src", [&] {
    using src_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, plan.dst_dtype, "bucket_dst", [&] {
      using dst_t = scalar_t;
      RunTable table;
      table.runs = 0;
      int64_t blocks = 0;
      auto flush = [&] {
        if (table.runs == 0) return;
        copy_scale_cast_kernel<src_t, dst_t><<<unsigned(blocks), kThreads, 0, stream>>>(table, scale);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        table.runs = 0;
        blocks = 0;
      };
      // A launch's blocks stay below 2^31 (first_block is an int; grid x allows 2^31 - 1).
      constexpr int64_t kMaxBlocks = std::numeric_limits<int>::max();
      for (const CopySegment& seg : plan.segments) {
        for (int64_t done = 0; done < seg.numel;) {
          if (table.runs == kRunsPerLaunch || blocks == kMaxBlocks) flush();
          // The whole rest of the run, or what fits in this launch (a multiple of kChunk).
          const int64_t take = std::min(seg.numel - done, (kMaxBlocks - blocks) * kChunk);
          const int r = table.runs++;
          table.src[r] = static_cast<const src_t*>(seg.src) + done;
          table.dst[r] = static_cast<dst_t*>(seg.dst) + done;
          table.numel[r] = take;
          table.first_block[r] = static_cast<int>(blocks);
          blocks += (take + kChunk - 1) / kChunk;
          done += take;
        }
      }
      flush();
    });
  });
}

}  // namespace

void bucket_pack_cuda(at::TensorList tensors, const at::Tensor& flat, double scale) {
  run_plan(plan_bucket_pack(tensors, flat), scale);
}

void bucket_unpack_cuda(const at::Tensor& flat, at::TensorList tensors, double scale) {
  run_plan(plan_bucket_unpack(flat, tensors), scale);
}

void bucket_scale_cuda(at::TensorList tensors, double scale) {
  run_plan(plan_bucket_scale(tensors), scale);
}

}  // namespace lmk
