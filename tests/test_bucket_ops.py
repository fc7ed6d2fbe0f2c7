"""bucket_pack_ / bucket_unpack_ / bucket_scale_ against the float64 reference (C++ CPU kernel
here; the CUDA kernel under -m gpu). Tolerance: the op's error against float64 may be at most
twice that of plain PyTorch doing the same scale-and-cast in the same dtypes."""
import re

import pytest
import torch

from lmkernels.ops import bucket as bucket_op
from lmkernels.ops.bucket import bucket_pack_, bucket_scale_, bucket_unpack_
from lmkernels.reference.bucket import (bucket_pack_reference_, bucket_scale_reference_,
                                        bucket_unpack_reference_)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Awkward sizes, an empty tensor, and one larger than a CPU work item (32768) and a CUDA chunk.
SIZES = [(1,), (17,), (0,), (97, 3), (1025,), (5, 7, 11), (40000,)]


def _inputs(dtype, device="cpu", sizes=SIZES):
    return [(torch.randn(s, dtype=torch.float64, device=device) * 3).to(dtype) for s in sizes]


def _err(x, ref):
    return (x.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def _torch_pack(tensors, dtype, scale):
    """Plain PyTorch: scale in the source dtype, then cast."""
    return torch.cat([t.reshape(-1) * scale for t in tensors]).to(dtype)


@pytest.mark.parametrize("src", DTYPES)
@pytest.mark.parametrize("dst", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 1.0 / 3.0])
def test_pack_unpack_match_reference(src, dst, scale, device="cpu"):
    tensors = _inputs(src, device)
    total = sum(t.numel() for t in tensors)
    flat = torch.full((total,), float("nan"), dtype=dst, device=device)
    bucket_pack_(tensors, flat, scale)
    ref = torch.empty(total, dtype=torch.float64, device=device)
    bucket_pack_reference_(tensors, ref, scale)
    plain = _torch_pack(tensors, dst, scale)
    assert _err(flat, ref) <= 2 * _err(plain, ref), (_err(flat, ref), _err(plain, ref))
    assert not flat.isnan().any()

    outs = [torch.full_like(t, float("nan")) for t in tensors]
    bucket_unpack_(flat, outs, scale)
    refs = [torch.empty(t.shape, dtype=torch.float64, device=device) for t in tensors]
    bucket_unpack_reference_(flat, refs, scale)
    offset = 0
    for out, r, t in zip(outs, refs, tensors):
        piece = flat[offset:offset + t.numel()]
        plain = (piece * scale).to(src).view(t.shape)
        assert _err(out, r) <= 2 * _err(plain, r), (t.shape, _err(out, r), _err(plain, r))
        offset += t.numel()


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_exact(dtype):
    """Pack then unpack at scale 1 in a wider-or-equal dtype gives the inputs back bit for bit."""
    tensors = _inputs(dtype)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=wide)
    bucket_pack_(tensors, flat)
    outs = [torch.empty_like(t) for t in tensors]
    bucket_unpack_(flat, outs)
    for a, b in zip(outs, tensors):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_in_place(dtype):
    tensors = _inputs(dtype)
    refs = [t.double() for t in tensors]
    plain = [t * 0.125 for t in tensors]  # exact power of two: plain torch is exact too
    bucket_scale_(tensors, 0.125)
    bucket_scale_reference_(refs, 0.125)
    for t, r, p in zip(tensors, refs, plain):
        assert _err(t, r) <= 2 * _err(p, r)
    tensors = _inputs(dtype)
    refs = [t.double() for t in tensors]
    plain = [t * (1 / 3) for t in tensors]
    bucket_scale_(tensors, 1 / 3)
    bucket_scale_reference_(refs, 1 / 3)
    for t, r, p in zip(tensors, refs, plain):
        assert _err(t, r) <= 2 * _err(p, r)


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_opcheck(backend):
    tensors = _inputs(torch.float32, sizes=[(3,), (17, 2), (5,)])
    flat = torch.empty(42, dtype=torch.bfloat16)
    kw = {"backend": backend}
    torch.library.opcheck(torch.ops.lmkernels.bucket_pack_, (tensors, flat, 0.5), kw)
    outs = [torch.empty_like(t) for t in tensors]
    torch.library.opcheck(torch.ops.lmkernels.bucket_unpack_, (flat, outs, 2.0), kw)
    torch.library.opcheck(torch.ops.lmkernels.bucket_scale_, (outs, 0.25), kw)


