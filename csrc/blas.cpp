// The half-precision tile GEMMs of the GEMM shim (blas.h): float32 tiles rounded to bfloat16 /
// float16 and back, and the half GEMM itself through at::mm_out (oneDNN's matmul).

#include "blas.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

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

namespace {

template <typename T>
void transpose_scalar(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * ldd + i] = src[i * lds + j];
}

#if defined(__x86_64__) && defined(__GNUC__)
// One 8 × 8 block: the rows' pairs interleaved (unpack), then their quads (shuffle), then the 128-bit halves.
__attribute__((target("avx2"))) void transpose_avx2(int64_t rows, int64_t cols, const float* src, int64_t lds,
                                                    float* dst, int64_t ldd) {
  const int64_t rows8 = rows - rows % 8, cols8 = cols - cols % 8;
  for (int64_t i = 0; i < rows8; i += 8) {
    for (int64_t j = 0; j < cols8; j += 8) {
      const float* s = src + i * lds + j;
      const __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + lds), r2 = _mm256_loadu_ps(s + 2 * lds),
                   r3 = _mm256_loadu_ps(s + 3 * lds), r4 = _mm256_loadu_ps(s + 4 * lds),
                   r5 = _mm256_loadu_ps(s + 5 * lds), r6 = _mm256_loadu_ps(s + 6 * lds),
                   r7 = _mm256_loadu_ps(s + 7 * lds);
      const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
      const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
      const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
      const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
      float* d = dst + j * ldd + i;
      _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(d + ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(d + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(d + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(d + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(d + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(d + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(d + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
  }
  // the right and bottom strips
  transpose_scalar(rows8, cols - cols8, src + cols8, lds, dst + cols8 * ldd, ldd);
  transpose_scalar(rows - rows8, cols, src + rows8 * lds, lds, dst + rows8, ldd);
}

bool has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return has;
}
#endif

}  // namespace

void transpose_into(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst, int64_t ldd) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_avx2()) return transpose_avx2(rows, cols, src, lds, dst, ldd);
#endif
  transpose_scalar(rows, cols, src, lds, dst, ldd);
}

void transpose_into(int64_t rows, int64_t cols, const double* src, int64_t lds, double* dst, int64_t ldd) {
  transpose_scalar(rows, cols, src, lds, dst, ldd);
}

at::Tensor transposed_copy(const at::Tensor& x) {
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) return x.transpose(1, 2).contiguous();
  const at::Tensor in = x.contiguous();
  const int64_t batch = in.size(0), lines = in.size(1), width = in.size(2);
  at::Tensor out = at::empty({batch, width, lines}, in.options());
  constexpr int64_t kLines = 64;
  const int64_t blocks = (lines + kLines - 1) / kLines;
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "transposed_copy", [&] {
    const scalar_t* src = in.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bt = task / blocks, i0 = (task % blocks) * kLines, bi = std::min(kLines, lines - i0);
        transpose_into(bi, width, src + bt * lines * width + i0 * width, width, dst + bt * lines * width + i0,
                       lines);
      }
    });
  });
  return out;
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
