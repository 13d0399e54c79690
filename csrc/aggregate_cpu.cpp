// CPU kernels of nonlocal_ext::aggregate_forward / aggregate_backward (definitions: docs/semantics.md).
//
// Everything is tiled: a tile of the affinity matrix, rows I (row_block_for) × columns J
// (kColBlock), is formed from one GEMM s = a_I b_Jᵀ (two with `symmetric`), turned into weights
// in cache by the elementwise code of tile_math.h, and consumed at once by the next GEMM. No
// N×M buffer exists; memory is O((N+M)(D+C)) plus per-row statistics.
//
// Forward, per row block I (parallel over batch × row blocks):
//   acc_I = Σ_J W_IJ · (b_J ⊙ v_J),  r_I = Σ_J W_IJ 1,  h_I = Σ_J W_IJ b_J
//   out_I = a_I ⊙ acc_I − [diffusion] a_I h_I ⊙ u_I,   rowsum(Â)_I = a_I h_I
// with Â = diag(a) W diag(b):  none a=1 · count a=1/M · row a=1/r · sym a=r^−½, b=c^−½.
// `sym` needs the column sums c first: the same pass with the roles of query and key swapped.
// `gaussian` is kept in the log domain (z = scale·q·k): online max as in FlashAttention, so
// row and sym normalizations never overflow; its statistics are log r and log c.
//
// Backward, recomputing each tile. With G = ∂L/∂out and gu_i = G_i·u_i:
//   dâ_ij = G_i·v_j − [diffusion] gu_i
//   dw_ij = a_i b_j (dâ_ij − R_i) − X_i a_i² − Y_j b_j²
//     (row: R = S;  sym: X = S/2, Y = T/2, where S_i = Σ_j dâ_ij â_ij and T_j = Σ_i dâ_ij â_ij
//      come from a first pass over the tiles)
//   C_ij  = dw_ij f′(x_ij);  dv = Âᵀ G;  du_i = −rowsum(Â)_i G_i
//   dot family:      dq = C k,             dk = Cᵀ q
//   distance family: dq = 2(q ⊙ C1 − C k), dk = 2(k ⊙ Cᵀ1 − Cᵀ q)
// The tile loop runs column blocks J in parallel groups (a fixed number of groups per batch
// element, set by the shapes only); dv and dk of a column block are owned by its group, and
// each group keeps its own partial dq rows, summed in group order at the end. No atomics, and
// the result does not depend on the number of threads.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "tile_math.h"

// The BLAS that torch itself links (MKL on x86-64 wheels, OpenBLAS on aarch64 ones).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc);
}

// float32 tile code is compiled for AVX-512, AVX2+FMA and baseline x86-64, chosen at load time
// (the exp/log loops vectorize only with the wider ISAs). float64 is the gradcheck path.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NLX_VECTORIZED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NLX_VECTORIZED
#endif