def test_backend_argument_as_for_every_op(monkeypatch):
    """bucket_* took no backend= and bypassed the backend rules the other ops follow."""
    a, b = torch.randn(3), torch.randn(4)
    flat = torch.empty(7)
    bucket_pack_([a, b], flat, 2.0, backend="cpu")
    assert torch.equal(flat, torch.cat([a, b]) * 2)
    for bad, message in (("nope", "bucket_pack_: backend must be one of ('auto', 'cpu', 'cuda', 'triton'); got 'nope'"),
                         ("cuda", "bucket_pack_: backend 'cuda' needs CUDA tensors; got CPU tensors"),
                         ("triton", "bucket_pack_: backend 'triton' needs CUDA tensors; got CPU tensors")):
        with pytest.raises(ValueError, match=re.escape(message)):
            bucket_pack_([a, b], flat, backend=bad)
    with pytest.raises(ValueError, match="bucket_scale_: backend 'cuda' needs CUDA tensors"):
        torch.ops.lmkernels.bucket_scale_([a], 2.0, backend="cuda")
    with pytest.raises(ValueError, match="bucket_unpack_: backend must be one of"):
        bucket_unpack_(flat, [a, b], backend="gpu")
    monkeypatch.setenv("LMK_BACKEND", "cuda")  # a GPU preference: CPU tensors ignore it
    bucket_scale_([flat], 0.5)
    assert torch.equal(flat, torch.cat([a, b]))


def test_backend_table_for_cuda_tensors(monkeypatch):
    """CUDA tensors: the CUDA kernel when compiled, else (auto only) the same maths as torch ops;
    there is no Triton bucket kernel."""
    compiled = "cuda" in __import__("lmkernels").build_info()["compiled_backends"]
    for table, fallback in ((bucket_op._PACK, bucket_op._pack_torch),
                            (bucket_op._UNPACK, bucket_op._unpack_torch),
                            (bucket_op._SCALE, bucket_op._scale_torch)):
        kernel = table.kernels["cuda"]
        assert (kernel is not None) == compiled
        assert table.pick("auto") is (kernel if compiled else fallback)
        with pytest.raises(ValueError, match="no 'triton' kernel for this op; on CUDA tensors use one of \\('auto', 'cuda'\\)"):
            table.pick("triton")
        monkeypatch.setenv("LMK_BACKEND", "triton")
        monkeypatch.setattr(table, "_warned", set())  # it warns once per process
        with pytest.warns(UserWarning, match="LMK_BACKEND=triton has no kernel for this op"):
            assert table.pick("auto") is (kernel if compiled else fallback)
        monkeypatch.delenv("LMK_BACKEND")
        if not compiled:
            with pytest.raises(RuntimeError, match="built without CUDA kernels"):
                table.pick("cuda")


@pytest.mark.parametrize("src,dst", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                     (torch.float16, torch.float64)])
def test_torch_fallback_matches_kernel(src, dst):
    """The table's fallback (CUDA tensors, build without CUDA kernels) computes what the kernel does."""
    tensors = _inputs(src)
    flat, flat_ref = (torch.empty(sum(t.numel() for t in tensors), dtype=dst) for _ in range(2))
    bucket_op._pack_torch(tensors, flat, 1 / 3)
    bucket_pack_(tensors, flat_ref, 1 / 3)
    assert torch.equal(flat, flat_ref)
    outs, outs_ref = [torch.empty_like(t) for t in tensors], [torch.empty_like(t) for t in tensors]
    bucket_op._unpack_torch(flat, outs, 3.0)
    assert torch.equal(flat, flat_ref)  # the old fallback scaled flat in place when dtypes matched
    bucket_unpack_(flat, outs_ref, 3.0)
    bucket_op._scale_torch(outs, 0.7)
    bucket_scale_(outs_ref, 0.7)
    assert all(torch.equal(a, b) for a, b in zip(outs, outs_ref))
    with pytest.raises(RuntimeError, match="flat must hold exactly the tensors' 3 elements"):
        bucket_op._pack_torch([torch.randn(3)], torch.empty(4), 1.0)


