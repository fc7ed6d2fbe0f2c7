"""Varlen (packed sequences) FlashAttention-2: the launchers and compile specs.

FA2's layout: query (total_q, H, D), key/value (total_k, Hkv, D), cu_seqlens_q/k int32 (B + 1,)
(sequence b is rows [cu[b], cu[b+1])), lse (H, total_q) fp32. Each sequence is attended alone,
exactly as lmkernels.attention on it: causal and windows are bottom-right aligned per sequence,
zero-length sequences are allowed (their programs exit at once; a sequence with queries but no
keys gives out 0, lse -inf, dq 0).
The kernels are attention.py's, launched with VARLEN = 1 (a runtime flag: dense and varlen
launches share one compiled kernel, so the compile gate's varlen rows mostly hit the dense
rows' cache): a program reads its sequence's start and lengths from cu_seqlens; the grid covers max_seqlen (axis 1) and
B*H (axis 0), and programs past their sequence's end return. The backward is the dense one's
(deterministic: dK/dV programs own key blocks, dQ programs own query blocks, no atomics), so
deterministic=False runs it too; FA2's atomic-dQ variant is not implemented.
"""
import torch
import triton

from lmkernels.triton.attention import (
    _PREPROCESS_BLOCK_M, DTYPES, GATE_HEAD_DIMS, _NAMES, _block_d, _bwd_launches, _fwd_launch,
    _last_dim_contiguous, _on_device, _pad_head_dim, _preprocess_launch, _unpad_head_dim, gate_configs)
from lmkernels.triton._compile_spec import ArgTensor, CompileSpec


def _as_dense_rows(t: torch.Tensor) -> torch.Tensor:
    """(total, H, D) -> a (1, H, total, D) view, for the preprocess kernel (sequence-blind)."""
    return t.permute(1, 0, 2).unsqueeze(0)


def attention_varlen_fwd(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         scale, is_causal, window_left, window_right, softcap=0.0):
    """-> (out (total_q, H, D) in query's dtype, lse (H, total_q) float32)."""
    q, k, v = (_last_dim_contiguous(t) for t in (query, key, value))
    total_q, H, D = q.shape
    B = cu_seqlens_q.shape[0] - 1
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((H, total_q), device=q.device, dtype=torch.float32)
    if B == 0 or total_q == 0 or max_seqlen_q == 0:
        return out, lse
    launch = _fwd_launch(q, k, v, out, lse, scale, is_causal, window_left, window_right, softcap,
                         cu_seqlens=(cu_seqlens_q, cu_seqlens_k), max_seqlens=(max_seqlen_q, max_seqlen_k))
    with _on_device(q.device):
        launch.run(lambda meta: (B * H, triton.cdiv(max_seqlen_q, meta["BLOCK_M"])))
    return out, lse


def attention_varlen_bwd(grad_out, query, key, value, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k,
                         max_seqlen_q, max_seqlen_k, scale, is_causal, window_left, window_right,
                         softcap=0.0, deterministic=True):
    """-> (dq, dk, dv). grad_lse (H, total_q) may be None. deterministic is accepted for the
    op's signature; this backward is always deterministic."""
    D = query.shape[-1]
    total_q, H, _ = query.shape
    total_k, Hkv, _ = key.shape
    B = cu_seqlens_q.shape[0] - 1
    o, g0 = (_last_dim_contiguous(t) for t in (out, grad_out))
    q, k, v, g = (_pad_head_dim(t) for t in (query, key, value, grad_out))
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
    if B > 0 and total_q > 0 and max_seqlen_q > 0:
        pre = _preprocess_launch(_as_dense_rows(o), _as_dense_rows(g0),
                                 grad_lse.contiguous().unsqueeze(0) if grad_lse is not None else None,
                                 lse.unsqueeze(0), delta.unsqueeze(0))
        with _on_device(q.device):
            pre.run((H, triton.cdiv(total_q, _PREPROCESS_BLOCK_M)))
    if B > 0 and total_k > 0 and max_seqlen_k > 0:
        dkdv, dq_launch = _bwd_launches(q, k, v, g, lse, delta, dq, dk, dv, scale, is_causal, window_left,
                                        window_right, softcap, cu_seqlens=(cu_seqlens_q, cu_seqlens_k),
                                        max_seqlens=(max_seqlen_q, max_seqlen_k))
        with _on_device(q.device):
            dkdv.run(lambda meta: (B * Hkv, triton.cdiv(max_seqlen_k, meta["BLOCK_N"])))
            if total_q > 0 and max_seqlen_q > 0:
                dq_launch.run(lambda meta: (B * H, triton.cdiv(max_seqlen_q, meta["BLOCK_M"])))
    return tuple(_unpad_head_dim(t, D) for t in (dq, dk, dv))


def compile_specs():
    """The varlen forward, dK/dV and dQ launches for each dtype and head-dim class, without
    and with softcap, every usable config: the launch made for 8 sequences packed into
    total_q = total_k = 4000 rows, max_seqlen 1000, H = 4, Hkv = 2, causal. The preprocess is
    the dense kernel (attention.py's specs). bf16/fp16 with D <= 128 must not spill."""
    B, H, Hkv, total, max_seqlen = 8, 4, 2, 4000, 1000
    cu = ArgTensor(torch.int32, shape=(B + 1,))
    for dtype in DTYPES:
        for D in GATE_HEAD_DIMS:
            Dp = _block_d(D)
            q, out = (ArgTensor(dtype, shape=(total, H, D)) for _ in range(2))
            k, v = (ArgTensor(dtype, shape=(total, Hkv, D)) for _ in range(2))
            qp, gp, dq = (ArgTensor(dtype, shape=(total, H, Dp)) for _ in range(3))
            kp, vp, dk, dv = (ArgTensor(dtype, shape=(total, Hkv, Dp)) for _ in range(4))
            lse, delta = ArgTensor(torch.float32, shape=(H, total)), ArgTensor(torch.float32, shape=(H, total))
            no_spills = dtype != torch.float32 and D <= 128
            for softcap in (0.0, 30.0):
                name = f"{_NAMES[dtype]} D={D}" + (" softcap" if softcap else "")
                seq = dict(cu_seqlens=(cu, cu), max_seqlens=(max_seqlen, max_seqlen))
                launches = [("attention_varlen_fwd", _fwd_launch(q, k, v, out, lse, D ** -0.5, True, -1, -1,
                                                                 softcap, **seq), D)]
                if Dp == D:  # a padded head dim's backward is the launch of D = Dp: compiled once
                    dkdv, dq_launch = _bwd_launches(qp, kp, vp, gp, lse, delta, dq, dk, dv, D ** -0.5, True,
                                                    -1, -1, softcap, **seq)
                    launches += [("attention_varlen_bwd_dkdv", dkdv, Dp), ("attention_varlen_bwd_dq", dq_launch, Dp)]
                for kernel, launch, d in launches:
                    yield CompileSpec(f"{kernel} {name}", launch, configs=gate_configs(launch, dtype, d, softcap > 0),
                                      no_spills=no_spills)