namespace nonlocal_ext {
namespace cpu {

constexpr int64_t kColBlock = 256;

// Rows per tile. Each tile GEMM packs its key (value) tile of kColBlock × D (× C) floats; more rows
// amortize that packing over more work, which matters when D + C is large (bench/NOTES.md,
// "Row blocks by feature width"). The backward of `row` caches 3 × rows × M products per thread,
// so wide blocks are used only while that cache stays small.
// The rows are then split evenly (784 rows: 4 blocks of 196, not 3 of 256 and one of 16).
// Half-precision tiles (see HalfTiles) always take wide blocks: each of their GEMMs is one call
// through the dispatcher, whose cost 256 rows amortize.
inline int64_t row_block_for(int64_t n, int64_t m, int64_t d, int64_t c, bool half) {
  constexpr int64_t kWide = 256, kCacheBytes = int64_t(32) << 20;
  const int64_t most = (half || d + c >= 384) && 3 * kWide * m * int64_t(sizeof(double)) <= kCacheBytes ? kWide : 64;
  const int64_t blocks = std::max<int64_t>(1, (n + most - 1) / most);
  return std::max<int64_t>(1, (n + blocks - 1) / blocks);
}

enum class Normalize : int { None, Count, Row, Sym };

// ----------------------------------------------------------------------------------------------
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
// torch built without oneDNN's micro-kernels raises, and the BLAS path is used instead.
bool brgemm_available() {
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
// Half-precision tile GEMMs. bfloat16 (float16) inputs multiply in that precision where the CPU
// has dot-product instructions for it (avx512_bf16 or AMX; avx512_fp16 or AMX-FP16): through
// at::mm_out, which runs oneDNN's matmul there, with float32 accumulation inside the product and
// its result rounded once to half and widened at once into the float32 tile or accumulator.
// Weights, exp/log and statistics stay float32. A float32 tile that is a GEMM operand (W before
// W·v, the backward's Â and C) is rounded to half once, as FlashAttention does with P.
// (ATen's brgemm needs AMX for half operands; without it, it falls back to a loop no faster than
// float32: bench/NOTES.md, "bfloat16 tiles on the matrix units".)

// NONLOCAL_EXT_CPU_HALF_GEMMS=0 / =1 turns the half tile GEMMs off / on whatever the CPU has (the
// tests run both paths on every machine; on a CPU without the instructions oneDNN emulates them).
bool half_gemm_available(at::ScalarType dtype) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  if (const char* forced = std::getenv("NONLOCAL_EXT_CPU_HALF_GEMMS")) {
    if (std::string(forced) == "0") return false;
    if (std::string(forced) == "1") return true;
  }
  static const auto caps = at::cpu::get_cpu_capabilities();
  const auto has = [&](const char* name) {
    const auto it = caps.find(name);
    return it != caps.end() && it->second.isBool() && it->second.toBool();
  };
  if (dtype == at::kBFloat16) return has("avx512_bf16") || has("amx_bf16");
  if (dtype == at::kHalf) return has("avx512_fp16") || has("amx_fp16");
  return false;
}

// The half copies of a pass's operands for one batch element, and one thread's scratch. Row-major,
// like the float32 operands of Roles: a (rows × d), b (cols × d), their transposes, v (cols × c),
// vᵀ (c × cols), G (rows × c). Null where a pass does not use them.
struct HalfTiles {
  at::ScalarType dtype;
  bool products;  // q·kᵀ in half as well (dot family); distance kernels keep ρ's products float32
  const uint16_t *a, *b, *a_t, *b_t, *value, *value_t, *grad;
  uint16_t *operand, *result;  // scratch: a rounded operand tile, a GEMM result tile
};

at::Tensor half_view(at::ScalarType dtype, const uint16_t* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<uint16_t*>(data), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(dtype));
}

NLX_INLINE uint16_t bfloat16_bits(float x) {  // round to nearest even; a NaN stays a (quiet) NaN
  const uint32_t u = static_cast<uint32_t>(float_to_bits(x));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return x != x ? static_cast<uint16_t>((u >> 16) | 0x40u) : static_cast<uint16_t>(rounded);
}

// dst (rows × cols, contiguous) = src (rows × cols, leading dimension lds) rounded to half.
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

// c (rows × cols, ldc) = [c +] a·b for half a (rows × inner, lda) and b (inner × cols, ldb).
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

// ----------------------------------------------------------------------------------------------
// Which input plays the rows and which the columns of a tile. The row pass uses (a, b) =
// (query, key); the column passes use (key, query). `symmetric` adds f(a2_i, b2_j) with
// (a2, b2) = (b, a) of the same rows and columns: ½[f(q_i, k_j) + f(k_i, q_j)].
// The column operands are also given transposed (d × cols, leading dimension `ld_t`), so that
// every tile product is an untransposed GEMM (see gemm).
template <typename T>
struct Roles {
  const T *a, *b, *a_sqnorm, *b_sqnorm;     // a: rows × d, b: cols × d, squared norms or null
  const T *a2, *b2, *a2_sqnorm, *b2_sqnorm;  // symmetric partners (rows of b, cols of a)
  const T *b_t, *b2_t;                      // bᵀ, b2ᵀ: d × cols (b2_t null unless symmetric)
  int64_t d, ld_t;
  const HalfTiles* half = nullptr;          // half copies for the matrix units, or null
};

template <typename T>
Roles<T> roles(const T* rows_in, const T* cols_in, const T* rows_sqnorm, const T* cols_sqnorm,
               const T* rows_t, const T* cols_t, int64_t d, int64_t cols) {
  return {rows_in, cols_in, rows_sqnorm, cols_sqnorm, cols_in, rows_in, cols_sqnorm, rows_sqnorm,
          cols_t, rows_t, d, cols};
}

template <typename T>
NLX_INLINE T norm_or_zero(const T* sqnorm, int64_t i) {
  return sqnorm ? sqnorm[i] : T(0);
}

template <typename T, Kernel K, bool SYMM, bool DIRECT>
NLX_INLINE void weights_loop(const Roles<T>& r, const KernelArgs<T>& p, int64_t i0, int64_t bi,
                             int64_t j0, int64_t bj, T* s1, const T* s2) {
  const T* bn = is_distance(K) ? r.b_sqnorm + j0 : nullptr;
  const T* b2n = is_distance(K) ? r.b2_sqnorm + j0 : nullptr;
  for (int64_t i = 0; i < bi; ++i) {
    T* row = s1 + i * bj;
    const T an = norm_or_zero(is_distance(K) ? r.a_sqnorm : nullptr, i0 + i);
    if constexpr (SYMM) {
      const T* row2 = s2 + i * bj;
      const T a2n = norm_or_zero(is_distance(K) ? r.a2_sqnorm : nullptr, i0 + i);
      for (int64_t j = 0; j < bj; ++j) {
        T w1 = weight<T, K, DIRECT>(row[j], an, is_distance(K) ? bn[j] : T(0), p);
        T w2 = weight<T, K, DIRECT>(row2[j], a2n, is_distance(K) ? b2n[j] : T(0), p);
        row[j] = K == Kernel::Gaussian ? log_mean_exp(w1, w2) : T(0.5) * (w1 + w2);
      }
    } else {
      for (int64_t j = 0; j < bj; ++j) row[j] = weight<T, K, DIRECT>(row[j], an, is_distance(K) ? bn[j] : T(0), p);
    }
  }
}

// The same from products already in s1 (s2): s1 ← W̃ (log W̃).
template <typename T, Kernel K, bool SYMM>
NLX_INLINE void weights_from_products(const Roles<T>& r, const KernelArgs<T>& p, int64_t i0, int64_t bi,
                                      int64_t j0, int64_t bj, T* s1, const T* s2) {
  if constexpr (is_distance(K)) {
    if (p.direct) return weights_loop<T, K, SYMM, true>(r, p, i0, bi, j0, bj, s1, s2);
  }
  weights_loop<T, K, SYMM, false>(r, p, i0, bi, j0, bj, s1, s2);
}

// s ← ρ_ij = Σ_d (a_id − b_jd)² for rows i0.. of a (rows × d) and columns j0.. of b (cols × d).
template <typename T>
void squared_distances(const T* a, const T* b, int64_t d, int64_t i0, int64_t bi, int64_t j0, int64_t bj, T* s) {
  for (int64_t i = 0; i < bi; ++i) {
    const T* ai = a + (i0 + i) * d;
    for (int64_t j = 0; j < bj; ++j) {
      const T* bjp = b + (j0 + j) * d;
      T rho = T(0);
      for (int64_t e = 0; e < d; ++e) rho += (ai[e] - bjp[e]) * (ai[e] - bjp[e]);
      s[i * bj + j] = rho;
    }
  }
}

// The pair variables' products of a tile, row-major with leading dimension bj: s1 = a_I b_Jᵀ (and
// s2 = a2_I b2_Jᵀ when symmetric), or ρ itself under direct differences (p.direct).
template <typename T>
void tile_products(const Roles<T>& r, const KernelArgs<T>& p, bool symmetric, int64_t i0, int64_t bi,
                   int64_t j0, int64_t bj, T* s1, T* s2) {
  const int64_t d = r.d;
  if (p.direct) {
    squared_distances(r.a, r.b, d, i0, bi, j0, bj, s1);
    if (symmetric) squared_distances(r.a2, r.b2, d, i0, bi, j0, bj, s2);
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (r.half && r.half->products) {  // a2 = b and b2ᵀ = aᵀ (see roles)
      const HalfTiles& h = *r.half;
      half_gemm(h, bi, bj, d, h.a + i0 * d, d, h.b_t + j0, r.ld_t, false, s1, bj);
      if (symmetric) half_gemm(h, bi, bj, d, h.b + i0 * d, d, h.a_t + j0, r.ld_t, false, s2, bj);
      return;
    }
  }
  gemm<T>(false, false, bi, bj, d, T(1), r.a + i0 * d, d, r.b_t + j0, r.ld_t, T(0), s1, bj);
  if (symmetric) gemm<T>(false, false, bi, bj, d, T(1), r.a2 + i0 * d, d, r.b2_t + j0, r.ld_t, T(0), s2, bj);
}

// gv = G_I v_Jᵀ of a backward tile (G: rows × c, vᵀ: c × cols with leading dimension cols).
template <typename T>
void grad_value_products(const Roles<T>& r, const T* g, const T* v_t, int64_t c, int64_t cols, int64_t i0,
                         int64_t bi, int64_t j0, int64_t bj, T* gv) {
  if constexpr (std::is_same_v<T, float>) {
    if (r.half) return half_gemm(*r.half, bi, bj, c, r.half->grad + i0 * c, c, r.half->value_t + j0, cols, false, gv, bj);
  }
  gemm<T>(false, false, bi, bj, c, T(1), g + i0 * c, c, v_t + j0, cols, T(0), gv, bj);
}

// s1 ← W̃ (or log W̃ for gaussian) of the tile rows i0..i0+bi × columns j0..j0+bj, row-major
// with leading dimension bj; s2 is scratch of the same size for the symmetric term.
template <typename T, Kernel K, bool SYMM>
NLX_INLINE void tile_weights(const Roles<T>& r, const KernelArgs<T>& p, int64_t i0, int64_t bi,
                             int64_t j0, int64_t bj, T* s1, T* s2) {
  tile_products<T>(r, p, SYMM, i0, bi, j0, bj, s1, s2);
  weights_from_products<T, K, SYMM>(r, p, i0, bi, j0, bj, s1, s2);
}

// ----------------------------------------------------------------------------------------------
// Forward row pass.

// Running per-row state of one row block. Linear domain: r = Σ w, h = Σ w b. Log domain
// (gaussian): acc and h are scaled by exp(−m2), m2 = running max of z + log b; r is kept as
// (m, l) with l = Σ exp(z − m) only when b is not 1 (else it equals (m2, h)).
template <typename T>
struct RowState {
  std::vector<T> acc, r, h, m, l, m2;
  RowState(int64_t rows, int64_t c)
      : acc(rows * c, T(0)), r(rows, T(0)), h(rows, T(0)),
        m(rows, -std::numeric_limits<T>::infinity()), l(rows, T(0)),
        m2(rows, -std::numeric_limits<T>::infinity()) {}
};

// Reductions over a tile row in kLanes independent lanes, combined in a fixed order: the
// compiler vectorizes the lanes (it may not reorder a single running sum), and the result is
// the same for every thread count.
constexpr int64_t kLanes = 16;

template <typename T>
NLX_INLINE T row_sum(const T* x, int64_t n) {
  T lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += x[j + l];
  T sum = T(0);
  for (; j < n; ++j) sum += x[j];
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

template <typename T>
NLX_INLINE T row_max(const T* x, int64_t n) {
  T lanes[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = x[j + l] > lanes[l] ? x[j + l] : lanes[l];
  T mx = -std::numeric_limits<T>::infinity();
  for (; j < n; ++j) mx = x[j] > mx ? x[j] : mx;
  for (int64_t l = 0; l < kLanes; ++l) mx = lanes[l] > mx ? lanes[l] : mx;
  return mx;
}

// Accumulate one row block against all columns. `value` null: statistics only (the column
// pass). `col_factor`: b_j (log b_j for gaussian), null when b = 1. s1 and s2 are tile-sized
// scratch (s2 is free again once tile_weights has used it).
template <typename T, Kernel K, bool SYMM>
NLX_INLINE void row_pass(const Roles<T>& r, const KernelArgs<T>& p, int64_t cols, const T* value,
                         int64_t c, const T* col_factor, int64_t i0, int64_t bi, RowState<T>& st,
                         T* s1, T* s2) {
  for (int64_t j0 = 0; j0 < cols; j0 += kColBlock) {
    const int64_t bj = std::min(kColBlock, cols - j0);
    tile_weights<T, K, SYMM>(r, p, i0, bi, j0, bj, s1, s2);
    const T* cf = col_factor ? col_factor + j0 : nullptr;
    for (int64_t i = 0; i < bi; ++i) {
      T* w = s1 + i * bj;
      T* tmp = s2 + i * bj;
      if constexpr (K == Kernel::Gaussian) {
        if (cf) {  // the normalizer log r, on its own running max
          const T m_new = std::max(st.m[i], row_max(w, bj));
          for (int64_t j = 0; j < bj; ++j) tmp[j] = Math<T>::exp(w[j] - m_new);
          st.l[i] = st.l[i] * Math<T>::exp(st.m[i] - m_new) + row_sum(tmp, bj);
          st.m[i] = m_new;
          for (int64_t j = 0; j < bj; ++j) w[j] += cf[j];
        }
        const T m_new = std::max(st.m2[i], row_max(w, bj));
        const T rescale = Math<T>::exp(st.m2[i] - m_new);
        for (int64_t j = 0; j < bj; ++j) w[j] = Math<T>::exp(w[j] - m_new);
        st.h[i] = st.h[i] * rescale + row_sum(w, bj);
        st.m2[i] = m_new;
        if (value && rescale != T(1)) {
          T* acc = st.acc.data() + i * c;
          for (int64_t e = 0; e < c; ++e) acc[e] *= rescale;
        }
      } else {
        st.r[i] += row_sum(w, bj);
        if (cf) {
          for (int64_t j = 0; j < bj; ++j) w[j] *= cf[j];
          st.h[i] += row_sum(w, bj);
        }
      }
    }
    if (value)
      tile_gemm<T>(r.half, bi, c, bj, s1, bj, value + j0 * c, r.half ? r.half->value + j0 * c : nullptr, c, true,
                   st.acc.data(), c);
  }
}

// ----------------------------------------------------------------------------------------------
// Backward tile: from s1 (s2) = the GEMMs of the pair variable and gv = G_I v_Jᵀ, the
// normalized affinities â (into `ahat`), and C1 (C2) = ∂L/∂s of the first (symmetric) term.

template <typename T>
struct BackwardRows {  // per-row / per-column vectors of one batch element
  const T *a, *b;  // normalization factors (log factors for gaussian)
  const T *R, *X, *Y, *gu;
};

template <typename T, Kernel K, bool SYMM, bool SYMNORM, bool DIRECT>
NLX_INLINE void backward_tile_loop(const Roles<T>& r, const KernelArgs<T>& p, const BackwardRows<T>& v,
                                   int64_t i0, int64_t bi, int64_t j0, int64_t bj, const T* s1,
                                   const T* s2, const T* gv, T* ahat, T* c1, T* c2) {
  // Column vectors as local restrict pointers: loads through the structs would be reloaded
  // after every store (possible aliasing) and keep the loop from vectorizing.
  const T* __restrict bsq = is_distance(K) ? r.b_sqnorm + j0 : nullptr;
  const T* __restrict b2sq = is_distance(K) && SYMM ? r.b2_sqnorm + j0 : nullptr;
  const T* __restrict bf = v.b + j0;
  const T* __restrict Y = SYMNORM ? v.Y + j0 : nullptr;
  const T half = SYMM ? T(0.5) : T(1);
  const KernelArgs<T> args = p;
  for (int64_t i = 0; i < bi; ++i) {
    const int64_t gi = i0 + i;
    const T an = norm_or_zero(is_distance(K) ? r.a_sqnorm : nullptr, gi);
    const T a2n = norm_or_zero(is_distance(K) && SYMM ? r.a2_sqnorm : nullptr, gi);
    const T ai = v.a[gi], Ri = v.R[gi], gui = v.gu[gi], Xi = SYMNORM ? v.X[gi] : T(0);
    const T* __restrict s1r = s1 + i * bj;
    const T* __restrict s2r = SYMM ? s2 + i * bj : nullptr;
    const T* __restrict gvr = gv + i * bj;
    T* __restrict ar = ahat + i * bj;
    T* __restrict c1r = c1 + i * bj;
    T* __restrict c2r = SYMM ? c2 + i * bj : nullptr;
    for (int64_t j = 0; j < bj; ++j) {
      const T bn = is_distance(K) ? bsq[j] : T(0);
      const T b2n = is_distance(K) && SYMM ? b2sq[j] : T(0);
      const T bj_ = bf[j];
      const T Yj = SYMNORM ? Y[j] : T(0);
      const WeightSlope<T> first = weight_and_slope<T, K, DIRECT>(s1r[j], an, bn, args);
      WeightSlope<T> second{T(0), T(0), T(0)};
      if constexpr (SYMM) second = weight_and_slope<T, K, DIRECT>(s2r[j], a2n, b2n, args);
      const T w1 = first.weight, f1 = first.slope, w2 = second.weight, f2 = second.slope;
      const T da = gvr[j] - gui;
      if constexpr (K == Kernel::Gaussian) {  // a, b hold log factors; w holds z
        const T shift = ai + bj_;
        const T e1 = Math<T>::exp(w1 + shift);
        const T e2 = SYMM ? Math<T>::exp(w2 + shift) : T(0);
        ar[j] = SYMM ? T(0.5) * (e1 + e2) : e1;
        T g1 = e1 * (da - Ri), g2 = e2 * (da - Ri);
        if constexpr (SYMNORM) {
          g1 -= Xi * Math<T>::exp(w1 + ai + ai) + Yj * Math<T>::exp(w1 + bj_ + bj_);
          if constexpr (SYMM) g2 -= Xi * Math<T>::exp(w2 + ai + ai) + Yj * Math<T>::exp(w2 + bj_ + bj_);
        }
        c1r[j] = half * args.scale * g1;
        if constexpr (SYMM) c2r[j] = half * args.scale * g2;
      } else {
        const T ab = ai * bj_;
        const T wt = SYMM ? T(0.5) * (w1 + w2) : w1;
        ar[j] = wt * ab;
        T dw = ab * (da - Ri);
        if constexpr (SYMNORM) dw -= Xi * ai * ai + Yj * bj_ * bj_;
        c1r[j] = first.live != T(0) ? half * dw * f1 : T(0);
        if constexpr (SYMM) c2r[j] = second.live != T(0) ? half * dw * f2 : T(0);
      }
    }
  }
}

template <typename T, Kernel K, bool SYMM, bool SYMNORM>
NLX_INLINE void backward_tile_impl(const Roles<T>& r, const KernelArgs<T>& p, const BackwardRows<T>& v,
                                   int64_t i0, int64_t bi, int64_t j0, int64_t bj, const T* s1,
                                   const T* s2, const T* gv, T* ahat, T* c1, T* c2) {
  if constexpr (is_distance(K)) {
    if (p.direct)
      return backward_tile_loop<T, K, SYMM, SYMNORM, true>(r, p, v, i0, bi, j0, bj, s1, s2, gv, ahat, c1, c2);
  }
  backward_tile_loop<T, K, SYMM, SYMNORM, false>(r, p, v, i0, bi, j0, bj, s1, s2, gv, ahat, c1, c2);
}

// e_ij = dâ_ij â_ij of one tile (â from the weights w, or log weights for gaussian, and the
// factors a, b): rows[i] += Σ_j e_ij, cols[j] += Σ_i e_ij. `e` is tile-sized scratch.
template <typename T>
NLX_INLINE void terms_tile(bool log_domain, int64_t bi, int64_t bj, const T* w, const T* gv, const T* a,
                           const T* b, const T* gu, T* e, T* rows, T* cols) {
  for (int64_t i = 0; i < bi; ++i) {
    const T *wr = w + i * bj, *gvr = gv + i * bj;
    T* er = e + i * bj;
    if (log_domain)
      for (int64_t j = 0; j < bj; ++j) er[j] = (gvr[j] - gu[i]) * Math<T>::exp(wr[j] + a[i] + b[j]);
    else
      for (int64_t j = 0; j < bj; ++j) er[j] = (gvr[j] - gu[i]) * (wr[j] * a[i] * b[j]);
    rows[i] += row_sum(er, bj);
    for (int64_t j = 0; j < bj; ++j) cols[j] += er[j];
  }
}

// Row and column sums of the backward tiles: Σ_j â_ij (for du), Σ_j C1_ij and Σ_i C1_ij (the
// q ⊙ C1 terms of distance kernels), and those of C2 when symmetric (c2 non-null).
template <typename T>
NLX_INLINE void tile_sums(int64_t bi, int64_t bj, const T* ahat, const T* c1, const T* c2, T* ahat_rows,
                          T* c1_rows, T* c1_cols, T* c2_rows, T* c2_cols) {
  for (int64_t i = 0; i < bi; ++i) {
    const T *ar = ahat + i * bj, *cr = c1 + i * bj;
    ahat_rows[i] += row_sum(ar, bj);
    c1_rows[i] += row_sum(cr, bj);
    for (int64_t j = 0; j < bj; ++j) c1_cols[j] += cr[j];
    if (c2) {
      const T* cr2 = c2 + i * bj;
      c2_rows[i] += row_sum(cr2, bj);
      for (int64_t j = 0; j < bj; ++j) c2_cols[j] += cr2[j];
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Kernel dispatch of the tile code. The float32 entry points are compiled once per ISA.

template <typename T, template <Kernel, bool> class Body, typename... Args>
NLX_INLINE void dispatch_kernel(Kernel kernel, bool symmetric, Args&&... args) {
#define NLX_CASE(K)                                                  \
  case K:                                                            \
    if (symmetric)                                                   \
      Body<K, true>::template run<T>(std::forward<Args>(args)...);   \
    else                                                             \
      Body<K, false>::template run<T>(std::forward<Args>(args)...);  \
    break;
  switch (kernel) {
    NLX_CASE(Kernel::Dot)
    NLX_CASE(Kernel::Gaussian)
    NLX_CASE(Kernel::Rbf)
    NLX_CASE(Kernel::Fractional)
    NLX_CASE(Kernel::Log)
  }
#undef NLX_CASE
}

template <Kernel K, bool SYMM>
struct RowPassBody {
  template <typename T>
  static NLX_INLINE void run(const Roles<T>& r, const KernelArgs<T>& p, int64_t cols, const T* value,
                             int64_t c, const T* col_factor, int64_t i0, int64_t bi, RowState<T>& st,
                             T* s1, T* s2) {
    row_pass<T, K, SYMM>(r, p, cols, value, c, col_factor, i0, bi, st, s1, s2);
  }
};

template <Kernel K, bool SYMM>
struct TileWeightsBody {
  template <typename T>
  static NLX_INLINE void run(const Roles<T>& r, const KernelArgs<T>& p, int64_t i0, int64_t bi,
                             int64_t j0, int64_t bj, T* s1, T* s2) {
    tile_weights<T, K, SYMM>(r, p, i0, bi, j0, bj, s1, s2);
  }
};

template <Kernel K, bool SYMM>
struct WeightsFromProductsBody {
  template <typename T>
  static NLX_INLINE void run(const Roles<T>& r, const KernelArgs<T>& p, int64_t i0, int64_t bi,
                             int64_t j0, int64_t bj, T* s1, const T* s2) {
    weights_from_products<T, K, SYMM>(r, p, i0, bi, j0, bj, s1, s2);
  }
};

template <Kernel K, bool SYMM>
struct BackwardTileBody {
  template <typename T>
  static NLX_INLINE void run(bool symnorm, const Roles<T>& r, const KernelArgs<T>& p,
                             const BackwardRows<T>& v, int64_t i0, int64_t bi, int64_t j0, int64_t bj,
                             const T* s1, const T* s2, const T* gv, T* ahat, T* c1, T* c2) {
    if (symnorm)
      backward_tile_impl<T, K, SYMM, true>(r, p, v, i0, bi, j0, bj, s1, s2, gv, ahat, c1, c2);
    else
      backward_tile_impl<T, K, SYMM, false>(r, p, v, i0, bi, j0, bj, s1, s2, gv, ahat, c1, c2);
  }
};

// One function per tile operation and dtype; float32 ones carry the ISA clones.
#define NLX_TILE_ENTRY_POINTS(T, ATTR)                                                                \
  ATTR void row_pass_entry(Kernel k, bool symm, const Roles<T>& r, const KernelArgs<T>& p,            \
                           int64_t cols, const T* value, int64_t c, const T* col_factor, int64_t i0,  \
                           int64_t bi, RowState<T>& st, T* s1, T* s2) {                               \
    dispatch_kernel<T, RowPassBody>(k, symm, r, p, cols, value, c, col_factor, i0, bi, st, s1, s2);   \
  }                                                                                                   \
  ATTR void tile_weights_entry(Kernel k, bool symm, const Roles<T>& r, const KernelArgs<T>& p,        \
                               int64_t i0, int64_t bi, int64_t j0, int64_t bj, T* s1, T* s2) {        \
    dispatch_kernel<T, TileWeightsBody>(k, symm, r, p, i0, bi, j0, bj, s1, s2);                       \
  }                                                                                                   \
  ATTR void weights_from_products_entry(Kernel k, bool symm, const Roles<T>& r,                       \
                                        const KernelArgs<T>& p, int64_t i0, int64_t bi, int64_t j0,   \
                                        int64_t bj, T* s1, const T* s2) {                             \
    dispatch_kernel<T, WeightsFromProductsBody>(k, symm, r, p, i0, bi, j0, bj, s1, s2);               \
  }                                                                                                   \
  ATTR void backward_tile_entry(Kernel k, bool symm, bool symnorm, const Roles<T>& r,                 \
                                const KernelArgs<T>& p, const BackwardRows<T>& v, int64_t i0,         \
                                int64_t bi, int64_t j0, int64_t bj, const T* s1, const T* s2,         \
                                const T* gv, T* ahat, T* c1, T* c2) {                                 \
    dispatch_kernel<T, BackwardTileBody>(k, symm, symnorm, r, p, v, i0, bi, j0, bj, s1, s2, gv, ahat, \
                                         c1, c2);                                                     \
  }                                                                                                   \
  ATTR void terms_tile_entry(bool log_domain, int64_t bi, int64_t bj, const T* w, const T* gv,        \
                             const T* a, const T* b, const T* gu, T* e, T* rows, T* cols) {           \
    terms_tile<T>(log_domain, bi, bj, w, gv, a, b, gu, e, rows, cols);                                \
  }                                                                                                   \
  ATTR void tile_sums_entry(int64_t bi, int64_t bj, const T* ahat, const T* c1, const T* c2,          \
                            T* ahat_rows, T* c1_rows, T* c1_cols, T* c2_rows, T* c2_cols) {           \
    tile_sums<T>(bi, bj, ahat, c1, c2, ahat_rows, c1_rows, c1_cols, c2_rows, c2_cols);                \
  }

NLX_TILE_ENTRY_POINTS(float, NLX_VECTORIZED)
NLX_TILE_ENTRY_POINTS(double, )
#undef NLX_TILE_ENTRY_POINTS

// ----------------------------------------------------------------------------------------------
// Host side: arguments, statistics, the passes.

struct Options {
  Kernel kernel;
  Normalize normalize;
  bool diffusion, symmetric;
  double scale, power, gamma, eps;
  int64_t row_block = 64;  // rows per tile, set from the shapes by row_block_for
};

Kernel parse_kernel(c10::string_view name) {
  if (name == "dot") return Kernel::Dot;
  if (name == "gaussian") return Kernel::Gaussian;
  if (name == "rbf") return Kernel::Rbf;
  if (name == "fractional") return Kernel::Fractional;
  if (name == "log") return Kernel::Log;
  TORCH_CHECK(false, "nonlocal_ext: unknown kernel '", std::string(name), "'");
}

Normalize parse_normalize(c10::string_view name) {
  if (name == "none") return Normalize::None;
  if (name == "count") return Normalize::Count;
  if (name == "row") return Normalize::Row;
  if (name == "sym") return Normalize::Sym;
  TORCH_CHECK(false, "nonlocal_ext: unknown normalize '", std::string(name), "'");
}

Options parse_options(c10::string_view kernel, double scale, double power, double gamma, double eps,
                      c10::string_view normalize, c10::string_view update, bool symmetric) {
  TORCH_CHECK(update == "aggregate" || update == "diffusion", "nonlocal_ext: unknown update '",
              std::string(update), "'");
  return {parse_kernel(kernel), parse_normalize(normalize), update == "diffusion", symmetric,
          scale, power, gamma, eps};
}

void check_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                  const std::optional<at::Tensor>& self_value, const Options& o) {
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3,
              "nonlocal_ext: query, key, value must be (B, N, D), (B, M, D), (B, M, C)");
  TORCH_CHECK(query.size(0) == key.size(0) && key.size(0) == value.size(0) &&
                  query.size(2) == key.size(2) && key.size(1) == value.size(1),
              "nonlocal_ext: mismatched shapes of query, key, value");
  for (const at::Tensor* t : {&query, &key, &value}) {
    TORCH_CHECK(t->device().is_cpu(), "nonlocal_ext CPU kernels: tensors must be on the CPU");
    TORCH_CHECK(t->scalar_type() == query.scalar_type() &&
                    (t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble ||
                     t->scalar_type() == at::kBFloat16 || t->scalar_type() == at::kHalf),
                "nonlocal_ext CPU kernels: float32, float64, bfloat16 or float16 tensors of one dtype expected");
  }
  if (self_value) {
    TORCH_CHECK(o.diffusion, "nonlocal_ext: self_value needs update='diffusion'");
    TORCH_CHECK(self_value->dim() == 3 && self_value->size(0) == query.size(0) &&
                    self_value->size(1) == query.size(1) && self_value->size(2) == value.size(2),
                "nonlocal_ext: self_value must be (B, N, C)");
    TORCH_CHECK(self_value->scalar_type() == query.scalar_type() && self_value->device().is_cpu(),
                "nonlocal_ext: self_value must match query's dtype and device");
  }
  if (o.symmetric || (o.diffusion && !self_value))
    TORCH_CHECK(query.size(1) == key.size(1), "nonlocal_ext: symmetric / diffusion without self_value need N == M");
}

template <typename T>
KernelArgs<T> kernel_args(const Options& o, int64_t features) {
  return {static_cast<T>(o.scale), static_cast<T>(0.5 * o.power), static_cast<T>(o.gamma), static_cast<T>(o.eps),
          is_distance(o.kernel) && features <= kDirectMaxFeatures};
}

// Normalization factor from a statistic (log factor for gaussian), Â = diag(a) W diag(b):
// none a = 1 · count a = 1/M · row a = 1/r · sym a = r^−½, and b = c^−½ (the same formula on the
// column sums). A zero sum gives a zero factor (safe divide); a negative one under sym, NaN.
// The forward's output scaling and the backward's factors both take it from here.
template <typename T>
T row_factor(T stat, const Options& o, int64_t m) {
  const bool log_domain = o.kernel == Kernel::Gaussian;
  switch (o.normalize) {
    case Normalize::None:
      return log_domain ? T(0) : T(1);
    case Normalize::Count:
      return log_domain ? -std::log(static_cast<T>(m)) : T(1) / static_cast<T>(m);
    case Normalize::Row:
      return log_domain ? -stat : (stat == T(0) ? T(0) : T(1) / stat);
    case Normalize::Sym:
      return log_domain ? T(-0.5) * stat : (stat == T(0) ? T(0) : T(1) / std::sqrt(stat));
  }
  return stat;
}

template <typename T>
at::Tensor row_factors(const at::Tensor& row_stats, const Options& o, int64_t m) {
  const at::Tensor stats = row_stats.contiguous();
  auto factors = at::empty_like(stats);
  const T* src = stats.data_ptr<T>();
  T* dst = factors.data_ptr<T>();
  for (int64_t i = 0; i < stats.numel(); ++i) dst[i] = row_factor(src[i], o, m);
  return factors;
}


at::Tensor squared_norms(const at::Tensor& x, const Options& o) {
  return is_distance(o.kernel) ? x.square().sum(-1) : at::Tensor();
}

// x (B, L, d) as a contiguous (B, d, L): the transposed column operand of the tile GEMMs.
at::Tensor transposed(const at::Tensor& x) {
  return x.transpose(1, 2).contiguous();
}

// Data of batch element bt of an optional per-batch tensor (undefined: null).
template <typename T>
const T* ptr_or_null(const at::Tensor& t, int64_t bt) {
  return t.defined() ? t[bt].data_ptr<T>() : nullptr;
}

// The half copies of the inputs for every batch element (contiguous, (B, ·, ·)); dtype Undefined:
// the float32 GEMMs. kᵀ, qᵀ only for half products, vᵀ and G only in the backward.
struct HalfInputs {
  at::ScalarType dtype = at::ScalarType::Undefined;
  bool products = false;
  at::Tensor q, k, q_t, k_t, v, v_t, g;

  bool on() const { return dtype != at::ScalarType::Undefined; }

  // The HalfTiles of batch element bt on the given scratch. `swapped`: the column pass of sym (rows = keys).
  HalfTiles tiles(int64_t bt, bool swapped, uint16_t* operand, uint16_t* result) const {
    const auto at_batch = [bt](const at::Tensor& t) -> const uint16_t* {
      return t.defined() ? static_cast<const uint16_t*>(t.data_ptr()) + bt * t.stride(0) : nullptr;
    };
    return {dtype, products, at_batch(swapped ? k : q), at_batch(swapped ? q : k), at_batch(swapped ? k_t : q_t),
            at_batch(swapped ? q_t : k_t), swapped ? nullptr : at_batch(v), at_batch(v_t), at_batch(g),
            operand, result};
  }
};

// One thread's half-precision scratch (an operand tile and a GEMM result tile of up to `rows` rows,
// none when the half GEMMs are off) and the HalfTiles it hands to the tiles of batch element bt.
struct HalfScratch {
  const HalfInputs& in;
  std::vector<uint16_t> operand, result;
  HalfTiles current;
  HalfScratch(const HalfInputs& inputs, int64_t rows, int64_t d, int64_t c)
      : in(inputs),
        operand(inputs.on() ? std::max(rows, kColBlock) * kColBlock : 0),
        result(inputs.on() ? std::max(rows, kColBlock) * std::max({kColBlock, d, c}) : 0) {}
  const HalfTiles* tiles(int64_t bt, bool swapped) {
    if (!in.on()) return nullptr;
    current = in.tiles(bt, swapped, operand.data(), result.data());
    return &current;
  }
};

// HalfInputs of half-precision q, k, v (and G in the backward), contiguous.
HalfInputs half_inputs(at::ScalarType dtype, const Options& o, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& g) {
  HalfInputs h;
  h.dtype = dtype;
  h.products = !is_distance(o.kernel);
  h.q = q;
  h.k = k;
  h.v = v;
  if (h.products) {
    h.k_t = k.transpose(1, 2).contiguous();
    if (o.symmetric || o.normalize == Normalize::Sym) h.q_t = q.transpose(1, 2).contiguous();
  }
  if (g.defined()) {
    h.v_t = v.transpose(1, 2).contiguous();
    h.g = g;
  }
  return h;
}

// row_pass for every (batch element, block of rows) of rows_in against all of cols_in, in
// parallel; finish(bt, i0, bi, state) then reads each block's running state. `value` and
// `col_factor` may be undefined (statistics only; b = 1).
template <typename T, typename Finish>
void for_each_row_block(const at::Tensor& rows_in, const at::Tensor& cols_in, const at::Tensor& rows_sqnorm,
                        const at::Tensor& cols_sqnorm, const at::Tensor& value, const at::Tensor& col_factor,
                        const Options& o, const HalfInputs& half, bool swapped, const Finish& finish) {
  const int64_t batch = rows_in.size(0), rows = rows_in.size(1), cols = cols_in.size(1), d = rows_in.size(2);
  const int64_t c = value.defined() ? value.size(2) : 0;
  const int64_t rb = o.row_block, blocks = (rows + rb - 1) / rb;
  const KernelArgs<T> p = kernel_args<T>(o, d);
  // The float32 transposes are the products' operands: not needed when those run in half.
  const bool float_products = !half.products;
  const at::Tensor cols_t = float_products ? transposed(cols_in) : at::Tensor();
  const at::Tensor rows_t = o.symmetric && float_products ? transposed(rows_in) : at::Tensor();
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    BrgemmScope brgemm_scope;
    std::vector<T> s1(rb * kColBlock), s2(rb * kColBlock);
    HalfScratch half_scratch(half, rb, d, c);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bt = task / blocks, i0 = (task % blocks) * rb, bi = std::min(rb, rows - i0);
      Roles<T> r = roles<T>(rows_in[bt].data_ptr<T>(), cols_in[bt].data_ptr<T>(),
                            ptr_or_null<T>(rows_sqnorm, bt), ptr_or_null<T>(cols_sqnorm, bt),
                            ptr_or_null<T>(rows_t, bt), ptr_or_null<T>(cols_t, bt), d, cols);
      r.half = half_scratch.tiles(bt, swapped);
      RowState<T> st(bi, c);
      row_pass_entry(o.kernel, o.symmetric, r, p, cols, ptr_or_null<T>(value, bt), c,
                     ptr_or_null<T>(col_factor, bt), i0, bi, st, s1.data(), s2.data());
      finish(bt, i0, bi, st);
    }
  });
}

// Per-row statistics of rows_in against all of cols_in (r, or log r for gaussian), for every
// batch element: the column pass of `sym` (with the roles of query and key swapped).
template <typename T>
at::Tensor normalizer_pass(const at::Tensor& rows_in, const at::Tensor& cols_in, const at::Tensor& rows_sqnorm,
                           const at::Tensor& cols_sqnorm, const Options& o, const HalfInputs& half) {
  auto stats = at::full({rows_in.size(0), rows_in.size(1)}, std::numeric_limits<double>::quiet_NaN(),
                        rows_in.options());
  for_each_row_block<T>(rows_in, cols_in, rows_sqnorm, cols_sqnorm, at::Tensor(), at::Tensor(), o, half, true,
                        [&](int64_t bt, int64_t i0, int64_t bi, const RowState<T>& st) {
                          T* out = stats[bt].data_ptr<T>() + i0;
                          for (int64_t i = 0; i < bi; ++i)
                            out[i] = o.kernel == Kernel::Gaussian ? st.m2[i] + std::log(st.h[i]) : st.r[i];
                        });
  return stats;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& u,
                                                            const Options& o, const HalfInputs& half) {
  const int64_t batch = q.size(0), n = q.size(1), m = k.size(1), c = v.size(2);
  const bool log_domain = o.kernel == Kernel::Gaussian;
  // Poisoned with NaN so that an element the passes below fail to write cannot go unnoticed.
  const double nan = std::numeric_limits<double>::quiet_NaN();
  auto out = at::full({batch, n, c}, nan, q.options());
  auto row_stats = at::full({batch, n}, nan, q.options());
  auto col_stats = at::full({batch, o.normalize == Normalize::Sym ? m : 0}, nan, q.options());
  if (batch == 0 || n == 0) return {out, row_stats, col_stats};
  if (m == 0) {  // empty sums: no affinity, zero output (validated upstream: normalize none/count)
    out.zero_();
    row_stats.fill_(log_domain ? -std::numeric_limits<double>::infinity() : 0.0);
    return {out, row_stats, col_stats};
  }
  const at::Tensor qn = squared_norms(q, o), kn = squared_norms(k, o);
  at::Tensor colf;  // b_j (log b_j) of sym, else undefined (b = 1)
  if (o.normalize == Normalize::Sym) {
    col_stats.copy_(normalizer_pass<T>(k, q, kn, qn, o, half));
    colf = row_factors<T>(col_stats, o, m);
  }
  const bool with_b = colf.defined();
  for_each_row_block<T>(q, k, qn, kn, v, colf, o, half, false, [&](int64_t bt, int64_t i0, int64_t bi,
                                                                   const RowState<T>& st) {
    T* out_rows = out[bt].data_ptr<T>() + i0 * c;
    T* stat = row_stats[bt].data_ptr<T>() + i0;
    const T* u_rows = u.defined() ? u[bt].data_ptr<T>() + i0 * c : nullptr;
    for (int64_t i = 0; i < bi; ++i) {
      T factor, rowsum;  // out_i = factor·acc_i − [diffusion] rowsum·u_i
      if (log_domain) {
        const T log_r = with_b ? st.m[i] + std::log(st.l[i]) : st.m2[i] + std::log(st.h[i]);
        stat[i] = log_r;
        factor = std::exp(st.m2[i] + row_factor(log_r, o, m));
        rowsum = factor * st.h[i];
      } else {
        const T ri = st.r[i];
        stat[i] = ri;
        factor = row_factor(ri, o, m);
        rowsum = factor * (with_b ? st.h[i] : ri);
      }
      const T* acc = st.acc.data() + i * c;
      T* dst = out_rows + i * c;
      for (int64_t e = 0; e < c; ++e) dst[e] = factor * acc[e];
      if (u_rows)
        for (int64_t e = 0; e < c; ++e) dst[e] -= rowsum * u_rows[i * c + e];
    }
  });
  return {out, row_stats, col_stats};
}

// The backward's work split: column blocks in `groups` contiguous ranges per batch element,
// a number fixed by the shapes (never by the thread count). A group owns the columns of its
// blocks and keeps partial sums for rows, added in group order afterwards.
//
// How many groups: up to 8 tasks per call, but at least kGroupLines rows (columns) per group, since
// each group zeroes and finally adds a partial copy of the rows' (columns') gradients: with fewer
// lines per group that copy costs more than 5% of the group's GEMM work (bench/NOTES.md, "bfloat16
// tiles on the matrix units", its last paragraph).
constexpr int64_t kGroupLines = 512;

inline int64_t group_count(int64_t batch, int64_t blocks, int64_t lines) {
  const int64_t most = std::min<int64_t>((8 + batch - 1) / batch, std::max<int64_t>(1, lines / kGroupLines));
  return std::max<int64_t>(1, std::min<int64_t>(blocks, most));
}

struct GroupSplit {
  int64_t col_blocks, groups, blocks_per_group, row_blocks;
  GroupSplit(int64_t batch, int64_t n, int64_t m, int64_t rows)
      : col_blocks((m + kColBlock - 1) / kColBlock),
        groups(group_count(batch, col_blocks, m)),
        blocks_per_group((col_blocks + groups - 1) / groups),
        row_blocks((n + rows - 1) / rows) {}
  int64_t first(int64_t group) const { return group * blocks_per_group; }
  int64_t last(int64_t group) const { return std::min(col_blocks, (group + 1) * blocks_per_group); }
};

// S_i = Σ_j dâ_ij â_ij and T_j = Σ_i dâ_ij â_ij, summed from the tiles themselves. (S_i also
// equals G_i·out_i, but dâ_ij − S_i cancels when a row's weight sits on few columns, and the
// cancellation is only exact when both terms come from the same products.)
template <typename T>
std::pair<at::Tensor, at::Tensor> normalization_terms(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, const at::Tensor& g,
                                                      const at::Tensor& qn, const at::Tensor& kn,
                                                      const at::Tensor& a, const at::Tensor& b,
                                                      const at::Tensor& gu, const Options& o,
                                                      const HalfInputs& half) {
  const int64_t batch = q.size(0), n = q.size(1), m = k.size(1), d = q.size(2), c = v.size(2);
  const bool log_domain = o.kernel == Kernel::Gaussian;
  const GroupSplit split(batch, n, m, o.row_block);
  auto row_part = at::zeros({batch, split.groups, n}, q.options());
  auto col_terms = at::zeros({batch, m}, q.options());
  const KernelArgs<T> p = kernel_args<T>(o, d);
  const bool float_products = !half.products, float_values = !half.on();
  const at::Tensor q_t = o.symmetric && float_products ? transposed(q) : at::Tensor();
  const at::Tensor k_t = float_products ? transposed(k) : at::Tensor(), v_t = float_values ? transposed(v) : at::Tensor();
  at::parallel_for(0, batch * split.groups, 1, [&](int64_t begin, int64_t end) {
    BrgemmScope brgemm_scope;
    const int64_t tile = o.row_block * kColBlock;
    std::vector<T> s1(tile), s2(tile), gv(tile);
    HalfScratch half_scratch(half, o.row_block, d, c);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bt = task / split.groups, grp = task % split.groups;
      Roles<T> r = roles<T>(q[bt].data_ptr<T>(), k[bt].data_ptr<T>(), ptr_or_null<T>(qn, bt), ptr_or_null<T>(kn, bt),
                            ptr_or_null<T>(q_t, bt), ptr_or_null<T>(k_t, bt), d, m);
      r.half = half_scratch.tiles(bt, false);
      const T *av = a[bt].data_ptr<T>(), *bv = b[bt].data_ptr<T>(), *guv = gu[bt].data_ptr<T>();
      const T *vtb = ptr_or_null<T>(v_t, bt), *gb = g[bt].data_ptr<T>();
      T* rows = row_part[bt][grp].data_ptr<T>();
      T* cols = col_terms[bt].data_ptr<T>();
      for (int64_t jb = split.first(grp); jb < split.last(grp); ++jb) {
        const int64_t j0 = jb * kColBlock, bj = std::min(kColBlock, m - j0);
        for (int64_t ib = 0; ib < split.row_blocks; ++ib) {
          const int64_t i0 = ib * o.row_block, bi = std::min(o.row_block, n - i0);
          tile_weights_entry(o.kernel, o.symmetric, r, p, i0, bi, j0, bj, s1.data(), s2.data());
          grad_value_products<T>(r, gb, vtb, c, m, i0, bi, j0, bj, gv.data());
          terms_tile_entry(log_domain, bi, bj, s1.data(), gv.data(), av + i0, bv + j0, guv + i0, s2.data(),
                           rows + i0, cols + j0);
        }
      }
    }
  });
  return {row_part.sum(1), col_terms};
}

