"""The CUDA-tensor path of the attention ops, glue included: lmkernels.ops.attention(_varlen)
._fwd_triton / _bwd_triton (the C++ checks, then the Triton launchers, with the op's argument
order) run here on CPU tensors under the Triton interpreter and must agree with the C++ CPU op
on the same arguments. The launchers' maths is fuzzed in tests/test_triton_attention_*.py; this
catches an argument passed in the wrong place between the op and its launchers (softcap,
window, cu_seqlens, deterministic), which nothing else runs without a GPU."""
import importlib

import torch

dense_op = importlib.import_module("lmkernels.ops.attention")
varlen_op = importlib.import_module("lmkernels.ops.attention_varlen")

# (scale, is_causal, window_left, window_right, softcap): every argument differs from its default
ARGS = (0.3, True, 5, 1, 2.5)


def _close(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-4, atol=2e-5)


def test_dense_cuda_path_matches_the_cpu_op():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 9, 16, generator=g)
    k, v = (torch.randn(1, 2, 11, 16, generator=g) for _ in range(2))
    want = torch.ops.lmkernels.attention_fwd(q, k, v, *ARGS)
    got = dense_op._fwd_triton(q, k, v, *ARGS)
    _close(got, want)
    out, lse = want
    dout, dlse = torch.randn_like(out), torch.randn(lse.shape, generator=g)
    dlse[~torch.isfinite(lse)] = 0
    _close(dense_op._bwd_triton(dout, q, k, v, out, lse, dlse, *ARGS),
           torch.ops.lmkernels.attention_bwd(dout, q, k, v, out, lse, dlse, *ARGS))


def test_varlen_cuda_path_matches_the_cpu_op():
    g = torch.Generator().manual_seed(1)
    cu_q = torch.tensor([0, 7, 7, 8, 17], dtype=torch.int32)   # a 0- and a 1-token sequence
    cu_k = torch.tensor([0, 9, 12, 12, 23], dtype=torch.int32)
    q = torch.randn(17, 4, 16, generator=g)
    k, v = (torch.randn(23, 2, 16, generator=g) for _ in range(2))
    lengths = (cu_q, cu_k, 9, 11)
    want = torch.ops.lmkernels.attention_varlen_fwd(q, k, v, *lengths, *ARGS)
    _close(varlen_op._fwd_triton(q, k, v, *lengths, *ARGS), want)
    out, lse = want
    dout, dlse = torch.randn_like(out), torch.randn(lse.shape, generator=g)
    dlse[~torch.isfinite(lse)] = 0
    _close(varlen_op._bwd_triton(dout, q, k, v, out, lse, dlse, *lengths, *ARGS, True),
           torch.ops.lmkernels.attention_varlen_bwd(dout, q, k, v, out, lse, dlse, *lengths, *ARGS, True))
