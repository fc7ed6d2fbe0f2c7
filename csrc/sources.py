"""The one list of lmkernels._C sources and flags, read by setup.py and CMakeLists.txt.

Layout: csrc/*.cpp hold op schemas (TORCH_LIBRARY_FRAGMENT) and the pybind11 module;
csrc/cpu/*.cpp the CPU kernels; csrc/cuda/*.cu the CUDA kernels.
Run as a script it prints the lists for CMake: `python csrc/sources.py cpp|cuda|simd`.
"""
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    root = os.path.dirname(HERE)
    return sorted(os.path.relpath(p, root) for p in paths)


def cpp_sources():
    return _rel(glob.glob(os.path.join(HERE, "*.cpp")) + glob.glob(os.path.join(HERE, "cpu", "*.cpp")))


def cuda_sources():
    return _rel(glob.glob(os.path.join(HERE, "cuda", "*.cu")))


def simd_level() -> str:
    """SIMD level for at::vec: LMK_SIMD if set, else what torch detects on this CPU."""
    level = os.environ.get("LMK_SIMD")
    if level is None:
        import torch

        level = torch.backends.cpu.get_cpu_capability()
    level = level.upper()
    return level if level in ("AVX2", "AVX512") else "DEFAULT"


def cpu_arch_flags():
    # at::vec picks its implementation from CPU_CAPABILITY_*; the inline namespace needs CPU_CAPABILITY.
    level = simd_level()
    flags = {
        "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
        "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
        "DEFAULT": [],
    }[level]
    return flags + ["-DCPU_CAPABILITY=" + level]


def extra_cuda_include_dirs():
    """CUDA library headers (cuBLAS, cuSPARSE...) that torch's CUDA headers include: a
    toolkit that has only nvcc finds them in the nvidia/cu13 (or cu12) pip wheel."""
    dirs = []
    try:
        import nvidia

        for base in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(base, "cu1*", "include")))
    except ImportError:
        pass
    return dirs


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "cpp":
        print(";".join(cpp_sources()))
    elif what == "cuda":
        print(";".join(cuda_sources()))
    elif what == "cxxflags":
        print(";".join(cpu_arch_flags()))
    elif what == "cudainc":
        print(";".join(extra_cuda_include_dirs()))
    else:
        sys.exit(f"unknown list {what!r}")