// What the backward schedules produce, per batch element; assemble_gradients combines them.
// C1 / C2 are ∂L/∂(pair variable) of the direct / swapped (symmetric) term of each pair.
struct GradientParts {
  at::Tensor dq_rows, dq_rows_sum;  // Σ_j C1_ij k_j (B, N, D), Σ_j C1_ij (B, N)
  at::Tensor dk_cols, dk_cols_sum;  // Σ_i C1_ij q_i (B, M, D), Σ_i C1_ij (B, M)
  at::Tensor dk_rows, dk_rows_sum;  // symmetric: Σ_j C2_ij q_j, Σ_j C2_ij (rows of k)
  at::Tensor dq_cols, dq_cols_sum;  // symmetric: Σ_i C2_ij k_i, Σ_i C2_ij (columns = rows of q)
  at::Tensor ahat_rowsum;           // Σ_j â_ij (B, N)
  at::Tensor dv;                    // Âᵀ G (B, M, C)
};

// Vectors of the tile formulas: normalization factors, row/column terms, G·u; and the transposed
// operands of the tile GEMMs (qᵀ only when symmetric).
struct BackwardVectors {
  at::Tensor qn, kn, a, b, R, X, Y, gu;
  at::Tensor q_t, k_t, v_t;
  HalfInputs half;  // half copies of q, k, v, G for the tile GEMMs, or none

