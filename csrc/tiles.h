// What the CPU schedules of forward_cpu.cpp and backward_cpu.cpp share.
//
// Everything is tiled: a tile of the affinity matrix, rows I (row_block_for) × columns J
// (kColBlock), is formed from one GEMM s = a_I b_Jᵀ (two with `symmetric`), turned into weights
// in cache by the elementwise code of tile_math.h, and consumed at once by the next GEMM. No
// N×M buffer exists; memory is O((N+M)(D+C)) plus per-row statistics.
//
// Here: the tile geometry, the roles of a tile's operands, its products and weights, the lane
// reductions and the kernel dispatch of the tile code; on the host side the options, the
// normalization factors, the transposed and half copies of the inputs, and the declarations of the
// two schedules (forward_impl, backward_impl), which aggregate_cpu.cpp calls.

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "blas.h"
#include "cpu_features.h"
#include "tile_math.h"

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
  // The products s1 of the whole rows × cols matrix (leading dimension ld_t), or null: `keep`, where the
  // forward writes them; `stored`, where the backward reads them instead of recomputing (never symmetric).
  T* keep = nullptr;
  const T* stored = nullptr;
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
        row[j] = is_log_domain(K) ? log_mean_exp(w1, w2) : T(0.5) * (w1 + w2);
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
  if (r.stored) {  // kept by the forward (not symmetric)
    for (int64_t i = 0; i < bi; ++i) std::copy_n(r.stored + (i0 + i) * r.ld_t + j0, bj, s1 + i * bj);
    return;
  }
  if (r.keep) {  // compute, then keep a copy (not symmetric)
    Roles<T> plain = r;
    plain.keep = nullptr;
    tile_products<T>(plain, p, false, i0, bi, j0, bj, s1, s2);
    for (int64_t i = 0; i < bi; ++i) std::copy_n(s1 + i * bj, bj, r.keep + (i0 + i) * r.ld_t + j0);
    return;
  }
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

// s1 ← W̃ (or log W̃ in the log domain) of the tile rows i0..i0+bi × columns j0..j0+bj, row-major
// with leading dimension bj; s2 is scratch of the same size for the symmetric term.
template <typename T, Kernel K, bool SYMM>
NLX_INLINE void tile_weights(const Roles<T>& r, const KernelArgs<T>& p, int64_t i0, int64_t bi,
                             int64_t j0, int64_t bj, T* s1, T* s2) {
  tile_products<T>(r, p, SYMM, i0, bi, j0, bj, s1, s2);
  weights_from_products<T, K, SYMM>(r, p, i0, bi, j0, bj, s1, s2);
}

// ----------------------------------------------------------------------------------------------
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

// ----------------------------------------------------------------------------------------------
// Kernel dispatch of the tile code: Body<K, SYMM>::run<T> for the kernel and `symmetric` known at
// run time. Each schedule wraps it in entry points, one function per tile operation and dtype; the
// float32 ones are compiled once per ISA (NLX_VECTORIZED).

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

// ----------------------------------------------------------------------------------------------
// Host side shared by the schedules: options, normalization factors, copies of the inputs.

struct Options {
  Kernel kernel;
  Normalize normalize;
  bool diffusion, symmetric;
  double scale, power, gamma, eps;
  int64_t row_block = 64;  // rows per tile, set from the shapes by row_block_for
};

template <typename T>
KernelArgs<T> kernel_args(const Options& o, int64_t features) {
  return {static_cast<T>(o.scale), static_cast<T>(0.5 * o.power), static_cast<T>(o.gamma), static_cast<T>(o.eps),
          is_distance(o.kernel) && features <= kDirectMaxFeatures};
}

