// The pybind11 entry of lmkernels._C. The ops themselves register through
// TORCH_LIBRARY_FRAGMENT(lmkernels, ...) in their own files (one schema per op, csrc/<op>.cpp),
// so loading this module is what makes torch.ops.lmkernels.* exist.
#include <torch/extension.h>

#define LMK_STR2(x) #x
#define LMK_STR(x) LMK_STR2(x)

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  pybind11::list backends;
  backends.append("cpu");
#ifdef LMK_WITH_CUDA
  backends.append("cuda");
#endif
  info["compiled_backends"] = backends;
  info["simd"] = LMK_STR(CPU_CAPABILITY);
#ifdef LMK_WITH_CUDA
  info["cuda_archs"] = std::string(LMK_STR(LMK_CUDA_ARCHS));
#else
  info["cuda_archs"] = std::string();
#endif
  info["torch_version"] = std::string(TORCH_VERSION);
  info["openmp_threads"] = at::get_num_threads();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lmkernels compiled kernels; the ops live under torch.ops.lmkernels";
  m.def("build_info", &build_info, "What this build of lmkernels._C contains");
}