  template <typename T>
  BackwardRows<T> rows_of(int64_t bt) const {  // the pointers of batch element bt
    return {a[bt].data_ptr<T>(), b[bt].data_ptr<T>(), R[bt].data_ptr<T>(),
            X[bt].data_ptr<T>(), Y[bt].data_ptr<T>(), gu[bt].data_ptr<T>()};
  }
};

// Where one tile's gradient contributions go: base pointers of row-indexed (rows of q) and
// column-indexed (rows of k) accumulators; the symmetric ones are null when not symmetric.
template <typename T>
struct TileSinks {
  T *dv, *dq_rows, *dk_cols, *dk_rows, *dq_cols;                         // × C, × D, × D, × D, × D
  T *ahat_rowsum, *dq_rows_sum, *dk_cols_sum, *dk_rows_sum, *dq_cols_sum;  // scalars per row / column
};

template <typename T>
struct TileScratch {
  std::vector<T> ahat, c1, c2, flipped;  // flipped: a transposed tile, the left operand of Xᵀ·Y products
  explicit TileScratch(int64_t rows)
      : ahat(rows * kColBlock), c1(rows * kColBlock), c2(rows * kColBlock), flipped(rows * kColBlock) {}
};

// dst (cols × rows) = srcᵀ for a row-major rows × cols tile.
template <typename T>
void transpose_tile(int64_t rows, int64_t cols, const T* src, T* dst) {
  constexpr int64_t kStep = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kStep)
    for (int64_t j0 = 0; j0 < cols; j0 += kStep)
      for (int64_t i = i0; i < std::min(rows, i0 + kStep); ++i)
        for (int64_t j = j0; j < std::min(cols, j0 + kStep); ++j) dst[j * rows + i] = src[i * cols + j];
}

