"""Pure-PyTorch packed-sequence (varlen) attention, the reference for attention_varlen.

query (total_q, H, D), key / value (total_k, Hkv, D); sequence b owns query rows
cu_seqlens_q[b]:cu_seqlens_q[b+1] and key rows cu_seqlens_k[b]:cu_seqlens_k[b+1]. Each
sequence is attended alone with lmkernels/reference/attention.py (explicit (T, S) masks:
bottom-right causal alignment, windows, softcap, GQA), so no row sees another sequence.
Returns out (total_q, H, D) in query's dtype and lse (H, total_q) float32.
"""
from typing import Optional, Tuple

import torch

from lmkernels.reference.attention import attention_reference


def attention_varlen_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    window_size: Optional[Tuple[int, int]] = None,
    softcap: float = 0.0,
    compute_dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Loops over the sequences; differentiable (finite gradients for rows that see nothing)."""
    H, D = query.shape[1], query.shape[2]
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        T, S = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if T == 0:
            continue
        q = query[cq[b]:cq[b + 1]].transpose(0, 1)[None]  # (1, H, T, D)
        if S == 0:  # nothing to attend: zeros (gradient 0), lse = -inf
            outs.append(query.new_zeros((T, H, D)))
            lses.append(torch.full((H, T), float("-inf"), device=query.device))
            continue
        k = key[ck[b]:ck[b + 1]].transpose(0, 1)[None]  # (1, Hkv, S, D)
        v = value[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        out, lse = attention_reference(q, k, v, is_causal=is_causal, scale=scale,
                                       window_size=window_size, softcap=softcap,
                                       compute_dtype=compute_dtype)
        outs.append(out[0].transpose(0, 1))  # (T, H, D)
        lses.append(lse[0])  # (H, T)
    if not outs:
        return query.new_zeros(query.shape), torch.full((H, 0), float("-inf"), device=query.device)
    return torch.cat(outs, 0), torch.cat(lses, 1)
