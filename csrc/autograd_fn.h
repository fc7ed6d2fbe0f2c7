// What the C++ autograd of the ops needs: torch::autograd::Function, and a typed handle to an
// lmkernels op in the dispatcher (so a backward calls the op itself, whatever device the
// tensors are on: the C++ CPU kernel, or the Triton launcher registered from Python for CUDA).
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <string>

namespace lmk {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow((std::string("lmkernels::") + name).c_str(), "")
      .template typed<Signature>();
}

}  // namespace lmk