// One backward tile, rows i0..+bi × columns j0..+bj, from its products s1 (s2) and gv = G_I v_Jᵀ:
// Â and C (backward_tile_entry), then dv_J += Âᵀ G_I, dq_I += C1 k_J, dk_J += C1ᵀ q_I (and
// dk_I += C2 q_J, dq_J += C2ᵀ k_I when symmetric), and the row / column sums of Â and C.
template <typename T>
void backward_tile_gradients(const Options& o, bool symnorm, const Roles<T>& r, const KernelArgs<T>& p,
                             const BackwardRows<T>& vec, const T* gb, int64_t c, int64_t i0, int64_t bi,
                             int64_t j0, int64_t bj, const T* s1, const T* s2, const T* gv, TileScratch<T>& t,
                             const TileSinks<T>& out) {
  const int64_t d = r.d;
  const T *qb = r.a, *kb = r.b;
  T *ahat = t.ahat.data(), *c1 = t.c1.data(), *c2 = t.c2.data();
  T* flipped = t.flipped.data();
  backward_tile_entry(o.kernel, o.symmetric, symnorm, r, p, vec, i0, bi, j0, bj, s1, s2, gv, ahat, c1, c2);
  const HalfTiles* h = r.half;  // half copies of G, q, k (null: float32 GEMMs)
  const auto half_rows = [&](const uint16_t* HalfTiles::*member, int64_t row, int64_t width) -> const uint16_t* {
    return h ? h->*member + row * width : nullptr;
  };
  transpose_tile(bi, bj, ahat, flipped);
  tile_gemm<T>(h, bj, c, bi, flipped, bi, gb + i0 * c, half_rows(&HalfTiles::grad, i0, c), c, true, out.dv + j0 * c, c);
  tile_gemm<T>(h, bi, d, bj, c1, bj, kb + j0 * d, half_rows(&HalfTiles::b, j0, d), d, true, out.dq_rows + i0 * d, d);
  transpose_tile(bi, bj, c1, flipped);
  tile_gemm<T>(h, bj, d, bi, flipped, bi, qb + i0 * d, half_rows(&HalfTiles::a, i0, d), d, true, out.dk_cols + j0 * d, d);
  if (o.symmetric) {
    tile_gemm<T>(h, bi, d, bj, c2, bj, qb + j0 * d, half_rows(&HalfTiles::a, j0, d), d, true, out.dk_rows + i0 * d, d);
    transpose_tile(bi, bj, c2, flipped);
    tile_gemm<T>(h, bj, d, bi, flipped, bi, kb + i0 * d, half_rows(&HalfTiles::b, i0, d), d, true,
                 out.dq_cols + j0 * d, d);
  }
  tile_sums_entry(bi, bj, ahat, c1, o.symmetric ? c2 : nullptr, out.ahat_rowsum + i0, out.dq_rows_sum + i0,
                  out.dk_cols_sum + j0, o.symmetric ? out.dk_rows_sum + i0 : nullptr,
                  o.symmetric ? out.dq_cols_sum + j0 : nullptr);
}

