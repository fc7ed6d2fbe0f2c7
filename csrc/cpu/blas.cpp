// gemm_f32 (blas.h): calls the Fortran sgemm_ that libtorch_cpu exports (MKL or OpenBLAS)
// directly, so the attention kernel's many small tile products pay no dispatcher call and no
// tensor construction each; at::mm where torch exports no sgemm_.
#include "blas.h"

#include <ATen/ATen.h>
#include <dlfcn.h>

#include <limits>

namespace lmk {
namespace {

using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*,
                         const float*, const float*, const int*, const float*, const int*,
                         const float*, float*, const int*);

sgemm_t find_sgemm() {
  static const sgemm_t fn = [] {
    void* sym = nullptr;
    if (void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) sym = dlsym(lib, "sgemm_");
    if (sym == nullptr) sym = dlsym(RTLD_DEFAULT, "sgemm_");
    return reinterpret_cast<sgemm_t>(sym);
  }();
  return fn;
}

bool fits_int(int64_t x) { return x <= std::numeric_limits<int>::max(); }

void gemm_aten(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
               int64_t ldc) {
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor a = trans_a ? at::from_blob(const_cast<float*>(A), {K, M}, {lda, 1}, opts).t()
                         : at::from_blob(const_cast<float*>(A), {M, K}, {lda, 1}, opts);
  at::Tensor b = trans_b ? at::from_blob(const_cast<float*>(B), {N, K}, {ldb, 1}, opts).t()
                         : at::from_blob(const_cast<float*>(B), {K, N}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (beta == 0.f) {
    at::mm_out(c, a, b);
    if (alpha != 1.f) c.mul_(alpha);
  } else {
    c.mul_(beta).addmm_(a, b, 1.0, alpha);
  }
}

}  // namespace

void gemm_f32(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
              const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
              int64_t ldc) {
  if (M == 0 || N == 0) return;
  sgemm_t sgemm = find_sgemm();
  // sgemm_ takes 32-bit sizes: larger problems (none of the attention tiles) go to at::mm.
  const bool small = fits_int(M) && fits_int(N) && fits_int(K) && fits_int(lda) &&
                     fits_int(ldb) && fits_int(ldc);
  if (sgemm == nullptr || !small) {
    gemm_aten(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  // A row-major product is the column-major product of the transposes: C^T = op(B)^T op(A)^T.
  const int m = int(N), n = int(M), k = int(K), la = int(ldb), lb = int(lda), lc = int(ldc);
  sgemm(trans_b ? "T" : "N", trans_a ? "T" : "N", &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C,
        &lc);
}

}  // namespace lmk
