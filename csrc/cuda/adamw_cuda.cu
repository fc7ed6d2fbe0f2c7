// CUDA kernel of fused_adamw_: the Adam functor plugged into multi_tensor_apply. The maths
// is the CPU kernel's (csrc/cpu/adamw_cpu.cpp), in fp32; each thread handles kILP elements
// with 16-byte-or-narrower vector loads when every list's chunk is aligned, so the kernel
// streams at close to copy bandwidth.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../adamw.h"
#include "multi_tensor_apply.cuh"

namespace lmk {
namespace {

constexpr int kLists = 7;  // param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, step
constexpr int kILP = 4;
constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;

struct Hyper {
  double lr, beta1, beta2;  // for the bias corrections, formed in double once per block
  double eps;
  float one_minus_beta1, one_minus_beta2, weight_decay;  // 1 - beta formed in double
  bool amsgrad, maximize, adam_w_mode, master, stochastic_rounding;
  uint32_t seed;
};

template <typename T>
struct alignas(sizeof(T) * kILP) Pack {
  T v[kILP];
};

template <typename T>
__device__ __forceinline__ void load(float (&out)[kILP], const T* p, int64_t i, int64_t end, bool vec) {
  if (vec) {
    Pack<T> pk = *reinterpret_cast<const Pack<T>*>(p + i);
#pragma unroll
    for (int j = 0; j < kILP; ++j) out[j] = static_cast<float>(pk.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kILP; ++j) out[j] = i + j < end ? static_cast<float>(p[i + j]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store(T* p, const float (&in)[kILP], int64_t i, int64_t end, bool vec) {
  if (vec) {
    Pack<T> pk;
#pragma unroll
    for (int j = 0; j < kILP; ++j) pk.v[j] = static_cast<T>(in[j]);
    *reinterpret_cast<Pack<T>*>(p + i) = pk;
  } else {
#pragma unroll
    for (int j = 0; j < kILP; ++j)
      if (i + j < end) p[i + j] = static_cast<T>(in[j]);
  }
}

__device__ __forceinline__ c10::BFloat16 round_stochastic(float x, uint32_t rnd) {
  if (!isfinite(x)) return c10::BFloat16(x);
  const uint32_t bits = __float_as_uint(x) + (rnd >> 16);  // the hash's high half
  return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
}

template <typename param_t, typename state_t>
struct AdamFunctor {
  __device__ void operator()(int64_t chunk_size, const TensorListMeta<kLists>& meta, int slot,
                             int64_t chunk, Hyper h, const float* lr_ptr,
                             const float* inv_scale_ptr, const float* found_inf_ptr) const {
    // A GradScaler found inf/NaN gradients: the step changes nothing.
    if (found_inf_ptr != nullptr && *found_inf_ptr != 0.f) return;
    const double lr_d = lr_ptr != nullptr ? double(*lr_ptr) : h.lr;
    const float lr = static_cast<float>(lr_d);
    const float inv_scale = inv_scale_ptr != nullptr ? *inv_scale_ptr : 1.f;
    const float step = *static_cast<const float*>(meta.addresses[6][slot]);
    // Bias corrections in double: 1 - beta2^t is a small difference that fp32 gets 1e-5 wrong.
    // Folded as on the CPU: (lr sqrt(bc2) / bc1) * m / (sqrt(v) + eps sqrt(bc2)).
    const double bc2_sqrt = sqrt(1.0 - pow(h.beta2, double(step)));
    const float step_size = static_cast<float>(lr_d * bc2_sqrt / (1.0 - pow(h.beta1, double(step))));
    const float eps_hat = static_cast<float>(h.eps * bc2_sqrt);
    const float decay = h.adam_w_mode ? 1.f - lr * h.weight_decay : 1.f;
    const float l2 = h.adam_w_mode ? 0.f : h.weight_decay;
    const float gsign = h.maximize ? -inv_scale : inv_scale;
    const float beta2 = static_cast<float>(h.beta2);

    auto* P = static_cast<param_t*>(meta.addresses[0][slot]);
    auto* G = static_cast<const param_t*>(meta.addresses[1][slot]);
    auto* M = static_cast<state_t*>(meta.addresses[2][slot]);
    auto* V = static_cast<state_t*>(meta.addresses[3][slot]);
    auto* X = static_cast<state_t*>(meta.addresses[4][slot]);
    auto* W = static_cast<float*>(meta.addresses[5][slot]);
    const int64_t begin = chunk * chunk_size;
    const int64_t end = min(meta.numel[slot], begin + chunk_size);
    const uint32_t tensor_index = static_cast<uint32_t>(meta.global_index[slot]);

    auto aligned = [](const void* ptr, int bytes) {
      return reinterpret_cast<uintptr_t>(ptr) % (bytes * kILP) == 0;
    };
    const bool vec = (end - begin) % kILP == 0 && begin % kILP == 0 &&
                     aligned(P, sizeof(param_t)) && aligned(G, sizeof(param_t)) &&
                     aligned(M, sizeof(state_t)) && aligned(V, sizeof(state_t)) &&
                     (!h.amsgrad || aligned(X, sizeof(state_t))) && (!h.master || aligned(W, 4));

    for (int64_t i = begin + int64_t(threadIdx.x) * kILP; i < end; i += int64_t(blockDim.x) * kILP) {
      float p[kILP], g[kILP], m[kILP], v[kILP], x[kILP];
      if (h.master) load(p, W, i, end, vec); else load(p, P, i, end, vec);
      load(g, G, i, end, vec);
      load(m, M, i, end, vec);
      load(v, V, i, end, vec);
      if (h.amsgrad) load(x, X, i, end, vec);
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        float gj = g[j] * gsign;
        gj = fmaf(l2, p[j], gj);
        p[j] *= decay;
        m[j] = fmaf(h.one_minus_beta1, gj - m[j], m[j]);
        v[j] = fmaf(h.one_minus_beta2 * gj, gj, v[j] * beta2);
        float vden = v[j];
        if (h.amsgrad) vden = x[j] = fmaxf(x[j], v[j]);
        p[j] = fmaf(-step_size, m[j] / (sqrtf(vden) + eps_hat), p[j]);
      }
      store(M, m, i, end, vec);
      store(V, v, i, end, vec);
      if (h.amsgrad) store(X, x, i, end, vec);
      if (h.master) store(W, p, i, end, vec);
      if constexpr (std::is_same_v<param_t, c10::BFloat16>) {
        if (h.stochastic_rounding) {
#pragma unroll
          for (int j = 0; j < kILP; ++j)
            if (i + j < end)
              P[i + j] = round_stochastic(p[j], sr_hash(h.seed, tensor_index, uint32_t(i + j)));
          continue;
        }
      }
      store(P, p, i, end, vec);
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

void fused_adamw_cuda(LMK_ADAMW_PARAMS) {
  const AdamWArgs a = LMK_ADAMW_ARGS;
  check_adamw_args(a);
  if (params.empty()) return;
  TORCH_CHECK(params[0].is_cuda(), "fused_adamw_ (CUDA kernel): params must be CUDA tensors");
  const Hyper h{lr, beta1, beta2, eps, float(1.0 - beta1), float(1.0 - beta2),
                float(weight_decay), amsgrad,
                maximize, adam_w_mode, !master_params.empty(), stochastic_rounding_seed >= 0,
                static_cast<uint32_t>(stochastic_rounding_seed & 0xFFFFFFFF)};
  const bool state_f32 = exp_avgs[0].scalar_type() == at::kFloat;
  switch (params[0].scalar_type()) {
    case at::kFloat: return launch<float, float>(a, h);
    case at::kBFloat16:
      return state_f32 ? launch<c10::BFloat16, float>(a, h) : launch<c10::BFloat16, c10::BFloat16>(a, h);
    case at::kHalf:
      return state_f32 ? launch<c10::Half, float>(a, h) : launch<c10::Half, c10::Half>(a, h);
    default: TORCH_CHECK(false, "unreachable: dtype checked above");
  }
}

}  // namespace
}  // namespace lmk

TORCH_LIBRARY_IMPL(lmkernels, CUDA, m) { m.impl("fused_adamw_", &lmk::fused_adamw_cuda); }
