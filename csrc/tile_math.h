// Elementwise maths of the CPU kernels: the affinity kernels of nonlocal_ext/kernels.py written
// for one pair variable at a time, and float32 exp/log in a branch-free form that the compiler
// vectorizes.
//
// The kernel table (one definition, mirrored here from nonlocal_ext/kernels.py; x is the pair
// variable: s = q·k for the dot family, ρ = max(‖q‖² + ‖k‖² − 2s, 0) for the distance family):
//
//   kernel      f(x)                        f′(x)                 coincident pair (ρ ≤ eps·(‖q‖²+‖k‖²))
//   dot         scale·s                     scale                 -
//   gaussian    exp(z), z = scale·s         scale·f               -       (kept as z: log domain)
//   rbf         exp(−scale·ρ)               −scale·f              -
//   fractional  scale·ρ^(−power/2)          −(power/2)·f/ρ        f = f′ = 0
//   log         −scale·log ρ − gamma        −scale/ρ              f = f′ = 0

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace nonlocal_ext {
namespace cpu {

// Functions that loops of the kernels call per element. They must inline into the function
// clones of the tile entry points (see NLX_VECTORIZED in cpu_features.h) to be vectorized for
// each ISA.
#define NLX_INLINE inline __attribute__((always_inline))

enum class Kernel : int { Dot, Gaussian, Rbf, Fractional, Log };

constexpr bool is_distance(Kernel k) {
  return k == Kernel::Rbf || k == Kernel::Fractional || k == Kernel::Log;
}
// The kernels whose tiles hold z = log f instead of f (gaussian: z = scale·s), with their
// normalizer statistics and factors as logs too: an online max keeps row and sym from overflowing.
constexpr bool is_log_domain(Kernel k) {
  return k == Kernel::Gaussian;
}
constexpr bool masks_coincident(Kernel k) {
  return k == Kernel::Fractional || k == Kernel::Log;
}

// Distance kernels with at most this many features form ρ from direct differences Σ_d (a_d − b_d)²
// instead of ‖a‖² + ‖b‖² − 2 a·b, whose cancellation costs coordinates (D = 2, 3) their digits at
// close pairs; the tile "products" then hold ρ itself. Mirrors DIRECT_DIFFERENCES_MAX_FEATURES of
// nonlocal_ext/kernels.py (tested to agree).
constexpr int64_t kDirectMaxFeatures = 3;

template <typename T>
struct KernelArgs {
  T scale, half_power, gamma, eps;  // half_power = power/2 (fractional)
  bool direct;                      // s holds ρ (direct differences), not a·b
};

NLX_INLINE float bits_to_float(int32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}
NLX_INLINE int32_t float_to_bits(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

// exp(x) for float: x = n·ln2 + r with |r| ≤ ln2/2 (ln2 split in two for an exact product),
// exp(r) by the degree-7 minimax polynomial of Cephes' expf, 2^n by writing the exponent bits.
// Relative error about 1 ulp; exp(x) < ~1e-38 flushes to 0, overflow gives +inf, NaN stays NaN.
NLX_INLINE float exp_f32(float x) {
  float xc = x < -87.0f ? -87.0f : (x > 89.0f ? 89.0f : x);
  float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // 2^n written as 2·2^(n−1): n reaches 128 for x ≤ 89, whose 2^(n−1) is still a normal float,
  // so a true overflow happens in the product and gives +inf.
  float y = (p + p) * bits_to_float((static_cast<int32_t>(n) + 126) << 23);
  y = x < -87.0f ? 0.0f : y;
  return x != x ? x : y;
}

// log(x) for float: x = m·2^e with m in [√½, √2), log m by Cephes' logf polynomial in m − 1.
// log 0 = −inf, log of a negative number = NaN, log inf = inf. Subnormal x is not handled (the
// kernels only take logs of ρ above the coincidence threshold).
NLX_INLINE float log_f32(float x) {
  int32_t bits = float_to_bits(x);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  float m = bits_to_float((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  bool upper = m > 1.41421356f;
  m = upper ? m * 0.5f : m;
  float fe = static_cast<float>(upper ? e + 1 : e);
  float f = m - 1.0f;
  float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + fe * -2.12194440e-4f - 0.5f * z;
  float result = f + y + fe * 0.693359375f;
  constexpr float inf = std::numeric_limits<float>::infinity();
  result = x == 0.0f ? -inf : result;
  result = x < 0.0f ? std::numeric_limits<float>::quiet_NaN() : result;
  return x < inf ? result : x + 0.0f;  // inf and NaN pass through
}

template <typename T>
struct Math;
template <>
struct Math<float> {
  static NLX_INLINE float exp(float x) { return exp_f32(x); }
  static NLX_INLINE float log(float x) { return log_f32(x); }
};
template <>
struct Math<double> {  // float64 is the gradcheck precision: the C library's functions
  static NLX_INLINE double exp(double x) { return std::exp(x); }
  static NLX_INLINE double log(double x) { return std::log(x); }
};

// f(x) of kernel K for the pair (a, b), given s = a·b and, for distance kernels, the squared
// norms of a and b; and f′(x). A log-domain kernel (is_log_domain: gaussian) returns z = log f
// and dz/ds = scale. Coincident pairs of fractional/log get f = f′ = 0.
template <typename T>
struct WeightSlope {
  T weight, slope;
  T live;  // 0 on a masked pair, which passes no gradient, not even a NaN one (as in the dense formula);
           // 1 elsewhere. A T, not a bool: mixed-width selects kept the backward tile loop scalar.
};

// DIRECT: s holds ρ itself (KernelArgs::direct), a template parameter so that the tile loops,
// instantiated once per value, stay branch-free and vectorize (a run-time flag here kept them scalar).
template <typename T, Kernel K, bool DIRECT = false>
NLX_INLINE WeightSlope<T> weight_and_slope(T s, T a_sqnorm, T b_sqnorm, const KernelArgs<T>& p) {
  if constexpr (!is_distance(K)) {  // the dot family
    return {p.scale * s, p.scale, T(1)};
  } else {
    T norms = a_sqnorm + b_sqnorm;
    T rho = DIRECT ? s : norms - T(2) * s;
    rho = rho < T(0) ? T(0) : rho;  // clamps rounding below 0; NaN stays NaN (a max would drop it)
    if constexpr (K == Kernel::Rbf) {
      T w = Math<T>::exp(-p.scale * rho);
      return {w, -p.scale * w, T(1)};
    } else {
      bool coincident = rho <= p.eps * norms;
      T safe = coincident ? T(1) : rho;
      T w, d;
      if constexpr (K == Kernel::Fractional) {
        w = p.scale * Math<T>::exp(-p.half_power * Math<T>::log(safe));
        d = -p.half_power * w / safe;
      } else {
        w = -p.scale * Math<T>::log(safe) - p.gamma;
        d = -p.scale / safe;
      }
      return {coincident ? T(0) : w, coincident ? T(0) : d, coincident ? T(0) : T(1)};
    }
  }
}

template <typename T, Kernel K, bool DIRECT = false>
NLX_INLINE T weight(T s, T a_sqnorm, T b_sqnorm, const KernelArgs<T>& p) {
  return weight_and_slope<T, K, DIRECT>(s, a_sqnorm, b_sqnorm, p).weight;
}

// log(½(e^a + e^b)): the symmetrized weight of a log-domain kernel.
template <typename T>
NLX_INLINE T log_mean_exp(T a, T b) {
  T hi = a > b ? a : b;
  T lo = a > b ? b : a;
  return hi + Math<T>::log(T(0.5) + T(0.5) * Math<T>::exp(lo - hi));
}

}  // namespace cpu
}  // namespace nonlocal_ext
