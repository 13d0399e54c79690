"""Small pieces shared by the backends (the numerics they share are in :mod:`nonlocal_ext.numerics`)."""

from __future__ import annotations

import warnings

import torch

from .._extension import extension_available
from ..numerics import compute_dtype


# --- the fused backends' custom ops (cpu, triton): one pair of ops, one fake, one autograd formula ----
#
# ``nonlocal_ext::aggregate_forward`` and ``nonlocal_ext::aggregate_backward``, with these schemas, are
# defined by the C++ library (csrc/nonlocal_ext.cpp, whose text tests/test_extension.py checks against
# these strings) together with its CPU kernels and the autograd formula (csrc/autograd.cpp); the Triton
# launchers are their CUDA kernels. Without the C++ library, :func:`fused_ops` defines them from these
# strings, with the same autograd formula in Python (:func:`register_fused_ops`). Under the Triton interpreter, which
# runs the Triton kernels on CPU tensors, the Triton backend takes the CPU kernels of the ops over for
# that process (:func:`take_cpu_kernels`), and ``backend="cpu"`` is then unavailable there.

OP_NAMESPACE = "nonlocal_ext"
FORWARD_SCHEMA = ("(Tensor query, Tensor key, Tensor value, Tensor? self_value, str kernel, float scale, "
                  "float power, float gamma, float eps, str normalize, str update, bool symmetric, "
                  "bool keep_products=False) -> (Tensor out, Tensor row_stats, Tensor col_stats, Tensor products)")
BACKWARD_SCHEMA = ("(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? self_value, Tensor out, "
                   "Tensor row_stats, Tensor col_stats, str kernel, float scale, float power, float gamma, "
                   "float eps, str normalize, str update, bool symmetric, Tensor? products=None) -> "
                   "(Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor? grad_self_value)")


def forward_fake(query, key, value, self_value, kernel, scale, power, gamma, eps, normalize, update, symmetric,
                 keep_products=False):
    """Fake (meta) kernel of ``aggregate_forward``: ``out (B, N, C)`` in the inputs' dtype, ``row_stats
    (B, N)`` and ``col_stats (B, M)`` for ``sym`` (else ``(B, 0)``), and ``products (B, N, M)`` with
    ``keep_products`` (else ``(B, 0, 0)``), in the compute dtype."""
    batch, n, m, c = query.shape[0], query.shape[1], key.shape[1], value.shape[2]
    stats = compute_dtype(query.dtype)
    return (query.new_empty((batch, n, c)), query.new_empty((batch, n), dtype=stats),
            query.new_empty((batch, m if normalize == "sym" else 0), dtype=stats),
            query.new_empty((batch, n, m) if keep_products else (batch, 0, 0), dtype=stats))


def save_for_backward(ctx, inputs, output):
    """``setup_context`` of ``aggregate_forward``'s autograd without the C++ library (csrc/autograd.cpp has it
    otherwise): the backward recomputes the tiles from the inputs, the output (which the Triton kernels read,
    the only kernels there are then) and the O(N + M) statistics, or reads the tile products the forward kept
    (``keep_products``); none of those is a differentiable output."""
    query, key, value, self_value, *scalars = inputs
    out, row_stats, col_stats, products = output
    ctx.save_for_backward(query, key, value, self_value, out, row_stats, col_stats,
                          products if products.numel() else None)
    ctx.scalars = scalars
    ctx.mark_non_differentiable(row_stats, col_stats, products)
    ctx.set_materialize_grads(False)  # no zero "gradients" of the statistics and products: B·N·M values


#: How many scalar arguments :func:`op_arguments` gives (the forward op's ``keep_products`` follows them).
SPEC_ARGUMENTS = 8


def op_arguments(spec) -> tuple:
    """The scalar arguments of the ops, in schema order after the tensors (``power`` 0 where the kernel
    has none)."""
    p = spec.params
    power = 0.0 if p.power is None else float(p.power)
    return (spec.kernel.name, float(p.scale), power, float(p.gamma), float(p.eps), spec.normalize,
            spec.update, bool(spec.symmetric))


def backward_fake(grad_out, query, key, value, self_value, out, row_stats, col_stats, *scalars, products=None):
    """Fake kernel of ``aggregate_backward``: contiguous gradients of the inputs' shapes."""
    grad_self_value = None if self_value is None else self_value.new_empty(self_value.shape)
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), grad_self_value


def register_fused_ops(forward: str, backward: str, autograd: bool) -> None:
    """The fake kernels of the ops ``forward`` and ``backward`` (qualified names with the schemas above)
    and, with ``autograd``, the autograd formula of ``forward``, which calls ``backward`` on the saved tensors."""
    namespace, name = backward.split("::")
    backward_op = getattr(getattr(torch.ops, namespace), name)

    def backward_formula(ctx, grad_out, _grad_row_stats, _grad_col_stats, _grad_products):
        if grad_out is None:  # no gradient reached ``out`` (grads are not materialized: see save_for_backward)
            return (None,) * (4 + len(ctx.scalars))
        query, key, value, self_value, out, row_stats, col_stats, products = ctx.saved_tensors
        grads = backward_op(grad_out, query, key, value, self_value, out, row_stats, col_stats,
                            *ctx.scalars[:SPEC_ARGUMENTS], products)
        return (*grads, *(None for _ in ctx.scalars))

    torch.library.register_fake(forward)(forward_fake)
    torch.library.register_fake(backward)(backward_fake)
    if autograd:
        torch.library.register_autograd(forward, backward_formula, setup_context=save_for_backward)


FORWARD_OP, BACKWARD_OP = f"{OP_NAMESPACE}::aggregate_forward", f"{OP_NAMESPACE}::aggregate_backward"
_library: torch.library.Library | None = None
_cpu_kernels_owner = "cpu"


def fused_ops() -> torch.library.Library:
    """The library fragment of the fused ops: on first call it defines them and their autograd formula
    (unless the C++ library did) and registers their fake kernels, once, for every backend that implements them."""
    global _library
    if _library is None:
        _library = torch.library.Library(OP_NAMESPACE, "FRAGMENT")
        from_python = not extension_available()  # loaded first: its definitions must not meet ours
        if from_python:
            for op, schema in ((FORWARD_OP, FORWARD_SCHEMA), (BACKWARD_OP, BACKWARD_SCHEMA)):
                _library.define(op.split("::")[1] + schema)
        register_fused_ops(FORWARD_OP, BACKWARD_OP, autograd=from_python)
    return _library


def register_kernels(device: str, forward, backward) -> None:
    """``forward`` and ``backward`` as the ops' kernels for the dispatch key ``device`` ("CUDA", "CPU")."""
    library = fused_ops()
    for op, kernel in ((FORWARD_OP, forward), (BACKWARD_OP, backward)):
        library.impl(op.split("::")[1], kernel, device)


def take_cpu_kernels(owner: str, forward, backward) -> None:
    """For the Triton interpreter: ``owner``'s kernels become the ops' CPU kernels in this process, in place of
    the C++ ones (once; dispatch has one kernel per key). :func:`cpu_kernels_owner` tells the cpu backend."""
    global _cpu_kernels_owner
    if _cpu_kernels_owner == owner:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
        register_kernels("CPU", forward, backward)
    _cpu_kernels_owner = owner


def cpu_kernels_owner() -> str:
    """Which backend's kernels the ops run on CPU tensors in this process: "cpu" (the C++ kernels), or
    "triton" once the interpreter has taken them over."""
    return _cpu_kernels_owner
