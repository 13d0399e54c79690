// The query and key rows as the distance kernels' tiles read them: translated by the keys' mean
// (translated_points) and their squared norms (squared_norms), each in one pass without temporaries.
//
// ρ = ‖q − k‖² is formed as ‖q‖² + ‖k‖² − 2q·k for D > 3; rows far from the origin would cancel
// their digits there, so both sides are first moved by μ, the mean of the finite key entries per
// batch element and feature (docs/semantics.md: translation). ρ is unchanged in exact arithmetic and
// so is every gradient (μ is a constant of the call, as in the other backends).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#include "tiles.h"

namespace nonlocal_ext {
namespace cpu {

namespace {

// Rows per parallel task (each row is D elements).
constexpr int64_t kRowsPerTask = 64;

// Lanes of the partial sums in squared_norms: a multiple of the vector width, so that the loop
// vectorizes without reassociation flags; the lanes are added pairwise at the end.
constexpr int kLanes = 16;

template <typename T>
T sum_of_squares(const T* row, int64_t d) {
  T lanes[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= d; e += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += row[e + l] * row[e + l];
  for (int l = 0; e < d; ++e, ++l) lanes[l] += row[e] * row[e];
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

// μ (B, 1, D): the mean of the finite entries of key (B, M, D) per batch element and feature (0 where
// there is none), summed in the key's dtype (float32 or float64) as the other backends do.
at::Tensor key_mean(const at::Tensor& key) {
  const int64_t m = key.size(1);
  const at::Tensor total = key.sum(1, true);
  if (at::isfinite(total).all().item<bool>()) return total / static_cast<double>(std::max<int64_t>(m, 1));
  const at::Tensor finite = at::isfinite(key);
  return at::where(finite, key, at::zeros({}, key.options())).sum(1, true) / finite.sum(1, true).clamp_min(1);
}

template <typename T>
void subtract_rows(const at::Tensor& x, const at::Tensor& mu, at::Tensor& out) {
  const int64_t batch = x.size(0), rows = x.size(1), d = x.size(2);
  const T* src = x.data_ptr<T>();
  const T* shift = mu.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, batch * rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* s = shift + (r / rows) * d;
      const T* a = src + r * d;
      T* b = dst + r * d;
      for (int64_t e = 0; e < d; ++e) b[e] = a[e] - s[e];
    }
  });
}

}  // namespace

std::pair<at::Tensor, at::Tensor> translated_points(const at::Tensor& query, const at::Tensor& key,
                                                    const Options& o) {
  if (!is_distance(o.kernel) || key.size(1) == 0) return {query, key};
  const at::Tensor mu = key_mean(key).contiguous();
  at::Tensor q = at::empty_like(query), k = at::empty_like(key);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "nonlocal_ext::translated_points", [&] {
    subtract_rows<scalar_t>(query, mu, q);
    subtract_rows<scalar_t>(key, mu, k);
  });
  return {q, k};
}

at::Tensor squared_norms(const at::Tensor& x, const Options& o) {
  if (!is_distance(o.kernel)) return at::Tensor();
  const int64_t batch = x.size(0), rows = x.size(1), d = x.size(2);
  at::Tensor norms = at::empty({batch, rows}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "nonlocal_ext::squared_norms", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = norms.data_ptr<scalar_t>();
    at::parallel_for(0, batch * rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) dst[r] = sum_of_squares(src + r * d, d);
    });
  });
  return norms;
}

}  // namespace cpu
}  // namespace nonlocal_ext
