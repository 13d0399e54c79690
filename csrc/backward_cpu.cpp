// Backward schedules of the CPU kernels (nonlocal_ext::aggregate_backward; definitions:
// docs/semantics.md): the backward tile (Â and C), the statistics pass of sym, the column-grouped
// schedule (every normalization), the row-block schedule (row), and backward_impl, which picks one
// and assembles the gradients.
//
// Each tile is recomputed, or its products q_I k_Jᵀ read from the forward's (`products`). With
// G = ∂L/∂out and gu_i = G_i·u_i:
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
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "tiles.h"

namespace nonlocal_ext {
namespace cpu {

// ----------------------------------------------------------------------------------------------
// Backward tile: from s1 (s2) = the GEMMs of the pair variable and gv = G_I v_Jᵀ, the
// normalized affinities â (into `ahat`), and C1 (C2) = ∂L/∂s of the first (symmetric) term.

template <typename T>
struct BackwardRows {  // per-row / per-column vectors of one batch element
  const T *a, *b;  // normalization factors (their logs for a log-domain kernel)
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
      if constexpr (is_log_domain(K)) {  // a, b hold log factors; w holds z
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

// e_ij = dâ_ij â_ij of one tile (â from the weights w, or log weights in the log domain, and the
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
// Entry points of the tile code (see dispatch_kernel).

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
#define NLX_BACKWARD_ENTRY_POINTS(T, ATTR)                                                            \
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

NLX_BACKWARD_ENTRY_POINTS(float, NLX_VECTORIZED)
NLX_BACKWARD_ENTRY_POINTS(double, )
#undef NLX_BACKWARD_ENTRY_POINTS

// ----------------------------------------------------------------------------------------------
// Host side: the schedules.

// The backward's work split: column blocks in `groups` contiguous ranges per batch element,
// a number fixed by the shapes (never by the thread count). A group owns the columns of its
// blocks and keeps partial sums for rows, added in group order afterwards.
//
// How many groups: up to 8 tasks per call, but at least kGroupLines rows (columns) per group, since
// each group zeroes and finally adds a partial copy of the rows' (columns') gradients: with fewer
// lines per group that copy costs more than 5% of the group's GEMM work (bench/NOTES.md, "bfloat16
// tiles on the matrix units", its last paragraph).
constexpr int64_t kGroupLines = 512;

// One batch element takes at least two groups where it has two blocks: with one, a second core would idle through
// the whole backward (bench/NOTES.md, "Two backward tasks for one batch element").
inline int64_t group_count(int64_t batch, int64_t blocks, int64_t lines) {
  const int64_t fewest = batch == 1 ? 2 : 1;
  const int64_t most = std::min<int64_t>((8 + batch - 1) / batch, std::max<int64_t>(fewest, lines / kGroupLines));
  return std::max<int64_t>(1, std::min<int64_t>(blocks, most));
}

// `blocks` consecutive blocks in `groups` runs of ⌈blocks / groups⌉ each (the last runs may be shorter or empty).
struct GroupSplit {
  int64_t blocks, groups, blocks_per_group;
  GroupSplit(int64_t blocks, int64_t groups)
      : blocks(blocks), groups(groups), blocks_per_group((blocks + groups - 1) / groups) {}
  int64_t first(int64_t group) const { return group * blocks_per_group; }
  int64_t last(int64_t group) const { return std::min(blocks, (group + 1) * blocks_per_group); }
  int64_t busy_groups() const { return (blocks + blocks_per_group - 1) / blocks_per_group; }  // the first ones
};

// The column schedules' split of the M columns: blocks of kColBlock, group_count groups.
inline GroupSplit column_groups(int64_t batch, int64_t m) {
  const int64_t blocks = (m + kColBlock - 1) / kColBlock;
  return GroupSplit(blocks, group_count(batch, blocks, m));
}

// S_i = Σ_j dâ_ij â_ij and T_j = Σ_i dâ_ij â_ij, summed from the tiles themselves. (S_i also
// equals G_i·out_i, but dâ_ij − S_i cancels when a row's weight sits on few columns, and the
// cancellation is only exact when both terms come from the same products.)
template <typename T>
std::pair<at::Tensor, at::Tensor> normalization_terms(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, const at::Tensor& g,
                                                      const at::Tensor& qn, const at::Tensor& kn,
                                                      const at::Tensor& a, const at::Tensor& b,
                                                      const at::Tensor& gu, const Options& o,
                                                      const HalfInputs& half, const at::Tensor& products) {
  const int64_t batch = q.size(0), n = q.size(1), m = k.size(1), d = q.size(2), c = v.size(2);
  const bool log_domain = is_log_domain(o.kernel);
  const GroupSplit split = column_groups(batch, m);
  const int64_t row_blocks = (n + o.row_block - 1) / o.row_block;
  auto row_part = at::zeros({batch, split.groups, n}, q.options());
  auto col_terms = at::zeros({batch, m}, q.options());
  const KernelArgs<T> p = kernel_args<T>(o, d);
  // kᵀ (qᵀ) only where the tile products are recomputed in float32 (not kept by the forward, not in half)
  const Transposes t = transposes(q, k, v, !half.products && !products.defined(), o.symmetric, !half.on());
  at::parallel_for(0, batch * split.groups, 1, [&](int64_t begin, int64_t end) {
    BrgemmScope brgemm_scope;
    const int64_t tile = o.row_block * kColBlock;
    std::vector<T> s1(tile), s2(tile), gv(tile);
    HalfScratch half_scratch(half, o.row_block, d, c);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bt = task / split.groups, grp = task % split.groups;
      Roles<T> r = roles<T>(batch_ptr<T>(q, bt), batch_ptr<T>(k, bt), ptr_or_null<T>(qn, bt), ptr_or_null<T>(kn, bt),
                            ptr_or_null<T>(t.q_t, bt), ptr_or_null<T>(t.k_t, bt), d, m);
      r.half = half_scratch.tiles(bt, false);
      r.stored = ptr_or_null<T>(products, bt);
      const T *av = batch_ptr<T>(a, bt), *bv = batch_ptr<T>(b, bt), *guv = batch_ptr<T>(gu, bt);
      const T *vtb = ptr_or_null<T>(t.v_t, bt), *gb = batch_ptr<T>(g, bt);
      T* rows = row_part[bt][grp].data_ptr<T>();
      T* cols = batch_ptr<T>(col_terms, bt);
      for (int64_t jb = split.first(grp); jb < split.last(grp); ++jb) {
        const int64_t j0 = jb * kColBlock, bj = std::min(kColBlock, m - j0);
        for (int64_t ib = 0; ib < row_blocks; ++ib) {
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

// What the tiles of one batch element read: its Roles, G (rows × c), vᵀ (c × cols; null where the
// half copies stand in) and the per-row / per-column vectors.
template <typename T>
struct BatchOperands {
  Roles<T> r;
  const T *g, *v_t;
  BackwardRows<T> vec;
};

// Vectors of the tile formulas: normalization factors, row/column terms, G·u; and the transposed
// operands of the tile GEMMs (qᵀ only when symmetric).
struct BackwardVectors {
  at::Tensor qn, kn, a, b, R, X, Y, gu;
  Transposes t;     // qᵀ, kᵀ, vᵀ of the float32 GEMMs
  HalfInputs half;  // half copies of q, k, v, G for the tile GEMMs, or none
  at::Tensor products;  // the forward's tile products q kᵀ (B, N, M), or undefined: recomputed

  template <typename T>
  BackwardRows<T> rows_of(int64_t bt) const {  // the pointers of batch element bt
    return {batch_ptr<T>(a, bt), batch_ptr<T>(b, bt), batch_ptr<T>(R, bt),
            batch_ptr<T>(X, bt), batch_ptr<T>(Y, bt), batch_ptr<T>(gu, bt)};
  }

  // The operands of batch element bt (rows: q, columns: k), with the half tiles of one thread's scratch.
  template <typename T>
  BatchOperands<T> operands_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& g, int64_t bt,
                               HalfScratch& half_scratch) const {
    Roles<T> r = roles<T>(batch_ptr<T>(q, bt), batch_ptr<T>(k, bt), ptr_or_null<T>(qn, bt), ptr_or_null<T>(kn, bt),
                          ptr_or_null<T>(t.q_t, bt), ptr_or_null<T>(t.k_t, bt), q.size(2), k.size(1));
    r.half = half_scratch.tiles(bt, false);
    r.stored = ptr_or_null<T>(products, bt);
    return {r, batch_ptr<T>(g, bt), ptr_or_null<T>(t.v_t, bt), rows_of<T>(bt)};
  }
};

// Where one tile's gradient contributions go: base pointers of row-indexed (rows of q) and
// column-indexed (rows of k) accumulators; the symmetric ones are null when not symmetric.
template <typename T>
struct TileSinks {
  T *dv, *dq_rows, *dk_cols, *dk_rows, *dq_cols;                         // × C, × D, × D, × D, × D
  T *ahat_rowsum, *dq_rows_sum, *dk_cols_sum, *dk_rows_sum, *dq_cols_sum;  // scalars per row / column
};

// A schedule's accumulators of the GradientParts. The side of the tiles that each task owns (the
// rows of its row blocks, or the columns of its column group) is written in place, (B, lines[,
// width]); the other side, which every group touches, has one partial copy per group, (B, groups,
// lines[, width]), summed in group order by parts() (one group's is taken as it is). The symmetric
// term's only when symmetric. The matrices are not filled: each tile GEMM into them adds, except the
// first one a task makes into each line, which writes (β = 0; see backward_tile_gradients); the
// partials of groups that own no blocks (the last ones, when the blocks do not fill every group) are
// zeroed. Under NONLOCAL_EXT_POISON_OUTPUTS=1 they start as NaN (output_buffer), so the tests see an
// element no GEMM wrote. The per-line sums are added to and start at zero.
struct Accumulators {
  GradientParts acc;
  bool rows_owned;  // the row side is owned (the columns partial), else the other way round
  int64_t groups;

  // `busy_groups`: how many groups own at least one block (the first ones).
  Accumulators(const at::TensorOptions& opts, bool symmetric, bool rows_owned, int64_t batch, int64_t groups,
               int64_t busy_groups, int64_t n, int64_t m, int64_t d, int64_t c)
      : rows_owned(rows_owned), groups(groups) {
    const auto make = [&](bool owned, int64_t lines, int64_t width) {
      std::vector<int64_t> shape{batch};
      if (!owned) shape.push_back(groups);
      shape.push_back(lines);
      if (width == 0) return at::zeros(shape, opts);  // the sums
      shape.push_back(width);
      at::Tensor t = output_buffer(shape, opts);
      if (!owned && busy_groups < groups) t.narrow(1, busy_groups, groups - busy_groups).zero_();
      return t;
    };
    const bool rows = rows_owned, cols = !rows_owned;
    acc.dq_rows = make(rows, n, d);
    acc.dq_rows_sum = make(rows, n, 0);
    acc.ahat_rowsum = make(rows, n, 0);
    acc.dk_cols = make(cols, m, d);
    acc.dk_cols_sum = make(cols, m, 0);
    acc.dv = make(cols, m, c);
    if (symmetric) {
      acc.dk_rows = make(rows, n, d);
      acc.dk_rows_sum = make(rows, n, 0);
      acc.dq_cols = make(cols, m, d);
      acc.dq_cols_sum = make(cols, m, 0);
    }
  }

  template <typename T>
  TileSinks<T> sinks(int64_t bt, int64_t grp) const {  // of task (batch element bt, group grp)
    const auto ptr = [&](const at::Tensor& t, bool owned) -> T* {
      return !t.defined() ? nullptr : owned ? batch_ptr<T>(t, bt) : t[bt][grp].data_ptr<T>();
    };
    const bool rows = rows_owned, cols = !rows_owned;
    return {ptr(acc.dv, cols),          ptr(acc.dq_rows, rows),     ptr(acc.dk_cols, cols),
            ptr(acc.dk_rows, rows),     ptr(acc.dq_cols, cols),     ptr(acc.ahat_rowsum, rows),
            ptr(acc.dq_rows_sum, rows), ptr(acc.dk_cols_sum, cols), ptr(acc.dk_rows_sum, rows),
            ptr(acc.dq_cols_sum, cols)};
  }

  GradientParts parts() const {
    const int64_t count = groups;
    const auto sum = [count](const at::Tensor& t, bool owned) {
      return !t.defined() || owned ? t : count == 1 ? t.select(1, 0) : t.sum(1);
    };
    const bool rows = rows_owned, cols = !rows_owned;
    GradientParts p;
    p.dq_rows = sum(acc.dq_rows, rows);
    p.dq_rows_sum = sum(acc.dq_rows_sum, rows);
    p.ahat_rowsum = sum(acc.ahat_rowsum, rows);
    p.dk_rows = sum(acc.dk_rows, rows);
    p.dk_rows_sum = sum(acc.dk_rows_sum, rows);
    p.dk_cols = sum(acc.dk_cols, cols);
    p.dk_cols_sum = sum(acc.dk_cols_sum, cols);
    p.dq_cols = sum(acc.dq_cols, cols);
    p.dq_cols_sum = sum(acc.dq_cols_sum, cols);
    p.dv = sum(acc.dv, cols);
    return p;
  }
};

template <typename T>
struct TileScratch {  // one thread's, for tiles of up to `rows` rows
  std::vector<T> ahat, c1, c2, flipped;  // flipped: a transposed tile, the left operand of Xᵀ·Y products
  HalfScratch half;
  TileScratch(int64_t rows, const HalfInputs& half_inputs, int64_t d, int64_t c)
      : ahat(rows * kColBlock), c1(rows * kColBlock), c2(rows * kColBlock), flipped(rows * kColBlock),
        half(half_inputs, rows, d, c) {}
};

// One backward tile, rows i0..+bi × columns j0..+bj, from its products s1 (s2) and gv = G_I v_Jᵀ:
// Â and C (backward_tile_entry), then dv_J += Âᵀ G_I, dq_I += C1 k_J, dk_J += C1ᵀ q_I (and
// dk_I += C2 q_J, dq_J += C2ᵀ k_I when symmetric), and the row / column sums of Â and C. The products
// into the row-side sinks (dq_I, dk_I) add to them only with `add_rows`, else they write them (the
// task's first tile of those rows); the column-side ones (dv_J, dk_J, dq_J) likewise with `add_cols`.
template <typename T>
void backward_tile_gradients(const Options& o, bool symnorm, const Roles<T>& r, const KernelArgs<T>& p,
                             const BackwardRows<T>& vec, const T* gb, int64_t c, int64_t i0, int64_t bi,
                             int64_t j0, int64_t bj, const T* s1, const T* s2, const T* gv, TileScratch<T>& t,
                             const TileSinks<T>& out, bool add_rows, bool add_cols) {
  const int64_t d = r.d;
  const T *qb = r.a, *kb = r.b;
  T *ahat = t.ahat.data(), *c1 = t.c1.data(), *c2 = t.c2.data();
  T* flipped = t.flipped.data();
  backward_tile_entry(o.kernel, o.symmetric, symnorm, r, p, vec, i0, bi, j0, bj, s1, s2, gv, ahat, c1, c2);
  const HalfTiles* h = r.half;  // half copies of G, q, k (null: float32 GEMMs)
  const auto half_rows = [&](const uint16_t* HalfTiles::*member, int64_t row, int64_t width) -> const uint16_t* {
    return h ? h->*member + row * width : nullptr;
  };
  transpose_into(bi, bj, ahat, bj, flipped, bi);
  tile_gemm<T>(h, bj, c, bi, flipped, bi, gb + i0 * c, half_rows(&HalfTiles::grad, i0, c), c, add_cols,
               out.dv + j0 * c, c);
  tile_gemm<T>(h, bi, d, bj, c1, bj, kb + j0 * d, half_rows(&HalfTiles::b, j0, d), d, add_rows,
               out.dq_rows + i0 * d, d);
  transpose_into(bi, bj, c1, bj, flipped, bi);
  tile_gemm<T>(h, bj, d, bi, flipped, bi, qb + i0 * d, half_rows(&HalfTiles::a, i0, d), d, add_cols,
               out.dk_cols + j0 * d, d);
  if (o.symmetric) {
    tile_gemm<T>(h, bi, d, bj, c2, bj, qb + j0 * d, half_rows(&HalfTiles::a, j0, d), d, add_rows,
                 out.dk_rows + i0 * d, d);
    transpose_into(bi, bj, c2, bj, flipped, bi);
    tile_gemm<T>(h, bj, d, bi, flipped, bi, kb + i0 * d, half_rows(&HalfTiles::b, i0, d), d, add_cols,
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
  const GroupSplit split = column_groups(batch, m);
  const int64_t groups = split.groups, row_blocks = (n + o.row_block - 1) / o.row_block;
  const Accumulators acc(q.options(), o.symmetric, false, batch, groups, split.busy_groups(), n, m, d, c);
  const KernelArgs<T> p = kernel_args<T>(o, d);
  at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    BrgemmScope brgemm_scope;
    const int64_t tile = o.row_block * kColBlock;
    std::vector<T> s1(tile), s2(tile), gv(tile);
    TileScratch<T> scratch(o.row_block, bv.half, d, c);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bt = task / groups, grp = task % groups;
      const auto [r, gb, vtb, vec] = bv.template operands_of<T>(q, k, g, bt, scratch.half);
      const TileSinks<T> sinks = acc.sinks<T>(bt, grp);
      for (int64_t jb = split.first(grp); jb < split.last(grp); ++jb) {
        const int64_t j0 = jb * kColBlock, bj = std::min(kColBlock, m - j0);
        for (int64_t ib = 0; ib < row_blocks; ++ib) {
          const int64_t i0 = ib * o.row_block, bi = std::min(o.row_block, n - i0);
          tile_products<T>(r, p, o.symmetric, i0, bi, j0, bj, s1.data(), s2.data());
          grad_value_products<T>(r, gb, vtb, c, m, i0, bi, j0, bj, gv.data());
          backward_tile_gradients(o, symnorm, r, p, vec, gb, c, i0, bi, j0, bj, s1.data(), s2.data(), gv.data(),
                                  scratch, sinks, jb != split.first(grp), ib != 0);
        }
      }
    }
  });
  return acc.parts();
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
  // As the column schedules' split, of row blocks, and fewer groups when the column partials would pass 256 MB.
  const int64_t group_bytes = m * (c + 2 * d + 2) * static_cast<int64_t>(sizeof(T));
  const int64_t groups = std::max<int64_t>(1, std::min<int64_t>(group_count(batch, row_blocks, n),
                                                                (int64_t(256) << 20) / std::max<int64_t>(group_bytes, 1)));
  const GroupSplit split(row_blocks, groups);
  const Accumulators acc(q.options(), o.symmetric, true, batch, groups, split.busy_groups(), n, m, d, c);
  auto S = at::zeros({batch, n}, q.options());
  bv.R = S;  // filled per row block by the first sweep, before the second reads it
  const KernelArgs<T> p = kernel_args<T>(o, d);
  const bool log_domain = is_log_domain(o.kernel);
  at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    const int64_t tile = rb * kColBlock, cache = rb * m;
    std::vector<T> s1c(cache), s2c(o.symmetric ? cache : 0), gvc(cache);
    std::vector<T> w(tile), e(tile), unused_cols(kColBlock);
    BrgemmScope brgemm_scope;
    TileScratch<T> scratch(rb, bv.half, d, c);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bt = task / groups, grp = task % groups;
      const auto [r, gb, vtb, vec] = bv.template operands_of<T>(q, k, g, bt, scratch.half);
      const TileSinks<T> sinks = acc.sinks<T>(bt, grp);
      T* Sb = batch_ptr<T>(S, bt);
      const int64_t first = split.first(grp), last = split.last(grp);
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
          backward_tile_gradients(o, false, r, p, vec, gb, c, i0, bi, j0, bj, s1, s2, gv, scratch, sinks, j0 != 0,
                                  ib != first);
        }
      }
    }
  });
  return acc.parts();
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
    const HalfInputs& half, const at::Tensor& products) {
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
                 : (is_log_domain(o.kernel) ? at::zeros({batch, m}, q.options()) : at::ones({batch, m}, q.options()));
  // kᵀ (qᵀ) only where the tile products are recomputed in float32 (not kept by the forward, not in half)
  bv.t = transposes(q, k, v, !half.products && !products.defined(), o.symmetric, !half.on());
  bv.R = bv.X = at::zeros_like(bv.gu);
  bv.Y = at::zeros({batch, m}, q.options());
  bv.half = half;
  bv.products = products;
  GradientParts parts;
  if (o.normalize == Normalize::Row) {
    parts = backward_by_row_blocks<T>(g, q, k, v, bv, o);
  } else {
    if (symnorm) {
      auto [S, Tc] = normalization_terms<T>(q, k, v, g, bv.qn, bv.kn, bv.a, bv.b, bv.gu, o, half, products);
      bv.X = 0.5 * S;
      bv.Y = 0.5 * Tc;
    }
    parts = backward_by_column_groups<T>(g, q, k, v, bv, o);
  }
  return assemble_gradients(std::move(parts), g, q, k, has_self_value, o);
}

template std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> backward_impl<float>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
    const at::Tensor&, const at::Tensor&, const Options&, const HalfInputs&, const at::Tensor&);
template std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> backward_impl<double>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
    const at::Tensor&, const at::Tensor&, const Options&, const HalfInputs&, const at::Tensor&);

}  // namespace cpu
}  // namespace nonlocal_ext