// Column-grouped schedule (every normalization): each group owns dv, dk of its column blocks
// and keeps partial rows of dq (and of dk for the symmetric term), summed in group order.
template <typename T>
GradientParts backward_by_column_groups(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const BackwardVectors& bv, const Options& o) {
  const int64_t batch = q.size(0), n = q.size(1), m = k.size(1), d = q.size(2), c = v.size(2);
  const bool symnorm = o.normalize == Normalize::Sym;
  const GroupSplit split(batch, n, m, o.row_block);
  const int64_t groups = split.groups;
  auto opts = q.options();
  auto dq_part = at::zeros({batch, groups, n, d}, opts), dq_sum_part = at::zeros({batch, groups, n}, opts);
  auto ahat_part = at::zeros({batch, groups, n}, opts);
  GradientParts parts;
  parts.dk_cols = at::zeros({batch, m, d}, opts);
  parts.dk_cols_sum = at::zeros({batch, m}, opts);
  parts.dv = at::zeros({batch, m, c}, opts);
  at::Tensor dk2_part, dk2_sum_part;
  if (o.symmetric) {
    dk2_part = at::zeros({batch, groups, n, d}, opts);
    dk2_sum_part = at::zeros({batch, groups, n}, opts);
    parts.dq_cols = at::zeros({batch, m, d}, opts);
    parts.dq_cols_sum = at::zeros({batch, m}, opts);
  }
  const KernelArgs<T> p = kernel_args<T>(o, d);
  at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    BrgemmScope brgemm_scope;
    const int64_t tile = o.row_block * kColBlock;
    std::vector<T> s1(tile), s2(tile), gv(tile);
    TileScratch<T> scratch(o.row_block);
    HalfScratch half_scratch(bv.half, o.row_block, d, c);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bt = task / groups, grp = task % groups;
      const T *qb = q[bt].data_ptr<T>(), *kb = k[bt].data_ptr<T>(), *gb = g[bt].data_ptr<T>();
      const T *qtb = ptr_or_null<T>(bv.q_t, bt), *ktb = ptr_or_null<T>(bv.k_t, bt), *vtb = ptr_or_null<T>(bv.v_t, bt);
      Roles<T> r = roles<T>(qb, kb, ptr_or_null<T>(bv.qn, bt), ptr_or_null<T>(bv.kn, bt), qtb, ktb, d, m);
      r.half = half_scratch.tiles(bt, false);
      const BackwardRows<T> vec = bv.template rows_of<T>(bt);
      T* none = nullptr;
      const TileSinks<T> sinks{
          parts.dv[bt].data_ptr<T>(), dq_part[bt][grp].data_ptr<T>(), parts.dk_cols[bt].data_ptr<T>(),
          o.symmetric ? dk2_part[bt][grp].data_ptr<T>() : none, o.symmetric ? parts.dq_cols[bt].data_ptr<T>() : none,
          ahat_part[bt][grp].data_ptr<T>(), dq_sum_part[bt][grp].data_ptr<T>(), parts.dk_cols_sum[bt].data_ptr<T>(),
          o.symmetric ? dk2_sum_part[bt][grp].data_ptr<T>() : none,
          o.symmetric ? parts.dq_cols_sum[bt].data_ptr<T>() : none};
      for (int64_t jb = split.first(grp); jb < split.last(grp); ++jb) {
        const int64_t j0 = jb * kColBlock, bj = std::min(kColBlock, m - j0);
        for (int64_t ib = 0; ib < split.row_blocks; ++ib) {
          const int64_t i0 = ib * o.row_block, bi = std::min(o.row_block, n - i0);
          tile_products<T>(r, p, o.symmetric, i0, bi, j0, bj, s1.data(), s2.data());
          grad_value_products<T>(r, gb, vtb, c, m, i0, bi, j0, bj, gv.data());
          backward_tile_gradients(o, symnorm, r, p, vec, gb, c, i0, bi, j0, bj, s1.data(), s2.data(), gv.data(),
                                  scratch, sinks);
        }
      }
    }
  });
  parts.dq_rows = dq_part.sum(1);
  parts.dq_rows_sum = dq_sum_part.sum(1);
  parts.ahat_rowsum = ahat_part.sum(1);
  if (o.symmetric) {
    parts.dk_rows = dk2_part.sum(1);
    parts.dk_rows_sum = dk2_sum_part.sum(1);
  }
  return parts;
}

