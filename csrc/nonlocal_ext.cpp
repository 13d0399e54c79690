// Operator schemas of the `nonlocal_ext` library, and the Python module `nonlocal_ext._C`.
//
// aggregate_forward computes one nonlocal aggregation (definitions: docs/semantics.md):
//   w_ij = f_kernel(query_i, key_j)           affinity, never stored as an N×M matrix
//   W    <- (W + Wᵀ)/2                          if symmetric (then N == M)
//   Â    = normalize(W)                         none | count | row | sym
//   out  = Â·value                              update == "aggregate"
//   out  = Â·value − rowsum(Â) ⊙ u              update == "diffusion", u = self_value or value
// Shapes: query (B, N, D), key (B, M, D), value (B, M, C), self_value (B, N, C) or None;
// out (B, N, C). row_stats (B, N) and col_stats (B, M) are the per-row / per-column normalizer
// statistics (e.g. the row sums r_i and column sums c_j) that the forward saves so that the
// backward can recompute W tile by tile instead of storing it. With keep_products (not symmetric)
// the forward also returns the tile products q kᵀ (B, N, M) (else (B, 0, 0)), for a backward
// that reads them instead of recomputing them: the caller keeps them where N×M is small.
//
// aggregate_backward takes ∂L/∂out plus everything the forward saw and returned (products: the
// forward's, or None to recompute), and gives the gradients of query, key, value, and of
// self_value when one was passed (None otherwise).
//
// max_pool_forward / max_pool_backward: the layers' key max-pooling, input (B, C, *spatial) with one window per
// spatial dim, windows equal to their strides, no padding, floored: (out, indices) and the input's gradient as
// ATen's max_pool1d/2d/3d_with_indices give them (input_like: a tensor of the input's shape, read for its shape).
//
// Only the schemas live here. Kernels are registered per dispatch key elsewhere
// (TORCH_LIBRARY_IMPL in other csrc/*.cpp files; aggregate_forward's autograd in csrc/autograd.cpp);
// fake kernels and the pooling ops' autograd are registered from Python with torch.library.

#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(nonlocal_ext, m) {
  m.def(
      "aggregate_forward(Tensor query, Tensor key, Tensor value, Tensor? self_value, "
      "str kernel, float scale, float power, float gamma, float eps, str normalize, "
      "str update, bool symmetric, bool keep_products=False) -> (Tensor out, Tensor row_stats, "
      "Tensor col_stats, Tensor products)");
  m.def(
      "aggregate_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, "
      "Tensor? self_value, Tensor out, Tensor row_stats, Tensor col_stats, str kernel, "
      "float scale, float power, float gamma, float eps, str normalize, str update, "
      "bool symmetric, Tensor? products=None) -> (Tensor grad_query, Tensor grad_key, "
      "Tensor grad_value, Tensor? grad_self_value)");
  m.def("max_pool_forward(Tensor input, int[] window) -> (Tensor out, Tensor indices)");
  m.def("max_pool_backward(Tensor grad_out, Tensor indices, Tensor input_like) -> Tensor");
}

// `import nonlocal_ext._C` only has to load this shared library so that the static
// TORCH_LIBRARY registrations above run; the module itself exports nothing. A bare module
// init function does that without pulling in pybind11 (torch/extension.h), which keeps the
// build short. The function name must match the extension name given in setup.py ("_C").
PyMODINIT_FUNC PyInit__C(void) {  // PyMODINIT_FUNC is extern "C" and exported
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // m_name
      "Operator registrations of nonlocal_ext (see torch.ops.nonlocal_ext).",  // m_doc
      -1,  // m_size: no per-interpreter state
      nullptr,  // m_methods
  };
  return PyModule_Create(&module_def);
}
