// Forward schedule of the CPU kernels (nonlocal_ext::aggregate_forward; definitions:
// docs/semantics.md): the row pass of one row block against all columns, the parallel loop over
// row blocks, sym's column-sum pass, and forward_impl, which scales the rows into the output.
//
// Per row block I (parallel over batch × row blocks):
//   acc_I = Σ_J W_IJ · (b_J ⊙ v_J),  r_I = Σ_J W_IJ 1,  h_I = Σ_J W_IJ b_J
//   out_I = a_I ⊙ acc_I − [diffusion] a_I h_I ⊙ u_I,   rowsum(Â)_I = a_I h_I
// with Â = diag(a) W diag(b):  none a=1 · count a=1/M · row a=1/r · sym a=r^−½, b=c^−½.
// `sym` needs the column sums c first: the same pass with the roles of query and key swapped.
// Log-domain kernels (is_log_domain: gaussian, z = scale·q·k) keep an online max as in
// FlashAttention, so row and sym normalizations never overflow; their statistics are log r and
// log c.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

#include "tiles.h"

namespace nonlocal_ext {
namespace cpu {

// ----------------------------------------------------------------------------------------------
// Row pass.

// Running per-row state of one row block. Linear domain: r = Σ w, h = Σ w b. Log domain
// (is_log_domain): acc and h are scaled by exp(−m2), m2 = running max of z + log b; r is kept as
// (m, l) with l = Σ exp(z − m) only when b is not 1 (else it equals (m2, h)). acc starts
// uninitialized: the first column block's GEMM writes it (no fill, no rescale of zeros).
template <typename T>
struct RowState {
  std::unique_ptr<T[]> acc;
  std::vector<T> r, h, m, l, m2;
  RowState(int64_t rows, int64_t c)
      : acc(new T[rows * c]), r(rows, T(0)), h(rows, T(0)),
        m(rows, -std::numeric_limits<T>::infinity()), l(rows, T(0)),
        m2(rows, -std::numeric_limits<T>::infinity()) {}
};

// Accumulate one row block against all columns. `value` null: statistics only (the column
// pass). `col_factor`: b_j (log b_j in the log domain), null when b = 1. s1 and s2 are tile-sized
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
      if constexpr (is_log_domain(K)) {
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
        if (value && j0 > 0 && rescale != T(1)) {
          T* acc = st.acc.get() + i * c;
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
      tile_gemm<T>(r.half, bi, c, bj, s1, bj, value + j0 * c, r.half ? r.half->value + j0 * c : nullptr, c, j0 > 0,
                   st.acc.get(), c);
  }
}

// ----------------------------------------------------------------------------------------------
// Entry point of the tile code (see dispatch_kernel).

template <Kernel K, bool SYMM>
struct RowPassBody {
  template <typename T>
  static NLX_INLINE void run(const Roles<T>& r, const KernelArgs<T>& p, int64_t cols, const T* value,
                             int64_t c, const T* col_factor, int64_t i0, int64_t bi, RowState<T>& st,
                             T* s1, T* s2) {
    row_pass<T, K, SYMM>(r, p, cols, value, c, col_factor, i0, bi, st, s1, s2);
  }
};

// The row pass for each dtype; the float32 one carries the ISA clones.
#define NLX_FORWARD_ENTRY_POINTS(T, ATTR)                                                             \
  ATTR void row_pass_entry(Kernel k, bool symm, const Roles<T>& r, const KernelArgs<T>& p,            \
                           int64_t cols, const T* value, int64_t c, const T* col_factor, int64_t i0,  \
                           int64_t bi, RowState<T>& st, T* s1, T* s2) {                               \
    dispatch_kernel<T, RowPassBody>(k, symm, r, p, cols, value, c, col_factor, i0, bi, st, s1, s2);   \
  }

NLX_FORWARD_ENTRY_POINTS(float, NLX_VECTORIZED)
NLX_FORWARD_ENTRY_POINTS(double, )
#undef NLX_FORWARD_ENTRY_POINTS

// ----------------------------------------------------------------------------------------------
// Host side: the passes.

// row_pass for every (batch element, block of rows) of rows_in against all of cols_in, in
// parallel; finish(bt, i0, bi, state) then reads each block's running state. `value` and
// `col_factor` may be undefined (statistics only; b = 1).
template <typename T, typename Finish>
void for_each_row_block(const at::Tensor& rows_in, const at::Tensor& cols_in, const at::Tensor& rows_sqnorm,
                        const at::Tensor& cols_sqnorm, const at::Tensor& value, const at::Tensor& col_factor,
                        const Options& o, const HalfInputs& half, bool swapped, const Finish& finish,
                        const at::Tensor& keep = at::Tensor()) {
  const int64_t batch = rows_in.size(0), rows = rows_in.size(1), cols = cols_in.size(1), d = rows_in.size(2);
  const int64_t c = value.defined() ? value.size(2) : 0;
  const int64_t rb = o.row_block, blocks = (rows + rb - 1) / rb;
  const KernelArgs<T> p = kernel_args<T>(o, d);
  // The float32 transposes are the products' operands: not needed when those run in half. (rows_in
  // stands in q's place, cols_in in k's.)
  const Transposes t = transposes(rows_in, cols_in, at::Tensor(), !half.products, o.symmetric, false);
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    BrgemmScope brgemm_scope;
    std::vector<T> s1(rb * kColBlock), s2(rb * kColBlock);
    HalfScratch half_scratch(half, rb, d, c);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bt = task / blocks, i0 = (task % blocks) * rb, bi = std::min(rb, rows - i0);
      Roles<T> r = roles<T>(batch_ptr<T>(rows_in, bt), batch_ptr<T>(cols_in, bt),
                            ptr_or_null<T>(rows_sqnorm, bt), ptr_or_null<T>(cols_sqnorm, bt),
                            ptr_or_null<T>(t.q_t, bt), ptr_or_null<T>(t.k_t, bt), d, cols);
      r.half = half_scratch.tiles(bt, swapped);
      r.keep = keep.defined() ? batch_ptr<T>(keep, bt) : nullptr;
      RowState<T> st(bi, c);
      row_pass_entry(o.kernel, o.symmetric, r, p, cols, ptr_or_null<T>(value, bt), c,
                     ptr_or_null<T>(col_factor, bt), i0, bi, st, s1.data(), s2.data());
      finish(bt, i0, bi, st);
    }
  });
}

