// CPU-feature dispatch of the CPU kernels: which instruction sets the float32 tile code is compiled
// for (NLX_VECTORIZED, resolved once at load time), and whether the half-precision tile GEMMs run
// on this CPU (half_gemm_available, see blas.h).

#pragma once

#include <c10/core/ScalarType.h>

// float32 tile code is compiled for AVX-512, AVX2+FMA and baseline x86-64, chosen at load time
// (the exp/log loops vectorize only with the wider ISAs). float64 is the gradcheck path.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NLX_VECTORIZED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NLX_VECTORIZED
#endif

namespace nonlocal_ext {
namespace cpu {

// Whether bfloat16 (float16) tiles multiply in that precision: where the CPU has dot-product
// instructions for it (avx512_bf16 or AMX; avx512_fp16 or AMX-FP16). False for other dtypes.
// NONLOCAL_EXT_CPU_HALF_GEMMS=0 / =1 turns the half tile GEMMs off / on whatever the CPU has (the
// tests run both paths on every machine; on a CPU without the instructions oneDNN emulates them).
bool half_gemm_available(at::ScalarType dtype);

}  // namespace cpu
}  // namespace nonlocal_ext
