"""One description of a Triton kernel launch, shared by the launchers and the compile gate.

A launcher never writes `kernel[grid](...)` with its own argument list. It calls a builder in its
module that returns a `Launch` (kernel, positional args, keyword args: constexprs and launch
options) and runs it: `launch.run(grid)`. Each `lmkernels/triton/<op>.py` also has
`compile_specs()`, which calls the *same* builders with `ArgTensor` stand-ins (a dtype and an
address, no memory) for every specialization the launcher can produce, and yields `CompileSpec`s.
`python -m lmkernels.gpu_compile_check` binds each launch with Triton's own binder for a chosen
GPU target, so the signature, constexprs and alignment attributes it compiles are exactly those
of a real launch: the gate cannot drift from the launchers.

Autotuned kernels: `Launch.kernel` is the `triton.autotune` object; the op module passes
`configs=` (the configs that can run for these arguments on a given shared-memory budget, from
the same pruning function the autotuner uses) so the gate compiles each one.

To add a kernel: write a builder `_<kernel>_launch(...) -> Launch`, call it from the launcher,
and yield a `CompileSpec` per specialization from `compile_specs()`; add the module to
`KERNEL_MODULES` below.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

# The modules whose compile_specs() the gate runs.
KERNEL_MODULES = (
    "lmkernels.triton.adamw",
    "lmkernels.triton.attention",
    "lmkernels.triton.attention_varlen",
    "lmkernels.triton.rms_norm",
    "lmkernels.triton.rotary_embedding",
    "lmkernels.triton.swiglu",
    "lmkernels.triton.fused_linear_cross_entropy",
)


@dataclass(frozen=True)
class ArgTensor:
    """Stands in for a tensor argument when only its dtype, alignment, shape and strides matter
    (what Triton specializes on, and what builders read): `data_ptr() % 16 == 0` unless an
    unaligned address is given; strides default to contiguous."""

    dtype: torch.dtype
    address: int = 1 << 20
    shape: tuple = ()
    strides: Optional[tuple] = None

    def data_ptr(self) -> int:
        return self.address

    def stride(self, dim: Optional[int] = None):
        strides = self.strides
        if strides is None:
            strides, n = [], 1
            for size in reversed(self.shape):
                strides.insert(0, n)
                n *= size
            strides = tuple(strides)
        return strides if dim is None else strides[dim]

    def size(self, dim: Optional[int] = None):
        return self.shape if dim is None else self.shape[dim]


@dataclass
class Launch:
    """One kernel call: `kernel[grid](*args, **kwargs)`. kwargs hold the constexprs the launcher
    picks and the launch options (num_warps, num_stages); an autotuner adds its config's."""

    kernel: Any  # a triton JITFunction, or a triton.autotune Autotuner wrapping one
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def run(self, grid):
        return self.kernel[grid](*self.args, **self.kwargs)

    @property
    def jit_function(self):
        """The @triton.jit function under any autotune/heuristics wrappers."""
        from triton.runtime.autotuner import Autotuner, Heuristics

        fn = self.kernel
        while isinstance(fn, (Autotuner, Heuristics)):
            fn = fn.fn
        return fn

    def named_args(self) -> dict:
        names = self.jit_function.arg_names
        return dict(zip(names, self.args))


@dataclass
class CompileSpec:
    """One row family of the gate: a launch and the rules its cubin must meet.

    configs: for an autotuned launch, the autotune configs the gate compiles, as a function of the
    arch's shared-memory budget in bytes (the launcher prunes with the same function at run time).
    no_spills: the cubin must not spill (stack bytes == 0).
    vector_loads: the PTX must contain 16-byte global loads (ld.global.v4.b32 / .v2.b64)."""

    name: str
    launch: Launch
    configs: Optional[Callable[[int], Sequence[Any]]] = None
    no_spills: bool = False
    vector_loads: bool = False
    notes: str = ""  # shown in the gate's table
