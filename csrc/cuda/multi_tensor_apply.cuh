// A generic multi-tensor launcher: one kernel launch covers many tensors of many sizes.
//
// The launcher packs, into the kernel's parameter space, the addresses of `kLists` parallel
// tensor lists (e.g. param, grad, exp_avg, ...) for up to kMaxTensors tensors and a map from
// each thread block to its (tensor, chunk). A kernel launch is issued whenever either table
// fills up. The per-element maths is a functor:
//
//   struct F { __device__ void operator()(int64_t chunk_size, const TensorListMeta<N>& meta,
//                                         int tensor_slot, int64_t chunk, Args... args); };
//
// and the kernel calls it once per block. Tensors may be empty (skipped).
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstddef>
#include <limits>
#include <vector>

namespace lmk {

// Kernel parameters are limited to 4096 bytes (sm_70+ with CUDA >= 12.1 allows 32 KB, but
// the small limit keeps launches cheap and portable). The table takes kMetaBytes of them;
// the rest is left for the chunk size, the functor and its arguments (checked at compile
// time in multi_tensor_apply).
constexpr size_t kMaxKernelParamBytes = 4096;
constexpr size_t kMetaBytes = 3840;

template <int kLists>
struct TensorListMetaLimits {
  // Per tensor: kLists addresses, its numel and its index in the caller's lists.
  static constexpr size_t kBytesPerTensor = kLists * sizeof(void*) + sizeof(int64_t) + sizeof(int);
  static constexpr int kMaxTensors = kLists <= 4 ? 48 : 36;
  // Per block: its tensor slot (1 byte) and chunk (4 bytes); the blocks get what tensors leave.
  static constexpr int kMaxBlocks =
      static_cast<int>((kMetaBytes - kMaxTensors * kBytesPerTensor) / (1 + sizeof(int)));
  static_assert(kMaxTensors <= 256, "block_to_tensor holds a slot in one byte");
  static_assert(kMaxBlocks >= 128, "too many lists for the parameter budget");
};

template <int kLists>
struct TensorListMeta {
  using Limits = TensorListMetaLimits<kLists>;
  void* addresses[kLists][Limits::kMaxTensors];
  int64_t numel[Limits::kMaxTensors];
  int global_index[Limits::kMaxTensors];  // index of the tensor in the caller's lists
  unsigned char block_to_tensor[Limits::kMaxBlocks];
  int block_to_chunk[Limits::kMaxBlocks];
};

// Bytes of a kernel's parameter list (each parameter at its own alignment, as the ABI lays
// them out), for the static_assert below.
template <typename... Ts>
constexpr size_t param_bytes() {
  size_t offset = 0;
  ((offset = (offset + alignof(Ts) - 1) / alignof(Ts) * alignof(Ts) + sizeof(Ts)), ...);
  return offset;
}

template <int kLists, typename Functor, typename... Args>
__global__ void __launch_bounds__(512) multi_tensor_kernel(int64_t chunk_size, TensorListMeta<kLists> meta,
                                                           Functor functor, Args... args) {
  const int slot = meta.block_to_tensor[blockIdx.x];
  const int64_t chunk = meta.block_to_chunk[blockIdx.x];
  functor(chunk_size, meta, slot, chunk, args...);
}

// lists[k][i]: tensor i of list k; every list has the length of lists[0]. Tensors must be
// contiguous on the current device (callers check).
template <int kLists, typename Functor, typename... Args>
void multi_tensor_apply(int64_t chunk_size, int threads,
                        const std::vector<std::vector<at::Tensor>>& lists, Functor functor,
                        Args... args) {
  using Limits = TensorListMetaLimits<kLists>;
  static_assert(sizeof(TensorListMeta<kLists>) <= kMetaBytes, "tensor table over its budget");
  static_assert(param_bytes<int64_t, TensorListMeta<kLists>, Functor, Args...>() <= kMaxKernelParamBytes,
                "multi_tensor_kernel's parameters exceed the 4 KB kernel-parameter limit");
  TORCH_CHECK(lists.size() == kLists, "multi_tensor_apply: expected ", kLists, " lists");
  const size_t n = lists[0].size();
  if (n == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();

  TensorListMeta<kLists> meta;
  int slots = 0, blocks = 0;
  auto launch = [&]() {
    multi_tensor_kernel<kLists><<<blocks, threads, 0, stream>>>(chunk_size, meta, functor, args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  for (size_t t = 0; t < n; ++t) {
    const int64_t numel = lists[0][t].numel();
    if (numel == 0) continue;
    int slot = slots;
    for (int k = 0; k < kLists; ++k) meta.addresses[k][slot] = lists[k][t].data_ptr();
    meta.numel[slot] = numel;
    meta.global_index[slot] = static_cast<int>(t);
    const int64_t chunks = (numel + chunk_size - 1) / chunk_size;
    TORCH_CHECK(chunks <= std::numeric_limits<int>::max(), "multi_tensor_apply: tensor ", t,
                " has ", numel, " elements, more than ", chunk_size, " * 2^31 - 1");
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[blocks] = static_cast<unsigned char>(slot);
      meta.block_to_chunk[blocks] = static_cast<int>(c);
      if (++blocks == Limits::kMaxBlocks) {
        launch();
        blocks = 0;
        // Every pending block has run: the rest of this tensor continues from slot 0.
        for (int k = 0; k < kLists; ++k) meta.addresses[k][0] = meta.addresses[k][slot];
        meta.numel[0] = meta.numel[slot];
        meta.global_index[0] = meta.global_index[slot];
        slot = 0;
      }
    }
    slots = blocks == 0 ? 0 : slot + 1;  // no pending block: every slot is free again
    if (slots == Limits::kMaxTensors) {
      launch();
      blocks = 0;
      slots = 0;
    }
  }
  if (blocks > 0) launch();
}

}  // namespace lmk