// Normalization factor from a statistic (its log in the log domain), Â = diag(a) W diag(b):
// none a = 1 · count a = 1/M · row a = 1/r · sym a = r^−½, and b = c^−½ (the same formula on the
// column sums). A zero sum gives a zero factor (safe divide); a negative one under sym, NaN.
// The forward's output scaling and the backward's factors both take it from here.
template <typename T>
T row_factor(T stat, const Options& o, int64_t m) {
  const bool log_domain = is_log_domain(o.kernel);
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

// Squared norms (B, L) of the rows of x (B, L, d) for distance kernels, else undefined (points.cpp).
at::Tensor squared_norms(const at::Tensor& x, const Options& o);

// Distance kernels: query and key (contiguous, float32/float64) moved by the keys' mean μ per batch
// element (points.cpp); other kernels: the inputs themselves.
std::pair<at::Tensor, at::Tensor> translated_points(const at::Tensor& query, const at::Tensor& key,
                                                    const Options& o);

// Transposed copies, contiguous (B, d, L), of inputs (B, L, d): the column operands of the tile
// GEMMs (b_t, b2_t of Roles), of the float32 inputs and of their half copies (HalfInputs) alike.
// kᵀ for the products q·kᵀ (`products`); qᵀ as well where q plays the columns too (`swaps`: the
// symmetric term, sym's column pass); vᵀ for the backward's G·vᵀ (`values`). Undefined otherwise.
struct Transposes {
  at::Tensor q_t, k_t, v_t;
};

inline Transposes transposes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool products,
                             bool swaps, bool values) {
  Transposes t;
  if (products) t.k_t = transposed_copy(k);
  if (products && swaps) t.q_t = transposed_copy(q);
  if (values) t.v_t = transposed_copy(v);
  return t;
}

// An output buffer of the schedules: NaN-filled when the environment has NONLOCAL_EXT_POISON_OUTPUTS=1
// (the test suite sets it), so that an element no pass writes cannot go unnoticed; else uninitialized
// (every element is written; filling it would cost a pass over the output).
inline at::Tensor output_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static const bool poison = [] {
    const char* flag = std::getenv("NONLOCAL_EXT_POISON_OUTPUTS");
    return flag != nullptr && std::string(flag) == "1";
  }();
  return poison ? at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options) : at::empty(sizes, options);
}

// Data of batch element bt of a contiguous tensor whose first dimension is the batch (pointer
// arithmetic: indexing t[bt] would make a Tensor per call).
template <typename T>
T* batch_ptr(const at::Tensor& t, int64_t bt) {
  return t.data_ptr<T>() + bt * t.stride(0);
}

// Data of batch element bt of an optional per-batch tensor (undefined: null).
template <typename T>
const T* ptr_or_null(const at::Tensor& t, int64_t bt) {
  return t.defined() ? batch_ptr<T>(t, bt) : nullptr;
}

// The half copies of the inputs for every batch element (contiguous, (B, ·, ·)); dtype Undefined:
// the float32 GEMMs. kᵀ, qᵀ only for half products, vᵀ and G only in the backward.
struct HalfInputs {
  at::ScalarType dtype = at::ScalarType::Undefined;
  bool products = false;
  at::Tensor q, k, v, g;
  Transposes t;  // kᵀ, qᵀ, vᵀ

  bool on() const { return dtype != at::ScalarType::Undefined; }

  // The HalfTiles of batch element bt on the given scratch. `swapped`: the column pass of sym (rows = keys).
  HalfTiles tiles(int64_t bt, bool swapped, uint16_t* operand, uint16_t* result) const {
    const auto at_batch = [bt](const at::Tensor& x) -> const uint16_t* {
      return x.defined() ? static_cast<const uint16_t*>(x.data_ptr()) + bt * x.stride(0) : nullptr;
    };
    return {dtype, products, at_batch(swapped ? k : q), at_batch(swapped ? q : k), at_batch(swapped ? t.k_t : t.q_t),
            at_batch(swapped ? t.q_t : t.k_t), swapped ? nullptr : at_batch(v), at_batch(t.v_t), at_batch(g),
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

// The two schedules, on contiguous float32 / float64 inputs (half inputs come widened, with their
// half copies in `half`); defined, and instantiated for float and double, in forward_cpu.cpp and
// backward_cpu.cpp. `products` (B, N, M), when defined: the forward writes the tile products s1 into it,
// the backward reads them from it instead of recomputing q kᵀ (not symmetric).
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& u,
                                                            const Options& o, const HalfInputs& half,
                                                            const at::Tensor& products);

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> backward_impl(
    const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& u,
    bool has_self_value, const at::Tensor& row_stats, const at::Tensor& col_stats, const Options& o,
    const HalfInputs& half, const at::Tensor& products);

}  // namespace cpu
}  // namespace nonlocal_ext
