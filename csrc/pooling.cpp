// The layers' key max-pooling on CPU: nonlocal_ext::max_pool_forward / max_pool_backward (schemas:
// nonlocal_ext.cpp). Windows equal to their strides, no padding, each spatial size floored to whole windows
// (what the layers' nn.MaxPool1d/2d/3d(kernel_size=pool_size) compute); the same values, indices and gradients
// as ATen's max_pool1d/2d/3d_with_indices. For the layers' default windows (2, 2 × 2, 1 × 2 × 2) the maximum and
// its index are selected without branches, in vectors along an output line (ATen's CPU kernel branches per
// element, and on a convolution's output the branch goes either way: bench/NOTES.md, "The layers' key max-pool as
// our own kernel"); other windows take a plain loop.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_features.h"
#include "tile_math.h"

namespace nonlocal_ext {
namespace cpu {
namespace {

// The input viewed as (planes, T, H, W) and the window as (kt, kh, kw): 1-d and 2-d pooling have T = kt = 1
// (and H = kh = 1 for 1-d).
struct PoolShape {
  int64_t planes, t, h, w, kt, kh, kw, ot, oh, ow;
};

PoolShape pool_shape(at::IntArrayRef sizes, at::IntArrayRef window) {
  const int64_t dims = static_cast<int64_t>(window.size());
  TORCH_CHECK(dims >= 1 && dims <= 3 && static_cast<int64_t>(sizes.size()) == dims + 2,
              "nonlocal_ext::max_pool: input must be (B, C, *spatial) with one window size per spatial dim");
  int64_t spatial[3] = {1, 1, 1}, kernel[3] = {1, 1, 1};
  for (int64_t i = 0; i < dims; ++i) {
    spatial[3 - dims + i] = sizes[2 + i];
    kernel[3 - dims + i] = window[i];
    TORCH_CHECK(window[i] >= 1 && sizes[2 + i] >= window[i],
                "nonlocal_ext::max_pool: each window size must be at least 1 and at most its spatial size");
  }
  return {sizes[0] * sizes[1], spatial[0], spatial[1], spatial[2], kernel[0], kernel[1], kernel[2],
          spatial[0] / kernel[0], spatial[1] / kernel[1], spatial[2] / kernel[2]};
}

// One output line (fixed plane, ot, oh): the windows along w. ATen's rule: starting from −∞ at the window's
// first position, a value replaces the maximum when it is larger or NaN (so the first maximum wins, and the last
// NaN); the index is flat within the plane's (T, H, W) volume. KT, KH, KW > 0: the window at compile time.
template <typename T, int KT, int KH, int KW>
inline void pool_line(const PoolShape& s, const T* plane, int64_t ot, int64_t oh, T* out, int64_t* indices) {
  const int64_t kt = KT ? KT : s.kt, kh = KH ? KH : s.kh, kw = KW ? KW : s.kw;
  const int64_t first = (ot * kt * s.h + oh * kh) * s.w;
  for (int64_t ow = 0; ow < s.ow; ++ow) {
    T best = -std::numeric_limits<T>::infinity();
    int64_t where = first + ow * kw;
    for (int64_t a = 0; a < kt; ++a)
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t row = ((ot * kt + a) * s.h + oh * kh + i) * s.w + ow * kw;
        for (int64_t j = 0; j < kw; ++j) {
          const T v = plane[row + j];
          const bool take = (v > best) | (v != v);
          best = take ? v : best;
          where = take ? row + j : where;
        }
      }
    out[ow] = best;
    indices[ow] = where;
  }
}

// The same for the windows 2 (KH = 1) and 2 × 2 (KH = 2) along one output line, written so that the compiler turns
// the selections into vector blends across the line (the ISA clones of the entry points below): rows r0, r1 of the
// window, `first` the flat index of the line's first window.
template <typename T, int KH>
NLX_INLINE void pool_pairs_line(const T* r0, const T* r1, int64_t count, int64_t first, int64_t w, T* out,
                                int64_t* indices) {
  for (int64_t ow = 0; ow < count; ++ow) {
    // from −∞: the first value replaces it unless it is −∞ itself, which leaves the same maximum and index.
    // The selections are blends of bits under a mask (no branch even where a line is too short for vectors).
    using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    T best = r0[2 * ow];
    Bits at = 0;
    const auto consider = [&](T v, Bits k) {
      const Bits take = Bits(0) - Bits((v > best) | (v != v));  // all ones where v replaces the maximum
      Bits vb, bb;
      std::memcpy(&vb, &v, sizeof(T));
      std::memcpy(&bb, &best, sizeof(T));
      bb = (vb & take) | (bb & ~take);
      std::memcpy(&best, &bb, sizeof(T));
      at = (k & take) | (at & ~take);
    };
    consider(r0[2 * ow + 1], 1);
    if constexpr (KH == 2) {
      consider(r1[2 * ow], 2);
      consider(r1[2 * ow + 1], 3);
    }
    out[ow] = best;
    indices[ow] = first + 2 * ow + int64_t(at & 1) + int64_t(at >> 1) * w;
  }
}

}  // namespace

#define NLX_POOL_PAIRS_ENTRY(T, KH, NAME, ATTR)                                                            \
  ATTR void NAME(const T* r0, const T* r1, int64_t count, int64_t first, int64_t w, T* out, int64_t* indices) { \
    pool_pairs_line<T, KH>(r0, r1, count, first, w, out, indices);                                          \
  }
NLX_POOL_PAIRS_ENTRY(float, 1, pool_pairs_1, NLX_VECTORIZED)
NLX_POOL_PAIRS_ENTRY(float, 2, pool_pairs_2, NLX_VECTORIZED)
NLX_POOL_PAIRS_ENTRY(double, 1, pool_pairs_1, )
NLX_POOL_PAIRS_ENTRY(double, 2, pool_pairs_2, )
#undef NLX_POOL_PAIRS_ENTRY

namespace {

template <typename T, int KT, int KH, int KW>
void pool_all(const PoolShape& s, const T* in, T* out, int64_t* indices) {
  const int64_t lines = s.planes * s.ot * s.oh, volume = s.t * s.h * s.w;
  at::parallel_for(0, lines, 64, [&](int64_t begin, int64_t end) {
    for (int64_t line = begin; line < end; ++line) {
      const int64_t plane = line / (s.ot * s.oh), ot = line / s.oh % s.ot, oh = line % s.oh;
      if constexpr (KT == 1 && KW == 2 && (KH == 1 || KH == 2)) {
        const int64_t first = (ot * s.h + oh * KH) * s.w;
        const T* r0 = in + plane * volume + first;
        if constexpr (KH == 1)
          pool_pairs_1(r0, r0, s.ow, first, s.w, out + line * s.ow, indices + line * s.ow);
        else
          pool_pairs_2(r0, r0 + s.w, s.ow, first, s.w, out + line * s.ow, indices + line * s.ow);
      } else {
        pool_line<T, KT, KH, KW>(s, in + plane * volume, ot, oh, out + line * s.ow, indices + line * s.ow);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> max_pool_forward_cpu(const at::Tensor& input, at::IntArrayRef window) {
  TORCH_CHECK(input.device().is_cpu(), "nonlocal_ext::max_pool: the input must be a CPU tensor");
  const PoolShape s = pool_shape(input.sizes(), window);
  std::vector<int64_t> out_sizes(input.sizes().begin(), input.sizes().begin() + 2);
  for (size_t i = 0; i < window.size(); ++i) out_sizes.push_back(input.size(2 + i) / window[i]);
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty(out_sizes, x.options());
  at::Tensor indices = at::empty(out_sizes, x.options().dtype(at::kLong));
  if (out.numel() == 0) return {out, indices};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "nonlocal_ext::max_pool_forward", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    int64_t* idx = indices.data_ptr<int64_t>();
    if (s.kt == 1 && s.kh == 2 && s.kw == 2)  // the layers' 2-d and video windows
      pool_all<scalar_t, 1, 2, 2>(s, in, o, idx);
    else if (s.kt == 2 && s.kh == 2 && s.kw == 2)
      pool_all<scalar_t, 2, 2, 2>(s, in, o, idx);
    else if (s.kt == 1 && s.kh == 1 && s.kw == 2)  // 1-d
      pool_all<scalar_t, 1, 1, 2>(s, in, o, idx);
    else
      pool_all<scalar_t, 0, 0, 0>(s, in, o, idx);
  });
  return {out, indices};
}

// The input's gradient: each output's gradient at its index, zero elsewhere (the windows do not overlap, so no
// position receives two). `input_like` gives the input's shape only (a one-element stand-in is enough).
at::Tensor max_pool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& indices, const at::Tensor& input_like) {
  const at::IntArrayRef input_size = input_like.sizes();
  TORCH_CHECK(grad_out.sizes() == indices.sizes() && indices.scalar_type() == at::kLong,
              "nonlocal_ext::max_pool_backward: grad_out and indices must be the forward's shapes");
  const at::Tensor g = grad_out.contiguous(), idx = indices.contiguous();
  at::Tensor grad_in = at::zeros(input_size, g.options());
  const int64_t planes = input_size[0] * input_size[1];
  if (planes == 0 || g.numel() == 0) return grad_in;
  const int64_t per_plane = g.numel() / planes, volume = grad_in.numel() / planes;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "nonlocal_ext::max_pool_backward", [&] {
    const scalar_t* go = g.data_ptr<scalar_t>();
    const int64_t* where = idx.data_ptr<int64_t>();
    scalar_t* gi = grad_in.data_ptr<scalar_t>();
    at::parallel_for(0, planes, 16, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p)
        for (int64_t e = 0; e < per_plane; ++e) gi[p * volume + where[p * per_plane + e]] = go[p * per_plane + e];
    });
  });
  return grad_in;
}

}  // namespace
}  // namespace cpu
}  // namespace nonlocal_ext

TORCH_LIBRARY_IMPL(nonlocal_ext, CPU, m) {
  m.impl("max_pool_forward", &nonlocal_ext::cpu::max_pool_forward_cpu);
  m.impl("max_pool_backward", &nonlocal_ext::cpu::max_pool_backward_cpu);
}