// Per-row statistics of rows_in against all of cols_in (r, or log r in the log domain), for every
// batch element: the column pass of `sym` (with the roles of query and key swapped).
template <typename T>
at::Tensor normalizer_pass(const at::Tensor& rows_in, const at::Tensor& cols_in, const at::Tensor& rows_sqnorm,
                           const at::Tensor& cols_sqnorm, const Options& o, const HalfInputs& half) {
  auto stats = output_buffer({rows_in.size(0), rows_in.size(1)}, rows_in.options());
  for_each_row_block<T>(rows_in, cols_in, rows_sqnorm, cols_sqnorm, at::Tensor(), at::Tensor(), o, half, true,
                        [&](int64_t bt, int64_t i0, int64_t bi, const RowState<T>& st) {
                          T* out = batch_ptr<T>(stats, bt) + i0;
                          for (int64_t i = 0; i < bi; ++i)
                            out[i] = is_log_domain(o.kernel) ? st.m2[i] + std::log(st.h[i]) : st.r[i];
                        });
  return stats;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& u,
                                                            const Options& o, const HalfInputs& half,
                                                            const at::Tensor& products) {
  const int64_t batch = q.size(0), n = q.size(1), m = k.size(1), c = v.size(2);
  const bool log_domain = is_log_domain(o.kernel);
  auto out = output_buffer({batch, n, c}, q.options());
  auto row_stats = output_buffer({batch, n}, q.options());
  auto col_stats = output_buffer({batch, o.normalize == Normalize::Sym ? m : 0}, q.options());
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
    T* out_rows = batch_ptr<T>(out, bt) + i0 * c;
    T* stat = batch_ptr<T>(row_stats, bt) + i0;
    const T* u_rows = u.defined() ? batch_ptr<T>(u, bt) + i0 * c : nullptr;
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
      const T* acc = st.acc.get() + i * c;
      T* dst = out_rows + i * c;
      for (int64_t e = 0; e < c; ++e) dst[e] = factor * acc[e];
      if (u_rows)
        for (int64_t e = 0; e < c; ++e) dst[e] -= rowsum * u_rows[i * c + e];
    }
  }, products);
  return {out, row_stats, col_stats};
}

template std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl<float>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Options&, const HalfInputs&,
    const at::Tensor&);
template std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl<double>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Options&, const HalfInputs&,
    const at::Tensor&);

}  // namespace cpu
}  // namespace nonlocal_ext