def test_fakes_check_sizes():
    tensors = [torch.empty(3, device="meta"), torch.empty(4, device="meta")]
    with pytest.raises(RuntimeError, match="flat must hold exactly the tensors' 7 elements.*got 6"):
        torch.ops.lmkernels.bucket_pack_(tensors, torch.empty(6, device="meta"))
    with pytest.raises(RuntimeError, match="flat must hold exactly the tensors' 7 elements.*got 8"):
        torch.ops.lmkernels.bucket_unpack_(torch.empty(8, device="meta"), tensors)


def test_torch_compile_fullgraph():
    def roundtrip(a, b, flat, out_a, out_b):
        torch.ops.lmkernels.bucket_pack_([a, b], flat, 0.5)
        torch.ops.lmkernels.bucket_unpack_(flat, [out_a, out_b], 2.0)
        torch.ops.lmkernels.bucket_scale_([out_a, out_b], 3.0)
        return out_a + 1, out_b

    a, b = torch.randn(17), torch.randn(4, 5)
    flat = torch.empty(37)
    out_a, out_b = torch.empty_like(a), torch.empty_like(b)
    got_a, got_b = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")(a, b, flat, out_a, out_b)
    torch.testing.assert_close(got_a, a * 3 + 1)
    torch.testing.assert_close(got_b, b * 3)


def test_bad_arguments_are_named():
    a, b = torch.randn(3), torch.randn(4)
    with pytest.raises(RuntimeError, match=r"flat must hold exactly the tensors' 7 elements.*got 6"):
        torch.ops.lmkernels.bucket_pack_([a, b], torch.empty(6), 1.0)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] must be float32, bfloat16, float16 or float64"):
        torch.ops.lmkernels.bucket_pack_([a, torch.ones(4, dtype=torch.int32)], torch.empty(7), 1.0)
    with pytest.raises(RuntimeError, match=r"all tensors of one call must share a dtype; tensors\[1\]"):
        torch.ops.lmkernels.bucket_pack_([a, b.double()], torch.empty(7), 1.0)
    with pytest.raises(RuntimeError, match=r"tensors\[0\] must be contiguous"):
        torch.ops.lmkernels.bucket_unpack_(torch.empty(6), [torch.empty(3, 2).t()], 1.0)
    with pytest.raises(RuntimeError, match=r"flat must be contiguous"):
        torch.ops.lmkernels.bucket_pack_([a], torch.empty(3, 2)[:, 0], 1.0)
    buf = torch.empty(7)
    with pytest.raises(RuntimeError, match=r"share memory"):
        torch.ops.lmkernels.bucket_pack_([buf[:3], b], buf, 1.0)
    with pytest.raises(RuntimeError, match=r"tensors\[0\] must be real"):
        torch.ops.lmkernels.bucket_scale_([torch.randn(3, dtype=torch.complex64)], 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("src", DTYPES)
@pytest.mark.parametrize("dst", DTYPES)
def test_cuda_kernels_match_reference(src, dst):
    from lmkernels._extension import has_cuda_kernels

    assert has_cuda_kernels(), "GPU check: lmkernels._C must be built with the CUDA kernels"
    test_pack_unpack_match_reference(src, dst, 1.0 / 3.0, device="cuda")
    # Many small tensors and one spanning several launches (160 blocks of 16384 elements).
    sizes = [(1,)] * 300 + [(16384 * 170 + 5,)]
    tensors = _inputs(src, "cuda", sizes)
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=dst, device="cuda")
    bucket_pack_(tensors, flat, 0.5)
    ref = torch.empty(flat.numel(), dtype=torch.float64, device="cuda")
    bucket_pack_reference_(tensors, ref, 0.5)
    assert _err(flat, ref) <= 2 * _err(_torch_pack(tensors, dst, 0.5), ref)
    bucket_scale_(tensors, 1 / 3)
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match="is on cpu but expected cuda"):
        torch.ops.lmkernels.bucket_pack_([torch.randn(3)], torch.empty(3, device="cuda"), 1.0)