// Row-block schedule for `row`: C_ij needs S_i = Σ_j dâ_ij â_ij of its whole row. Each row block
// sweeps its columns twice, keeping the products q_I kᵀ (k_I qᵀ) and G_I vᵀ of the first sweep in
// a row-block cache (rows × M each) for the second: GEMM work 3D + 2C per pair instead of
// 4D + 3C with a separate statistics pass. Row groups (a count fixed by the shapes) keep
// partial columns of dv and dk, summed in group order.
template <typename T>
GradientParts backward_by_row_blocks(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, BackwardVectors& bv, const Options& o) {
  const int64_t batch = q.size(0), n = q.size(1), m = k.size(1), d = q.size(2), c = v.size(2);
  const int64_t rb = o.row_block, row_blocks = (n + rb - 1) / rb;
  // As GroupSplit, and fewer when the column partials would pass 256 MB.
  const int64_t group_bytes = m * (c + 2 * d + 2) * static_cast<int64_t>(sizeof(T));
  int64_t groups = group_count(batch, row_blocks, n);
  groups = std::max<int64_t>(1, std::min<int64_t>(groups, (int64_t(256) << 20) / std::max<int64_t>(group_bytes, 1)));
  const int64_t blocks_per_group = (row_blocks + groups - 1) / groups;
  auto opts = q.options();
  GradientParts parts;
  parts.dq_rows = at::zeros({batch, n, d}, opts);
  parts.dq_rows_sum = at::zeros({batch, n}, opts);
  parts.ahat_rowsum = at::zeros({batch, n}, opts);
  auto dv_part = at::zeros({batch, groups, m, c}, opts);
  auto dk_part = at::zeros({batch, groups, m, d}, opts), dk_sum_part = at::zeros({batch, groups, m}, opts);
  at::Tensor dq2_part, dq2_sum_part;
  if (o.symmetric) {
    parts.dk_rows = at::zeros({batch, n, d}, opts);
    parts.dk_rows_sum = at::zeros({batch, n}, opts);
    dq2_part = at::zeros({batch, groups, m, d}, opts);
    dq2_sum_part = at::zeros({batch, groups, m}, opts);
  }
  auto S = at::zeros({batch, n}, opts);
  bv.R = S;  // filled per row block by the first sweep, before the second reads it
  const KernelArgs<T> p = kernel_args<T>(o, d);
  const bool log_domain = o.kernel == Kernel::Gaussian;
  at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    const int64_t tile = rb * kColBlock, cache = rb * m;
    std::vector<T> s1c(cache), s2c(o.symmetric ? cache : 0), gvc(cache);
    std::vector<T> w(tile), e(tile), unused_cols(kColBlock);
    BrgemmScope brgemm_scope;
    TileScratch<T> scratch(rb);
    HalfScratch half_scratch(bv.half, rb, d, c);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bt = task / groups, grp = task % groups;
      const T *qb = q[bt].data_ptr<T>(), *kb = k[bt].data_ptr<T>(), *gb = g[bt].data_ptr<T>();
      const T *qtb = ptr_or_null<T>(bv.q_t, bt), *ktb = ptr_or_null<T>(bv.k_t, bt), *vtb = ptr_or_null<T>(bv.v_t, bt);
      Roles<T> r = roles<T>(qb, kb, ptr_or_null<T>(bv.qn, bt), ptr_or_null<T>(bv.kn, bt), qtb, ktb, d, m);
      r.half = half_scratch.tiles(bt, false);
      const BackwardRows<T> vec = bv.template rows_of<T>(bt);
      T* Sb = S[bt].data_ptr<T>();
      T* none = nullptr;
      const TileSinks<T> sinks{
          dv_part[bt][grp].data_ptr<T>(), parts.dq_rows[bt].data_ptr<T>(), dk_part[bt][grp].data_ptr<T>(),
          o.symmetric ? parts.dk_rows[bt].data_ptr<T>() : none, o.symmetric ? dq2_part[bt][grp].data_ptr<T>() : none,
          parts.ahat_rowsum[bt].data_ptr<T>(), parts.dq_rows_sum[bt].data_ptr<T>(), dk_sum_part[bt][grp].data_ptr<T>(),
          o.symmetric ? parts.dk_rows_sum[bt].data_ptr<T>() : none,
          o.symmetric ? dq2_sum_part[bt][grp].data_ptr<T>() : none};
      const int64_t first = grp * blocks_per_group, last = std::min(row_blocks, first + blocks_per_group);
      for (int64_t ib = first; ib < last; ++ib) {
        const int64_t i0 = ib * rb, bi = std::min(rb, n - i0);
        for (int64_t j0 = 0; j0 < m; j0 += kColBlock) {  // sweep 1: products, S_i
          const int64_t bj = std::min(kColBlock, m - j0);
          T *s1 = s1c.data() + j0 * bi, *s2 = o.symmetric ? s2c.data() + j0 * bi : nullptr, *gv = gvc.data() + j0 * bi;
          tile_products<T>(r, p, o.symmetric, i0, bi, j0, bj, s1, s2);
          grad_value_products<T>(r, gb, vtb, c, m, i0, bi, j0, bj, gv);
          std::copy(s1, s1 + bi * bj, w.begin());
          weights_from_products_entry(o.kernel, o.symmetric, r, p, i0, bi, j0, bj, w.data(), s2);
          terms_tile_entry(log_domain, bi, bj, w.data(), gv, vec.a + i0, vec.b + j0, vec.gu + i0, e.data(),
                           Sb + i0, unused_cols.data());
        }
        for (int64_t j0 = 0; j0 < m; j0 += kColBlock) {  // sweep 2: C and the gradient GEMMs
          const int64_t bj = std::min(kColBlock, m - j0);
          const T *s1 = s1c.data() + j0 * bi, *s2 = o.symmetric ? s2c.data() + j0 * bi : nullptr, *gv = gvc.data() + j0 * bi;
          backward_tile_gradients(o, false, r, p, vec, gb, c, i0, bi, j0, bj, s1, s2, gv, scratch, sinks);
        }
      }
    }
  });
  parts.dv = dv_part.sum(1);
  parts.dk_cols = dk_part.sum(1);
  parts.dk_cols_sum = dk_sum_part.sum(1);
  if (o.symmetric) {
    parts.dq_cols = dq2_part.sum(1);
    parts.dq_cols_sum = dq2_sum_part.sum(1);
  }
  return parts;
}

