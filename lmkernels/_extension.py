"""Loads the compiled extension lmkernels._C, which registers torch.ops.lmkernels.*."""
import functools

_BUILD_HINT = (
    "lmkernels._C is not built. Install the package from the repository root with\n"
    "    pip install --no-build-isolation -e .\n"
    "(after torch is installed; add LMK_CUDA=1 to force the CUDA kernels), or build in place with\n"
    "    python setup.py build_ext --inplace"
)


@functools.lru_cache(maxsize=None)
def load_extension():
    try:
        from lmkernels import _C
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(f"{_BUILD_HINT}\n(import failed with: {e})") from e
    return _C


def build_info() -> dict:
    """What this build contains: compiled backends, CUDA archs, SIMD level, torch version."""
    return dict(load_extension().build_info())


def has_cuda_kernels() -> bool:
    return "cuda" in build_info()["compiled_backends"]
