// The half-precision tile GEMMs of the GEMM shim (blas.h): float32 tiles rounded to bfloat16 /
// float16 and back, and the half GEMM itself through at::mm_out (oneDNN's matmul).

#include "blas.h"

#include <algorithm>

#include "cpu_features.h"
#include "tile_math.h"

namespace nonlocal_ext {
namespace cpu {

at::Tensor half_view(at::ScalarType dtype, const uint16_t* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<uint16_t*>(data), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(dtype));
}

NLX_INLINE uint16_t bfloat16_bits(float x) {  // round to nearest even; a NaN stays a (quiet) NaN
  const uint32_t u = static_cast<uint32_t>(float_to_bits(x));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return x != x ? static_cast<uint16_t>((u >> 16) | 0x40u) : static_cast<uint16_t>(rounded);
}

// narrow_tile and half_gemm: declared, with what they compute, in blas.h.
NLX_VECTORIZED void narrow_tile(at::ScalarType dtype, int64_t rows, int64_t cols, const float* src, int64_t lds,
                                uint16_t* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* __restrict s = src + i * lds;
    uint16_t* __restrict t = dst + i * cols;
    if (dtype == at::kBFloat16)
      for (int64_t j = 0; j < cols; ++j) t[j] = bfloat16_bits(s[j]);
    else
      for (int64_t j = 0; j < cols; ++j) t[j] = c10::Half(s[j]).x;
  }
}

// c (rows × cols, leading dimension ldc) = [c +] src (rows × cols, contiguous half).
NLX_VECTORIZED void widen_tile(at::ScalarType dtype, int64_t rows, int64_t cols, const uint16_t* src, bool add,
                               float* c, int64_t ldc) {
  for (int64_t i = 0; i < rows; ++i) {
    const uint16_t* __restrict s = src + i * cols;
    float* __restrict t = c + i * ldc;
    if (dtype == at::kBFloat16) {
      for (int64_t j = 0; j < cols; ++j) {
        const float x = bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(s[j]) << 16));
        t[j] = add ? t[j] + x : x;
      }
    } else {
      for (int64_t j = 0; j < cols; ++j) {
        const float x = static_cast<float>(c10::Half(s[j], c10::Half::from_bits()));
        t[j] = add ? t[j] + x : x;
      }
    }
  }
}

void half_gemm(const HalfTiles& h, int64_t rows, int64_t cols, int64_t inner, const uint16_t* a, int64_t lda,
               const uint16_t* b, int64_t ldb, bool add, float* c, int64_t ldc) {
  if (rows == 0 || cols == 0) return;
  if (inner == 0) {
    if (!add)
      for (int64_t i = 0; i < rows; ++i) std::fill(c + i * ldc, c + i * ldc + cols, 0.0f);
    return;
  }
  at::Tensor out = half_view(h.dtype, h.result, rows, cols, cols);
  at::mm_out(out, half_view(h.dtype, a, rows, inner, lda), half_view(h.dtype, b, inner, cols, ldb));
  widen_tile(h.dtype, rows, cols, h.result, add, c, ldc);
}

}  // namespace cpu
}  // namespace nonlocal_ext