// dq, dk (distance kernels: 2(x ⊙ Σ C − C y)), dv and du from the parts.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> assemble_gradients(
    GradientParts parts, const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, bool has_self_value,
    const Options& o) {
  at::Tensor dq = parts.dq_rows, dq_sum = parts.dq_rows_sum, dk = parts.dk_cols, dk_sum = parts.dk_cols_sum;
  if (o.symmetric) {
    dq = dq + parts.dq_cols;
    dq_sum = dq_sum + parts.dq_cols_sum;
    dk = dk + parts.dk_rows;
    dk_sum = dk_sum + parts.dk_rows_sum;
  }
  if (is_distance(o.kernel)) {
    dq = 2.0 * (q * dq_sum.unsqueeze(-1) - dq);
    dk = 2.0 * (k * dk_sum.unsqueeze(-1) - dk);
  }
  at::Tensor dv = parts.dv;
  std::optional<at::Tensor> du;
  if (o.diffusion) {
    auto minus_rowsum_g = -parts.ahat_rowsum.unsqueeze(-1) * g;  // −rowsum(Â)_i G_i
    if (has_self_value)
      du = minus_rowsum_g;
    else
      dv = dv + minus_rowsum_g;
  }
  return {dq, dk, dv, du};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> backward_impl(
    const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& u,
    bool has_self_value, const at::Tensor& row_stats, const at::Tensor& col_stats, const Options& o,
    const HalfInputs& half) {
  const int64_t batch = q.size(0), n = q.size(1), m = k.size(1);
  if (batch == 0 || n == 0 || m == 0) {
    std::optional<at::Tensor> grad_u;
    if (has_self_value) grad_u = at::zeros_like(u);
    return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v), grad_u};
  }
  const bool symnorm = o.normalize == Normalize::Sym;
  BackwardVectors bv;  // O(N + M) each
  bv.qn = squared_norms(q, o);
  bv.kn = squared_norms(k, o);
  bv.gu = o.diffusion ? (g * u).sum(-1) : at::zeros({batch, n}, q.options());
  bv.a = row_factors<T>(row_stats, o, m);
  bv.b = symnorm ? row_factors<T>(col_stats, o, m)
                 : (o.kernel == Kernel::Gaussian ? at::zeros({batch, m}, q.options()) : at::ones({batch, m}, q.options()));
  const bool float_products = !half.products, float_values = !half.on();  // else half copies
  bv.q_t = o.symmetric && float_products ? transposed(q) : at::Tensor();
  bv.k_t = float_products ? transposed(k) : at::Tensor();
  bv.v_t = float_values ? transposed(v) : at::Tensor();
  bv.R = bv.X = at::zeros_like(bv.gu);
  bv.Y = at::zeros({batch, m}, q.options());
  bv.half = half;
  GradientParts parts;
  if (o.normalize == Normalize::Row) {
    parts = backward_by_row_blocks<T>(g, q, k, v, bv, o);
  } else {
    if (symnorm) {
      auto [S, Tc] = normalization_terms<T>(q, k, v, g, bv.qn, bv.kn, bv.a, bv.b, bv.gu, o, half);
      bv.X = 0.5 * S;
      bv.Y = 0.5 * Tc;
    }
    parts = backward_by_column_groups<T>(g, q, k, v, bv, o);
  }
  return assemble_gradients(std::move(parts), g, q, k, has_self_value, o);
}

// ----------------------------------------------------------------------------------------------
// Operator entry points.

// Half-precision inputs: the kernels run in float32 on widened copies, with half copies for the
// tile GEMMs where the CPU multiplies half natively (half_gemm_available); results in the inputs'
// dtype, statistics in float32.
bool is_half(at::ScalarType dtype) {
  return dtype == at::kBFloat16 || dtype == at::kHalf;
}

at::Tensor widened(const at::Tensor& t) {
  return t.defined() && is_half(t.scalar_type()) ? t.to(at::kFloat) : t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aggregate_forward_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& self_value, c10::string_view kernel, double scale, double power,
    double gamma, double eps, c10::string_view normalize, c10::string_view update, bool symmetric) {
  Options o = parse_options(kernel, scale, power, gamma, eps, normalize, update, symmetric);
  check_inputs(query, key, value, self_value, o);
  const at::ScalarType dtype = query.scalar_type();
  const bool half_gemms = half_gemm_available(dtype);
  o.row_block = row_block_for(query.size(1), key.size(1), query.size(2), value.size(2), half_gemms);
  at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  at::Tensor u;
  if (o.diffusion) u = self_value ? self_value->contiguous() : v;
  const HalfInputs half = half_gemms ? half_inputs(dtype, o, q, k, v, at::Tensor()) : HalfInputs();
  q = widened(q);
  k = widened(k);
  v = widened(v);
  u = widened(u);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nonlocal_ext::aggregate_forward", [&] {
    result = forward_impl<scalar_t>(q, k, v, u, o, half);
  });
  if (is_half(dtype)) std::get<0>(result) = std::get<0>(result).to(dtype);
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> aggregate_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& self_value, const at::Tensor& out, const at::Tensor& row_stats,
    const at::Tensor& col_stats, c10::string_view kernel, double scale, double power, double gamma,
    double eps, c10::string_view normalize, c10::string_view update, bool symmetric) {
  Options o = parse_options(kernel, scale, power, gamma, eps, normalize, update, symmetric);
  check_inputs(query, key, value, self_value, o);
  const at::ScalarType dtype = query.scalar_type();
  const bool half_gemms = half_gemm_available(dtype);
  o.row_block = row_block_for(query.size(1), key.size(1), query.size(2), value.size(2), half_gemms);
  // `out` is part of the schema for backends that form S_i = G_i·out_i; these kernels sum S_i
  // from the tiles instead (see normalization_terms).
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "nonlocal_ext: grad_out must have the shape of out");
  at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  at::Tensor g = grad_out.contiguous().to(dtype);
  at::Tensor u;
  if (o.diffusion) u = self_value ? self_value->contiguous() : v;
  const HalfInputs half = half_gemms ? half_inputs(dtype, o, q, k, v, g) : HalfInputs();
  q = widened(q);
  k = widened(k);
  v = widened(v);
  u = widened(u);
  g = widened(g);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> result;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nonlocal_ext::aggregate_backward", [&] {
    result = backward_impl<scalar_t>(g, q, k, v, u, self_value.has_value(),
                                     row_stats.contiguous(), col_stats.contiguous(), o, half);
  });
  if (is_half(dtype)) {
    auto& [dq, dk, dv, du] = result;
    dq = dq.to(dtype);
    dk = dk.to(dtype);
    dv = dv.to(dtype);
    if (du) du = du->to(dtype);
  }
  return result;
}

}  // namespace cpu
}  // namespace nonlocal_ext

TORCH_LIBRARY_IMPL(nonlocal_ext, CPU, m) {
  m.impl("aggregate_forward", &nonlocal_ext::cpu::aggregate_forward_cpu);
  m.impl("aggregate_backward", &nonlocal_ext::cpu::aggregate_backward_cpu);
}
