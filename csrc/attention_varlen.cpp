// Schemas and argument checks of torch.ops.lmkernels.attention_varlen_fwd / _bwd: attention
// over packed sequences (FlashAttention-2's varlen layout). CPU kernel:
// cpu/attention_varlen_cpu.cpp; CUDA tensors: lmkernels/ops/attention_varlen.py runs the Triton
// launchers after these same checks (through lmkernels._C).
//
// query (total_q, H, D), key/value (total_k, Hkv, D); sequence b owns query rows
// [cu_seqlens_q[b], cu_seqlens_q[b+1]) and key rows [cu_seqlens_k[b], cu_seqlens_k[b+1]), and
// is attended exactly as attention_fwd would attend it alone (bottom-right causal alignment,
// windows, softcap, GQA). lse is (H, total_q) float32.
#include <torch/library.h>

#include "attention.h"
#include "checks.h"

namespace lmk {
namespace {

// cu_seqlens' values on the host (one copy from the device for CUDA tensors).
std::vector<int64_t> read_cu_seqlens(const char* op, const char* name, const at::Tensor& cu,
                                     const at::Tensor& query, int64_t total, const char* rows,
                                     int64_t max_seqlen, const char* max_name) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, op, ": ", name, " must be int32; got ",
                   cu.scalar_type());
  TORCH_CHECK_VALUE(cu.layout() == at::kStrided && cu.dim() == 1, op, ": ", name,
                    " must be a 1-D tensor (B + 1,); got shape ", cu.sizes());
  TORCH_CHECK_VALUE(cu.device() == query.device(), op, ": ", name, " is on ", cu.device(),
                    " but query is on ", query.device());
  TORCH_CHECK_VALUE(cu.numel() >= 2, op, ": ", name,
                    " must hold B + 1 >= 2 entries (B >= 1 sequences); got shape ", cu.sizes());
  TORCH_CHECK_VALUE(max_seqlen >= 0, op, ": ", max_name, " must be >= 0; got ", max_seqlen);
  const at::Tensor host = cu.to(at::kCPU).contiguous();
  const int32_t* c = host.const_data_ptr<int32_t>();
  const int64_t n = host.numel();
  TORCH_CHECK_VALUE(c[0] == 0, op, ": ", name, " must start at 0; got ", name, "[0] = ", c[0]);
  std::vector<int64_t> out(n);
  out[0] = 0;
  for (int64_t b = 1; b < n; ++b) {
    TORCH_CHECK_VALUE(c[b] >= c[b - 1], op, ": ", name, " must be non-decreasing; got ", name,
                      "[", b - 1, "] = ", c[b - 1], " > ", name, "[", b, "] = ", c[b]);
    TORCH_CHECK_VALUE(c[b] - c[b - 1] <= max_seqlen, op, ": ", max_name, " = ", max_seqlen,
                      " is smaller than sequence ", b - 1, "'s length ", c[b] - c[b - 1],
                      " (", name, "[", b, "] - ", name, "[", b - 1, "])");
    out[b] = c[b];
  }
  TORCH_CHECK_VALUE(c[n - 1] == total, op, ": the last entry of ", name, " must equal ", rows,
                    " = ", total, "; got ", c[n - 1]);
  return out;
}

}  // namespace

VarlenBounds check_attention_varlen_args(const char* op, const at::Tensor& query,
                                         const at::Tensor& key, const at::Tensor& value,
                                         const at::Tensor& cu_seqlens_q,
                                         const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                         int64_t max_seqlen_k, int64_t window_left,
                                         int64_t window_right, double softcap) {
  check_qkv(op, query, key, value, 3, "(total, H, D)");
  TORCH_CHECK_VALUE(query.size(1) > 0, op, ": query must have at least one head; got shape ",
                    query.sizes());
  check_window_and_softcap(op, window_left, window_right, softcap);
  TORCH_CHECK_VALUE(cu_seqlens_q.dim() != 1 || cu_seqlens_k.dim() != 1 ||
                        cu_seqlens_q.numel() == cu_seqlens_k.numel(),
                    op, ": cu_seqlens_q and cu_seqlens_k must have one entry per sequence + 1; "
                    "got ", cu_seqlens_q.numel(), " and ", cu_seqlens_k.numel());
  VarlenBounds bounds;
  bounds.cu_q = read_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, query, query.size(0),
                                "query.size(0)", max_seqlen_q, "max_seqlen_q");
  bounds.cu_k = read_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, query, key.size(0),
                                "key.size(0)", max_seqlen_k, "max_seqlen_k");
  return bounds;
}

VarlenBounds check_attention_varlen_bwd_args(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    int64_t window_left, int64_t window_right, double softcap) {
  const char* op = "attention_varlen_bwd";
  // Shapes and dtypes first: they are cheap; the cu_seqlens values come last.
  check_qkv(op, query, key, value, 3, "(total, H, D)");
  check_bwd_tensors(op, query, grad_out, out, lse, grad_lse, {query.size(1), query.size(0)},
                    "(H, total_q) = ");
  return check_attention_varlen_args(op, query, key, value, cu_seqlens_q, cu_seqlens_k,
                                     max_seqlen_q, max_seqlen_k, window_left, window_right,
                                     softcap);
}

}  // namespace lmk

TORCH_LIBRARY_FRAGMENT(lmkernels, m) {
  // Returns (out (total_q, H, D) in query's dtype, lse (H, total_q) float32).
  // backend: "auto", "cpu" or "triton" (there is no CUDA C++ attention kernel).
  m.def(
      "attention_varlen_fwd(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, bool is_causal, "
      "int window_left, int window_right, float softcap, *, str backend=\"auto\") -> "
      "(Tensor out, Tensor lse)");
  // grad_lse: gradient flowing into lse (None when lse was not used). deterministic=False lets
  // a GPU kernel accumulate dQ with atomics (the CPU kernel is always deterministic).
  // Returns (dq, dk, dv).
  m.def(
      "attention_varlen_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor lse, Tensor? grad_lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float scale, bool is_causal, int window_left, int window_right, "
      "float softcap, bool deterministic, *, str backend=\"auto\") -> (Tensor, Tensor, Tensor)");
}
