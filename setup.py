"""Builds lmkernels._C from csrc/ with torch.utils.cpp_extension (ninja).

C++ CPU sources are always built. CUDA sources are built when torch has CUDA and
nvcc is found, or when LMK_CUDA=1 forces it (LMK_CUDA=0 skips them). DEBUG=1 adds -g.
The source list comes from csrc/sources.py, which CMakeLists.txt reads too.
"""
import os
import sys

from setuptools import find_packages, setup
from torch.utils import cpp_extension

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
import sources  # noqa: E402  (csrc/sources.py: the one list of sources)


def want_cuda() -> bool:
    forced = os.environ.get("LMK_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    debug = os.environ.get("DEBUG") == "1"
    # Python's own CFLAGS carry -g; -g0 after them drops the debug info (halves build time).
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    cxx = opt + ["-fopenmp"]  # the C++ standard: whatever torch.utils.cpp_extension picks for this torch
    cxx += sources.cpu_arch_flags()
    srcs = sources.cpp_sources()
    if want_cuda():
        srcs += sources.cuda_sources()
        # No --use_fast_math: it turns sqrtf and '/' into approximations and flushes denormals
        # (a v = g^2 below 1e-38 becomes 0), so the AdamW kernel could no longer match the CPU
        # kernel and torch to within the fp32 error rule; the kernels are memory-bound, so
        # IEEE sqrt/div cost them nothing measurable.
        nvcc = opt[:1] + ["-lineinfo", "--expt-relaxed-constexpr"]
        include_dirs = sources.extra_cuda_include_dirs()
        # Recorded in build_info; '+' separates archs so the value survives as one macro token.
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "torch-default").replace(";", "+").replace(" ", "+")
        nvcc.append(f"-DLMK_CUDA_ARCHS={archs}")
        cxx = cxx + [f"-DLMK_CUDA_ARCHS={archs}"]
        return cpp_extension.CUDAExtension(
            "lmkernels._C", srcs, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DLMK_WITH_CUDA=1"], "nvcc": nvcc + ["-DLMK_WITH_CUDA=1"]},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "lmkernels._C", srcs, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
    )


setup(
    name="lmkernels",
    version="0.1.0",
    packages=find_packages(include=["lmkernels", "lmkernels.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": [
        "lmkernels-train=lmkernels.train.__main__:main",
        "lmkernels-sample=lmkernels.train.sample:main",
        "lmkernels-export=lmkernels.train.export:main",
    ]},
    extras_require={"hf": ["transformers>=5.0", "safetensors"]},
    python_requires=">=3.10",
    # Runtime requirements. Every range admits the torch already installed (GPU machines: 2.11,
    # dev: 2.13), so `pip install --no-build-isolation .` never swaps torch for another build;
    # install.sh passes --no-deps anyway. triton: the GPU kernels and their CPU interpreter.
    install_requires=["torch>=2.11", "triton>=3.6", "numpy"],
)
