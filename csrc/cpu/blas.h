// Single-precision GEMM for the CPU kernels, on row-major matrices: the BLAS that torch itself
// links (MKL or OpenBLAS sgemm_, found at run time as torch's cpublas does), at::mm otherwise.
#pragma once
#include <cstdint>

namespace lmk {

// C (M x N, leading dimension ldc) = alpha * op(A) op(B) + beta * C, all row-major float32;
// op(A) is M x K (A^T when trans_a), op(B) is K x N (B^T when trans_b).
void gemm_f32(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
              const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
              int64_t ldc);

}  // namespace lmk
