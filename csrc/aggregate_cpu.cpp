// The CPU operators nonlocal_ext::aggregate_forward / aggregate_backward (schemas:
// nonlocal_ext.cpp; definitions: docs/semantics.md): their arguments parsed and checked, the
// dtype handling (half inputs widened, with half copies for the tile GEMMs), the dispatch to the
// schedules of forward_cpu.cpp and backward_cpu.cpp, and their registration for the CPU key.
//
// The other files: tiles.h (what the schedules share), tile_math.h (the elementwise maths of the
// affinity kernels), blas.h / blas.cpp (the GEMM shim), cpu_features.h / cpu_features.cpp (the
// ISA clones and the CPU's half-precision instructions).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "cpu_features.h"
#include "tiles.h"

namespace nonlocal_ext {
namespace cpu {

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

// HalfInputs of half-precision q, k, v (and G in the backward), contiguous.
HalfInputs half_inputs(at::ScalarType dtype, const Options& o, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& g) {
  HalfInputs h;
  h.dtype = dtype;
  h.products = !is_distance(o.kernel);
  h.q = q;
  h.k = k;
  h.v = v;
  h.g = g;
  h.t = transposes(q, k, v, h.products, o.symmetric || o.normalize == Normalize::Sym, g.defined());
  return h;
}

// ----------------------------------------------------------------------------------------------
// Operator entry points.

// Distance kernels take query and key moved by the keys' mean (translated_points, points.cpp): the
// op's callers pass the inputs untranslated (nonlocal_ext/backends/cpu.py).
//
// Half-precision inputs: the kernels run in float32 on widened copies, with half copies for the
// tile GEMMs where the CPU multiplies half natively (half_gemm_available); results in the inputs'
// dtype, statistics in float32.
bool is_half(at::ScalarType dtype) {
  return dtype == at::kBFloat16 || dtype == at::kHalf;
}

at::Tensor widened(const at::Tensor& t) {
  return t.defined() && is_half(t.scalar_type()) ? t.to(at::kFloat) : t;
}

// q and k as the schedules take them: widened to float32 and, for distance kernels, translated
// (translated_points). Half inputs of distance kernels are translated, rounded to their half type
// and widened again, and q, k are replaced by those half rows: the half GEMMs of the gradients
// (C·k, Cᵀ·q) and the float32 terms beside them then see exactly the same points.
std::pair<at::Tensor, at::Tensor> translated_operands(at::Tensor& q, at::Tensor& k, const Options& o) {
  auto [qw, kw] = translated_points(widened(q), widened(k), o);
  if (is_distance(o.kernel) && is_half(q.scalar_type())) {
    q = qw.to(q.scalar_type());
    k = kw.to(k.scalar_type());
    qw = q.to(at::kFloat);
    kw = k.to(at::kFloat);
  }
  return {qw, kw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aggregate_forward_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& self_value, c10::string_view kernel, double scale, double power,
    double gamma, double eps, c10::string_view normalize, c10::string_view update, bool symmetric,
    bool keep_products) {
  Options o = parse_options(kernel, scale, power, gamma, eps, normalize, update, symmetric);
  check_inputs(query, key, value, self_value, o);
  TORCH_CHECK(!(keep_products && symmetric), "nonlocal_ext: keep_products is not available with symmetric");
  const at::ScalarType dtype = query.scalar_type();
  const bool half_gemms = half_gemm_available(dtype);
  o.row_block = row_block_for(query.size(1), key.size(1), query.size(2), value.size(2), half_gemms);
  at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  at::Tensor u;
  if (o.diffusion) u = self_value ? self_value->contiguous() : v;
  auto [qw, kw] = translated_operands(q, k, o);
  const HalfInputs half = half_gemms ? half_inputs(dtype, o, q, k, v, at::Tensor()) : HalfInputs();
  q = qw;
  k = kw;
  v = widened(v);
  u = widened(u);
  // The tile products q kᵀ (ρ under direct differences) in the compute dtype, (B, N, M), or (B, 0, 0).
  const at::Tensor products = at::empty({q.size(0), keep_products ? q.size(1) : 0, keep_products ? k.size(1) : 0},
                                        q.options());
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nonlocal_ext::aggregate_forward", [&] {
    result = forward_impl<scalar_t>(q, k, v, u, o, half, keep_products ? products : at::Tensor());
  });
  auto [out, row_stats, col_stats] = std::move(result);
  if (is_half(dtype)) out = out.to(dtype);
  return {out, row_stats, col_stats, products};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> aggregate_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& self_value, const at::Tensor& out, const at::Tensor& row_stats,
    const at::Tensor& col_stats, c10::string_view kernel, double scale, double power, double gamma,
    double eps, c10::string_view normalize, c10::string_view update, bool symmetric,
    const std::optional<at::Tensor>& products) {
  Options o = parse_options(kernel, scale, power, gamma, eps, normalize, update, symmetric);
  check_inputs(query, key, value, self_value, o);
  const at::ScalarType dtype = query.scalar_type();
  const bool half_gemms = half_gemm_available(dtype);
  o.row_block = row_block_for(query.size(1), key.size(1), query.size(2), value.size(2), half_gemms);
  // `out` is part of the schema for backends that form S_i = G_i·out_i; these kernels sum S_i
  // from the tiles instead (see normalization_terms).
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "nonlocal_ext: grad_out must have the shape of out");
  const bool stored = products.has_value() && products->numel() > 0;
  if (stored)
    TORCH_CHECK(!symmetric && products->dim() == 3 && products->size(0) == query.size(0) &&
                    products->size(1) == query.size(1) && products->size(2) == key.size(1),
                "nonlocal_ext: products must be the forward's (B, N, M) products, and not symmetric");
  at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  at::Tensor g = grad_out.contiguous().to(dtype);
  at::Tensor u;
  if (o.diffusion) u = self_value ? self_value->contiguous() : v;
  auto [qw, kw] = translated_operands(q, k, o);
  const HalfInputs half = half_gemms ? half_inputs(dtype, o, q, k, v, g) : HalfInputs();
  q = qw;
  k = kw;
  v = widened(v);
  u = widened(u);
  g = widened(g);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> result;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nonlocal_ext::aggregate_backward", [&] {
    result = backward_impl<scalar_t>(g, q, k, v, u, self_value.has_value(), row_stats.contiguous(),
                                     col_stats.contiguous(), o, half,
                                     stored ? products->to(q.scalar_type()).contiguous() : at::Tensor());
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
