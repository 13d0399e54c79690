// The GEMM shim of the CPU kernels: row-major tile GEMMs through the BLAS that torch links
// (sgemm_ / dgemm_) or, for float32, ATen's batch-reduce GEMM (oneDNN's brgemm micro-kernel); and
// the half-precision tile GEMMs (bfloat16 / float16 through oneDNN's matmul, at::mm_out) with the
// rounding of float32 tiles to half and back, which blas.cpp defines.

#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <cstdint>
#include <exception>
#include <type_traits>

// The BLAS that torch itself links (MKL on x86-64 wheels, OpenBLAS on aarch64 ones).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc);
}

namespace nonlocal_ext {
namespace cpu {

// GEMM on row-major tiles: c = alpha·op(a)·op(b) + beta·c with op(a) rows×inner, op(b)
// inner×cols. BLAS is column-major, where a row-major matrix reads as its transpose, so this
// asks BLAS for cᵀ = op(b)ᵀ·op(a)ᵀ.
inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const float* alpha, const float* a, const int* lda, const float* b,
                      const int* ldb, const float* beta, float* c, const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const double* alpha, const double* a, const int* lda, const double* b,
                      const int* ldb, const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// ATen's batch-reduce GEMM (oneDNN's micro-kernel, generated once per tile shape and cached) for
// float32 tiles with row-major, untransposed operands: it packs nothing per call, where sgemm_
// packs both operands every time (bench/NOTES.md, "Tile GEMMs through brgemm"). Probed once: a
// torch built without oneDNN's micro-kernels raises, and the BLAS path is used instead. (Inline: one
// probe for every translation unit, and callable inline from gemm as before the split.)
inline bool brgemm_available() {
  static const bool available = [] {
    try {
      const float a[1] = {2.0f}, b[1] = {3.0f};
      float c[1] = {0.0f};
      at::native::cpublas::brgemm(1, 1, 1, 1, 1, 1, false, a, b, c, false);
      at::native::cpublas::brgemm_release(false);
      return c[0] == 6.0f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return available;
}

// Releases brgemm's per-thread hardware state at the end of a parallel task range.
struct BrgemmScope {
  ~BrgemmScope() {
    if (brgemm_available()) at::native::cpublas::brgemm_release(false);
  }
};

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t rows, int64_t cols, int64_t inner, T alpha,
          const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (rows == 0 || cols == 0) return;
  if (inner == 0) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (!trans_a && !trans_b && alpha == T(1) && (beta == T(0) || beta == T(1)) && brgemm_available()) {
      at::native::cpublas::brgemm(rows, cols, inner, lda, ldb, ldc, beta == T(1), a, b, c, false);
      return;
    }
  }
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int m = static_cast<int>(cols), n = static_cast<int>(rows), k = static_cast<int>(inner);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  blas_gemm(&ta, &tb, &m, &n, &k, &alpha, b, &la, a, &lb, &beta, c, &lc);
}

// ----------------------------------------------------------------------------------------------
// Transposed copies of GEMM operands (brgemm takes its right operand row-major, so q kᵀ needs kᵀ).

// dst (cols × rows, leading dimension ldd) = srcᵀ for src (rows × cols, leading dimension lds): in 8 × 8
// blocks through AVX2 shuffles where the CPU has them (≈ 0.1–0.2 ns per element, where a scalar copy is bound
// by its strided side at ≈ 1 ns: bench/NOTES.md, "Transposed copies in registers"), else element by element.
void transpose_into(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst, int64_t ldd);
void transpose_into(int64_t rows, int64_t cols, const double* src, int64_t lds, double* dst, int64_t ldd);

// x (B, L, W) → a contiguous (B, W, L): transpose_into for float32 and float64, in parallel over batch elements
// and 64-line blocks; other dtypes through ATen's copy.
at::Tensor transposed_copy(const at::Tensor& x);

// ----------------------------------------------------------------------------------------------
// Half-precision tile GEMMs. bfloat16 (float16) inputs multiply in that precision where the CPU
// has dot-product instructions for it (avx512_bf16 or AMX; avx512_fp16 or AMX-FP16): through
// at::mm_out, which runs oneDNN's matmul there, with float32 accumulation inside the product and
// its result rounded once to half and widened at once into the float32 tile or accumulator.
// Weights, exp/log and statistics stay float32. A float32 tile that is a GEMM operand (W before
// W·v, the backward's Â and C) is rounded to half once, as FlashAttention does with P.
// (ATen's brgemm needs AMX for half operands; without it, it falls back to a loop no faster than
// float32: bench/NOTES.md, "bfloat16 tiles on the matrix units".)
// Whether they run on this CPU: half_gemm_available (cpu_features.h).

// The half copies of a pass's operands for one batch element, and one thread's scratch. Row-major,
// like the float32 operands of Roles: a (rows × d), b (cols × d), their transposes, v (cols × c),
// vᵀ (c × cols), G (rows × c). Null where a pass does not use them.
struct HalfTiles {
  at::ScalarType dtype;
  bool products;  // q·kᵀ in half as well (dot family); distance kernels keep ρ's products float32
  const uint16_t *a, *b, *a_t, *b_t, *value, *value_t, *grad;
  uint16_t *operand, *result;  // scratch: a rounded operand tile, a GEMM result tile
};

// dst (rows × cols, contiguous) = src (rows × cols, leading dimension lds) rounded to half.
void narrow_tile(at::ScalarType dtype, int64_t rows, int64_t cols, const float* src, int64_t lds, uint16_t* dst);

// c (rows × cols, ldc) = [c +] a·b for half a (rows × inner, lda) and b (inner × cols, ldb).
void half_gemm(const HalfTiles& h, int64_t rows, int64_t cols, int64_t inner, const uint16_t* a, int64_t lda,
               const uint16_t* b, int64_t ldb, bool add, float* c, int64_t ldc);

// c [+]= x·b for a float32 tile x (rows × inner, ldx): rounded to half first when b has a half copy
// (b_half non-null), else the float32 GEMM with b.
template <typename T>
void tile_gemm(const HalfTiles* h, int64_t rows, int64_t cols, int64_t inner, const T* x, int64_t ldx, const T* b,
               const uint16_t* b_half, int64_t ldb, bool add, T* c, int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    if (h && b_half) {
      narrow_tile(h->dtype, rows, inner, x, ldx, h->operand);
      return half_gemm(*h, rows, cols, inner, h->operand, inner, b_half, ldb, add, c, ldc);
    }
  }
  gemm<T>(false, false, rows, cols, inner, T(1), x, ldx, b, ldb, add ? T(1) : T(0), c, ldc);
}

}  // namespace cpu
}  // namespace nonlocal_ext
