// CUDA kernel of fused_adamw_: the Adam functor plugged into multi_tensor_apply. The maths
// is the CPU kernel's (csrc/cpu/adamw_cpu.cpp), in fp32.
//
// Memory: each thread moves kILP = 8 elements of every list per step, as 16-byte accesses
// (LDG.E.128 / STG.E.128: one for bf16/fp16, two for fp32) when every list's chunk starts on
// a 16-byte boundary; otherwise, and for the last numel % 8 elements, element by element.
// A chunk is 16384 elements (4 steps of 512 threads x 8): a 1M-element tensor spreads over 64
// blocks, and a launch (up to 278 blocks) keeps every SM of an H100 busy.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "../adamw.h"
#include "multi_tensor_apply.cuh"

namespace lmk {
namespace {

constexpr int kLists = 7;  // param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, step
constexpr int kILP = 8;
constexpr int kThreads = 512;
constexpr int64_t kChunk = 4 * kThreads * kILP;  // 16384 elements per block

struct Hyper {
  double lr, beta1, beta2;  // for the bias corrections, formed in double once per block
  double eps;
  float one_minus_beta1, one_minus_beta2, weight_decay;  // 1 - beta formed in double
  bool amsgrad, maximize, adam_w_mode, master, stochastic_rounding;
  uint32_t seed;
};

// kILP elements of T as one unit: 16 bytes (bf16/fp16) or 32 (fp32, two 16-byte accesses).
template <typename T>
struct alignas(16) Pack {
  T v[kILP];
};

template <typename T>
__device__ __forceinline__ void load_vec(float (&out)[kILP], const T* p) {
  const Pack<T> pk = *reinterpret_cast<const Pack<T>*>(p);
#pragma unroll
  for (int j = 0; j < kILP; ++j) out[j] = static_cast<float>(pk.v[j]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[kILP]) {
  Pack<T> pk;
#pragma unroll
  for (int j = 0; j < kILP; ++j) pk.v[j] = static_cast<T>(in[j]);
  *reinterpret_cast<Pack<T>*>(p) = pk;
}

// Element-wise versions for the tail and for misaligned tensors: elements i.. below end.
template <typename T>
__device__ __forceinline__ void load_tail(float (&out)[kILP], const T* p, int64_t i, int64_t end) {
#pragma unroll
  for (int j = 0; j < kILP; ++j) out[j] = i + j < end ? static_cast<float>(p[i + j]) : 0.f;
}

template <typename T>
__device__ __forceinline__ void store_tail(T* p, const float (&in)[kILP], int64_t i, int64_t end) {
#pragma unroll
  for (int j = 0; j < kILP; ++j)
    if (i + j < end) p[i + j] = static_cast<T>(in[j]);
}

__device__ __forceinline__ c10::BFloat16 round_stochastic(float x, uint32_t rnd) {
  if (!isfinite(x)) return c10::BFloat16(x);
  const uint32_t bits = __float_as_uint(x) + (rnd >> 16);  // the hash's high half
  return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Per-block constants of the update (one tensor, one step count).
struct StepConsts {
  float step_size, eps_hat, decay, l2, gsign;
};

template <typename param_t, typename state_t>
struct AdamFunctor {
  // The update of kILP elements held in registers (x: max_exp_avg_sq, read only with amsgrad).
  __device__ __forceinline__ static void update(float (&p)[kILP], const float (&g)[kILP],
                                                float (&m)[kILP], float (&v)[kILP],
                                                float (&x)[kILP], const Hyper& h,
                                                const StepConsts& c) {
    const float beta2 = static_cast<float>(h.beta2);
#pragma unroll
    for (int j = 0; j < kILP; ++j) {
      float gj = g[j] * c.gsign;
      gj = fmaf(c.l2, p[j], gj);
      p[j] *= c.decay;
      m[j] = fmaf(h.one_minus_beta1, gj - m[j], m[j]);
      v[j] = fmaf(h.one_minus_beta2 * gj, gj, v[j] * beta2);
      float vden = v[j];
      if (h.amsgrad) vden = x[j] = fmaxf(x[j], v[j]);
      p[j] = fmaf(-c.step_size, m[j] / (sqrtf(vden) + c.eps_hat), p[j]);
    }
  }

  __device__ void operator()(int64_t chunk_size, const TensorListMeta<kLists>& meta, int slot,
                             int64_t chunk, Hyper h, const float* lr_ptr,
                             const float* inv_scale_ptr, const float* found_inf_ptr) const {
    // A GradScaler found inf/NaN gradients: the step changes nothing.
    if (found_inf_ptr != nullptr && *found_inf_ptr != 0.f) return;
    // Bias corrections in double, once per block (fp64 is slow on consumer GPUs): 1 - beta2^t
    // is a small difference that fp32 gets 1e-5 wrong. Folded as on the CPU:
    // (lr sqrt(bc2) / bc1) * m / (sqrt(v) + eps sqrt(bc2)).
    __shared__ StepConsts shared;
    if (threadIdx.x == 0) {
      const double lr_d = lr_ptr != nullptr ? double(*lr_ptr) : h.lr;
      const float lr = static_cast<float>(lr_d);
      const float inv_scale = inv_scale_ptr != nullptr ? *inv_scale_ptr : 1.f;
      const double step = *static_cast<const float*>(meta.addresses[6][slot]);
      const double bc2_sqrt = sqrt(1.0 - pow(h.beta2, step));
      shared.step_size = static_cast<float>(lr_d * bc2_sqrt / (1.0 - pow(h.beta1, step)));
      shared.eps_hat = static_cast<float>(h.eps * bc2_sqrt);
      shared.decay = h.adam_w_mode ? 1.f - lr * h.weight_decay : 1.f;
      shared.l2 = h.adam_w_mode ? 0.f : h.weight_decay;
      shared.gsign = h.maximize ? -inv_scale : inv_scale;
    }
    __syncthreads();
    const StepConsts c = shared;

    // No __restrict__: master (W) may be absent and then aliases P's slot, and unread lists
    // alias read ones (see launch()).
    auto* P = static_cast<param_t*>(meta.addresses[0][slot]);
    auto* G = static_cast<const param_t*>(meta.addresses[1][slot]);
    auto* M = static_cast<state_t*>(meta.addresses[2][slot]);
    auto* V = static_cast<state_t*>(meta.addresses[3][slot]);
    auto* X = static_cast<state_t*>(meta.addresses[4][slot]);
    auto* W = static_cast<float*>(meta.addresses[5][slot]);
    const int64_t begin = chunk * chunk_size;
    const int64_t end = min(meta.numel[slot], begin + chunk_size);
    const uint32_t tensor_index = static_cast<uint32_t>(meta.global_index[slot]);
    const bool sr = std::is_same_v<param_t, c10::BFloat16> && h.stochastic_rounding;

    // chunk_size is a multiple of kILP, so a 16-byte-aligned tensor is aligned at every step.
    const bool vec = aligned16(P) && aligned16(G) && aligned16(M) && aligned16(V) &&
                     (!h.amsgrad || aligned16(X)) && (!h.master || aligned16(W));
    const int64_t vec_end = vec ? begin + (end - begin) / kILP * kILP : begin;
    const int64_t stride = int64_t(blockDim.x) * kILP;
    float p[kILP], g[kILP], m[kILP], v[kILP], x[kILP];

    // Main path: 16-byte loads and stores.
    for (int64_t i = begin + int64_t(threadIdx.x) * kILP; i < vec_end; i += stride) {
      if (h.master) load_vec(p, W + i); else load_vec(p, P + i);
      load_vec(g, G + i);
      load_vec(m, M + i);
      load_vec(v, V + i);
      if (h.amsgrad) load_vec(x, X + i);
      update(p, g, m, v, x, h, c);
      store_vec(M + i, m);
      store_vec(V + i, v);
      if (h.amsgrad) store_vec(X + i, x);
      if (h.master) store_vec(W + i, p);
      if constexpr (std::is_same_v<param_t, c10::BFloat16>) {
        if (sr) {
          Pack<c10::BFloat16> pk;
#pragma unroll
          for (int j = 0; j < kILP; ++j)
            pk.v[j] = round_stochastic(p[j], sr_hash(h.seed, tensor_index, uint32_t(i + j)));
          *reinterpret_cast<Pack<c10::BFloat16>*>(P + i) = pk;
          continue;
        }
      }
      store_vec(P + i, p);
    }

    // Tail (and misaligned tensors): element by element.
    for (int64_t i = vec_end + int64_t(threadIdx.x) * kILP; i < end; i += stride) {
      if (h.master) load_tail(p, W, i, end); else load_tail(p, P, i, end);
      load_tail(g, G, i, end);
      load_tail(m, M, i, end);
      load_tail(v, V, i, end);
      if (h.amsgrad) load_tail(x, X, i, end);
      update(p, g, m, v, x, h, c);
      store_tail(M, m, i, end);
      store_tail(V, v, i, end);
      if (h.amsgrad) store_tail(X, x, i, end);
      if (h.master) store_tail(W, p, i, end);
      if constexpr (std::is_same_v<param_t, c10::BFloat16>) {
        if (sr) {
#pragma unroll
          for (int j = 0; j < kILP; ++j)
            if (i + j < end)
              P[i + j] = round_stochastic(p[j], sr_hash(h.seed, tensor_index, uint32_t(i + j)));
          continue;
        }
      }
      store_tail(P, p, i, end);
    }
  }
};

template <typename param_t, typename state_t>
void launch(const AdamWArgs& a, const Hyper& h) {
  const size_t n = a.params.size();
  std::vector<std::vector<at::Tensor>> lists(kLists);
  for (size_t i = 0; i < n; ++i) {
    lists[0].push_back(a.params[i]);
    lists[1].push_back(a.grads[i]);
    lists[2].push_back(a.exp_avgs[i]);
    lists[3].push_back(a.exp_avg_sqs[i]);
    lists[4].push_back(h.amsgrad ? a.max_exp_avg_sqs[i] : a.exp_avg_sqs[i]);  // unread without amsgrad
    lists[5].push_back(h.master ? a.master_params[i] : a.params[i]);           // unread without master
    lists[6].push_back(a.state_steps[i]);
  }
  auto ptr = [](const std::optional<at::Tensor>& t) -> const float* {
    return t ? t->data_ptr<float>() : nullptr;
  };
  multi_tensor_apply<kLists>(kChunk, kThreads, lists, AdamFunctor<param_t, state_t>(), h,
                             ptr(a.lr_tensor), ptr(a.inv_scale), ptr(a.found_inf));
}

}  // namespace

void fused_adamw_cuda(const AdamWArgs& a) {
  const at::Device device = check_adamw_args(a);
  if (a.params.empty()) return;
  TORCH_CHECK(device.is_cuda(), "fused_adamw_ (CUDA kernel): params must be CUDA tensors; got ",
              device);
  const c10::cuda::CUDAGuard guard(device);
  const Hyper h{a.lr, a.beta1, a.beta2, a.eps, float(1.0 - a.beta1), float(1.0 - a.beta2),
                float(a.weight_decay), a.amsgrad, a.maximize, a.adam_w_mode,
                !a.master_params.empty(), a.stochastic_rounding_seed >= 0,
                static_cast<uint32_t>(a.stochastic_rounding_seed & 0xFFFFFFFF)};
  const bool state_f32 = a.exp_avgs[0].scalar_type() == at::kFloat;
  switch (a.params[0].scalar_type()) {
    case at::kFloat: return launch<float, float>(a, h);
    case at::kBFloat16:
      return state_f32 ? launch<c10::BFloat16, float>(a, h) : launch<c10::BFloat16, c10::BFloat16>(a, h);
    case at::kHalf:
      return state_f32 ? launch<c10::Half, float>(a, h) : launch<c10::Half, c10::Half>(a, h);
    default: TORCH_CHECK(false, "unreachable: dtype checked above");
  }
}

}  // namespace lmk
