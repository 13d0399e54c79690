// The autograd formula of aggregate_forward, for every device: the backward is the op aggregate_backward on the
// saved inputs, output and O(N + M) statistics (or on the tile products the forward kept).
//
// It is registered here, for the Autograd dispatch key, rather than from Python with torch.library's
// register_autograd: that wrapper costs ≈ 70 µs per forward and ≈ 90 µs per backward in Python (it rebuilds the
// schema's argument list per call), which at N = M = 256 was a fifth of a training step of the op
// (bench/NOTES.md, "The op's autograd in C++"). Without this library the ops are defined from Python and take
// the same formula there (nonlocal_ext/backends/_common.py). Fake kernels stay in Python.

#include <cstdlib>
#include <cstring>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace nonlocal_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>>;

const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("nonlocal_ext::aggregate_forward", "")
                             .typed<Forward(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const std::optional<at::Tensor>&, c10::string_view, double, double,
                                            double, double, c10::string_view, c10::string_view, bool, bool)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("nonlocal_ext::aggregate_backward", "")
          .typed<Backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          c10::string_view, double, double, double, double, c10::string_view, c10::string_view, bool,
                          const std::optional<at::Tensor>&)>();
  return op;
}

// `out` as the backward needs it. The C++ kernels read only its shape (they sum S_i from the tiles): a stand-in of
// that shape holding one element, so that out's B·N·C values are freed with the caller's last reference, as after a
// dense product. The Triton kernels read its values (S_i = G_i·out_i): on CUDA, and on CPU tensors under the Triton
// interpreter (TRITON_INTERPRET=1), where the Triton kernels may have taken the CPU key over.
at::Tensor saved_out(const at::Tensor& out) {
  const char* interpret = std::getenv("TRITON_INTERPRET");
  const bool triton_may_read = interpret != nullptr && std::strcmp(interpret, "1") == 0;
  if (out.device().is_cpu() && !triton_may_read) return out.new_empty({}).expand_symint(out.sym_sizes());
  return out;
}

struct Aggregate : public torch::autograd::Function<Aggregate> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const std::optional<at::Tensor>& self_value,
                               c10::string_view kernel, double scale, double power, double gamma, double eps,
                               c10::string_view normalize, c10::string_view update, bool symmetric,
                               bool keep_products) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, row_stats, col_stats, products] = forward_op().call(
        query, key, value, self_value, kernel, scale, power, gamma, eps, normalize, update, symmetric, keep_products);
    ctx->save_for_backward({query, key, value, self_value.value_or(at::Tensor()), saved_out(out), row_stats,
                            col_stats, keep_products ? products : at::Tensor()});
    ctx->saved_data["kernel"] = std::string(kernel);
    ctx->saved_data["normalize"] = std::string(normalize);
    ctx->saved_data["update"] = std::string(update);
    ctx->saved_data["scalars"] = std::vector<double>{scale, power, gamma, eps};
    ctx->saved_data["symmetric"] = symmetric;
    ctx->mark_non_differentiable({row_stats, col_stats, products});
    ctx->set_materialize_grads(false);  // no zero "gradients" of the statistics and products: B·N·M values
    return {out, row_stats, col_stats, products};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list none(13);
    if (!grads[0].defined()) return none;  // no gradient reached `out`
    const auto saved = ctx->get_saved_variables();
    const auto optional = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
    const auto scalars = ctx->saved_data["scalars"].toDoubleVector();
    const std::string kernel = ctx->saved_data["kernel"].toStringRef(),
                      normalize = ctx->saved_data["normalize"].toStringRef(),
                      update = ctx->saved_data["update"].toStringRef();
    auto [grad_query, grad_key, grad_value, grad_self_value] = backward_op().call(
        grads[0], saved[0], saved[1], saved[2], optional(saved[3]), saved[4], saved[5], saved[6], kernel, scalars[0],
        scalars[1], scalars[2], scalars[3], normalize, update, ctx->saved_data["symmetric"].toBool(),
        optional(saved[7]));
    none[0] = grad_query;
    none[1] = grad_key;
    none[2] = grad_value;
    if (grad_self_value) none[3] = *grad_self_value;
    return none;
  }
};

Forward aggregate_forward_autograd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                   const std::optional<at::Tensor>& self_value, c10::string_view kernel, double scale,
                                   double power, double gamma, double eps, c10::string_view normalize,
                                   c10::string_view update, bool symmetric, bool keep_products) {
  auto outs = Aggregate::apply(query, key, value, self_value, kernel, scale, power, gamma, eps, normalize, update,
                               symmetric, keep_products);
  return {outs[0], outs[1], outs[2], outs[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(nonlocal_ext, Autograd, m) {
  m.impl("aggregate_forward", aggregate_forward_autograd);
}

}  // namespace nonlocal_ext
