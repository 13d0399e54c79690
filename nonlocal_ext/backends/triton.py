"""``backend="triton"``: the fused Triton kernels of ``nonlocal_ext.triton_kernels``, as custom ops.

Two operators, defined from the schemas the C++ kernels' ops share (``backends/_common.py``), with fake
implementations so that ``torch.compile(fullgraph=True)`` traces through them:

* ``nonlocal_ext::triton_aggregate_forward(query, key, value, self_value, ...) -> (out, row_stats, col_stats)``
* ``nonlocal_ext::triton_aggregate_backward(grad_out, query, key, value, self_value, out, row_stats,
  col_stats, ...) -> (grad_query, grad_key, grad_value, grad_self_value)``

with the autograd formula of the first given by the second (``register_fused_ops``, the same
registration as the C++ ops').
The forward saves only the inputs, the output and O(N + M) statistics; the backward recomputes
every tile (see :mod:`nonlocal_ext.triton_kernels.aggregate` for the formulas).

Devices: CUDA tensors; CPU tensors only when ``TRITON_INTERPRET=1`` was set before the kernels
were first used (the Triton interpreter, for tests). The backward is deterministic: it uses no
atomics, every gradient element is reduced in a fixed order by one program.
"""

from __future__ import annotations

import torch

from ..kernels import KERNELS, KernelParams
from ..spec import AggregateSpec
from ._common import BACKWARD_SCHEMA, FORWARD_SCHEMA, OP_NAMESPACE, op_arguments, register_fused_ops

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
        return None
    return (f"backend='triton' runs on CUDA tensors (on CPU tensors only with TRITON_INTERPRET=1 set before "
            f"first use); got a {device} tensor")


def _spec(kernel, scale, power, gamma, eps, normalize, update, symmetric) -> AggregateSpec:
    affinity = KERNELS[kernel]
    params = KernelParams(scale, power if affinity.name == "fractional" else None, gamma, eps)
    return AggregateSpec(affinity, params, normalize, update, symmetric)


def _forward(query, key, value, self_value, *scalars):
    out, row_stats, col_stats = _launchers().forward(query, key, value, self_value, _spec(*scalars))
    return out.to(query.dtype), row_stats, col_stats


def _backward(grad_out, query, key, value, self_value, out, row_stats, col_stats, *scalars):
    return _launchers().backward(grad_out, query, key, value, self_value, out, row_stats, col_stats, _spec(*scalars))


FORWARD, BACKWARD = f"{OP_NAMESPACE}::triton_aggregate_forward", f"{OP_NAMESPACE}::triton_aggregate_backward"
_LIBRARY = torch.library.Library(OP_NAMESPACE, "FRAGMENT")
for _name, _schema, _impl in ((FORWARD, FORWARD_SCHEMA, _forward), (BACKWARD, BACKWARD_SCHEMA, _backward)):
    _LIBRARY.define(_name.split("::")[1] + _schema)
    for _device in ("CUDA", "CPU"):  # CPU: the interpreter (unsupported_reason refuses CPU tensors otherwise)
        _LIBRARY.impl(_name.split("::")[1], _impl, _device)
register_fused_ops(FORWARD, BACKWARD)
aggregate_forward = torch.ops.nonlocal_ext.triton_aggregate_forward


def aggregate(query, key, value, self_value, spec):
    """``(B, N, D)``, ``(B, M, D)``, ``(B, M, C)``, ``(B, N, C)`` or None -> ``(B, N, C)``; differentiable."""
    out, _, _ = aggregate_forward(query, key, value, self_value, *op_arguments(spec))
    return out
