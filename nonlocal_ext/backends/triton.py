"""``backend="triton"``: the fused Triton kernels of ``nonlocal_ext.triton_kernels``, as custom ops.

The CUDA kernels of the fused ops that the C++ CPU kernels implement for CPU tensors
(``backends/_common.py``: one schema, one fake kernel, one autograd formula):

* ``nonlocal_ext::aggregate_forward(query, key, value, self_value, ...) -> (out, row_stats, col_stats, products)``
  (``products`` empty: these kernels keep none)
* ``nonlocal_ext::aggregate_backward(grad_out, query, key, value, self_value, out, row_stats,
  col_stats, ...) -> (grad_query, grad_key, grad_value, grad_self_value)``

the autograd formula of the first given by the second, and fake kernels so that
``torch.compile(fullgraph=True)`` traces through them.
The forward saves only the inputs, the output and O(N + M) statistics; the backward recomputes
every tile (see :mod:`nonlocal_ext.triton_kernels.aggregate` for the formulas).

Devices: CUDA tensors; CPU tensors only when ``TRITON_INTERPRET=1`` was set before the kernels
were first used (the Triton interpreter, for tests): the first such call makes the launchers the ops'
CPU kernels for the rest of the process (``_common.take_cpu_kernels``; ``backend="cpu"`` is then
unavailable there). The backward is deterministic: it uses no
atomics, every gradient element is reduced in a fixed order by one program.
"""

from __future__ import annotations

import torch

from ..kernels import KERNELS, KernelParams
from ..spec import AggregateSpec
from ._common import SPEC_ARGUMENTS, op_arguments, register_kernels, take_cpu_kernels

NAME = "triton"

_import_error: Exception | None = None


def _launchers():
    """``nonlocal_ext.triton_kernels.launchers``, imported on first use (TRITON_INTERPRET is read then)."""
    from ..triton_kernels import launchers
    return launchers


def unsupported_reason(spec, query) -> str | None:
    try:
        launchers = _launchers()
    except Exception as error:  # triton missing or broken
        return f"backend='triton' needs an importable triton ({type(error).__name__}: {error})"
    device = query.device.type
    if device == "cuda":
        if query.dtype == torch.float64:
            return "backend='triton' does not run float64 on CUDA (float64 is verified under the interpreter only)"
        return None
    if device == "cpu" and launchers.INTERPRETED:
        if query.dtype == torch.bfloat16 and not launchers.interpreter_takes_bfloat16():
            return ("backend='triton' under the Triton interpreter does not take bfloat16: this interpreter's "
                    "bfloat16 tl.dot multiplies bit patterns (triton-lang/triton#11584)")
        take_cpu_kernels(NAME, _forward, _backward)
        return None
    return (f"backend='triton' runs on CUDA tensors (on CPU tensors only with TRITON_INTERPRET=1 set before "
            f"first use); got a {device} tensor")


def _spec(kernel, scale, power, gamma, eps, normalize, update, symmetric) -> AggregateSpec:
    affinity = KERNELS[kernel]
    params = KernelParams(scale, power if affinity.name == "fractional" else None, gamma, eps)
    return AggregateSpec(affinity, params, normalize, update, symmetric)


def _forward(query, key, value, self_value, *scalars, keep_products=False):
    """The ops' forward; it keeps no products (``keep_products`` is the CPU kernels' option): ``(B, 0, 0)``."""
    if len(scalars) > SPEC_ARGUMENTS:  # keep_products given positionally
        scalars, keep_products = scalars[:SPEC_ARGUMENTS], scalars[SPEC_ARGUMENTS]
    if keep_products:
        raise ValueError("keep_products: the Triton kernels recompute the tiles; pass keep_products=False")
    out, row_stats, col_stats = _launchers().forward(query, key, value, self_value, _spec(*scalars))
    return out.to(query.dtype), row_stats, col_stats, row_stats.new_empty((query.shape[0], 0, 0))


def _backward(grad_out, query, key, value, self_value, out, row_stats, col_stats, *scalars, products=None):
    return _launchers().backward(grad_out, query, key, value, self_value, out, row_stats, col_stats,
                                 _spec(*scalars[:SPEC_ARGUMENTS]))


register_kernels("CUDA", _forward, _backward)


def aggregate(query, key, value, self_value, spec):
    """``(B, N, D)``, ``(B, M, D)``, ``(B, M, C)``, ``(B, N, C)`` or None -> ``(B, N, C)``; differentiable."""
    return torch.ops.nonlocal_ext.aggregate_forward(query, key, value, self_value, *op_arguments(spec))[0]
