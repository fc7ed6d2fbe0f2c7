"""lmkernels.attention in a few lines: causal GQA attention with a sliding window, checked
against PyTorch's scaled_dot_product_attention, then a backward pass.

    PYTHONPATH=. python3 python/attention_example.py
"""
import torch
import torch.nn.functional as F

import lmkernels

torch.manual_seed(0)
B, H, Hkv, T, D = 2, 8, 2, 300, 64  # 8 query heads share 2 key/value heads (GQA)
q = torch.randn(B, H, T, D, requires_grad=True)
k = torch.randn(B, Hkv, T, D, requires_grad=True)
v = torch.randn(B, Hkv, T, D, requires_grad=True)

# Plain causal attention matches SDPA (which needs K/V repeated for GQA).
out = lmkernels.attention(q, k, v, is_causal=True)
expected = F.scaled_dot_product_attention(q, k.repeat_interleave(H // Hkv, 1),
                                          v.repeat_interleave(H // Hkv, 1), is_causal=True)
print("max |ours - sdpa| =", (out - expected).abs().max().item())

# Sliding window: each query sees itself and the 63 keys before it; lse comes along.
out, lse = lmkernels.attention(q, k, v, is_causal=True, window_size=(63, 0), return_lse=True)
out.square().mean().backward()
print("out", tuple(out.shape), "lse", tuple(lse.shape), "dk", tuple(k.grad.shape))

# bf16 runs the same C++ kernel with fp32 tiles inside.
out16 = lmkernels.attention(q.detach().bfloat16(), k.detach().bfloat16(), v.detach().bfloat16(),
                            is_causal=True)
print("bf16 vs fp32 max diff:", (out16.float() - expected).abs().max().item())
