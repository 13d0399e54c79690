"""``backend="triton"``: the fused Triton kernels of ``nonlocal_ext.triton_kernels``, as custom ops.

Two operators, registered with :func:`torch.library.custom_op` so that ``torch.compile(fullgraph=True)``
traces through them (their fake implementations give the shapes):

* ``nonlocal_ext::triton_aggregate_forward(query, key, value, self_value, ...) -> (out, row_stats, col_stats)``
* ``nonlocal_ext::triton_aggregate_backward(grad_out, query, key, value, self_value, out, row_stats,
  col_stats, ...) -> (grad_query, grad_key, grad_value, grad_self_value)``

with the autograd formula of the first given by the second (:func:`torch.library.register_autograd`).
The forward saves only the inputs, the output and O(N + M) statistics; the backward recomputes
every tile (see :mod:`nonlocal_ext.triton_kernels.aggregate` for the formulas).

Devices: CUDA tensors; CPU tensors only when ``TRITON_INTERPRET=1`` was set before the kernels
were first used (the Triton interpreter, for tests). The backward is deterministic: it uses no
atomics, every gradient element is reduced in a fixed order by one program.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels import KERNELS, KernelParams
from ..spec import AggregateSpec
from ._common import forward_fake, save_for_backward

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
    return AggregateSpec(KERNELS[kernel], KernelParams(scale, power, gamma, eps), normalize, update, symmetric)


@torch.library.custom_op("nonlocal_ext::triton_aggregate_forward", mutates_args=())
def aggregate_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, self_value: Optional[torch.Tensor],
                      kernel: str, scale: float, power: Optional[float], gamma: float, eps: float, normalize: str,
                      update: str, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = _spec(kernel, scale, power, gamma, eps, normalize, update, symmetric)
    out, row_stats, col_stats = _launchers().forward(query, key, value, self_value, spec)
    return out.to(query.dtype), row_stats, col_stats


aggregate_forward.register_fake(forward_fake)


@torch.library.custom_op("nonlocal_ext::triton_aggregate_backward", mutates_args=())
def aggregate_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       self_value: Optional[torch.Tensor], out: torch.Tensor, row_stats: torch.Tensor,
                       col_stats: torch.Tensor, kernel: str, scale: float, power: Optional[float], gamma: float,
                       eps: float, normalize: str, update: str, symmetric: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns the four gradients; ``grad_self_value`` is an empty tensor when ``self_value`` is None."""
    spec = _spec(kernel, scale, power, gamma, eps, normalize, update, symmetric)
    dq, dk, dv, du = _launchers().backward(grad_out, query, key, value, self_value, out, row_stats, col_stats, spec)
    return dq, dk, dv, (query.new_empty(0) if du is None else du)


@aggregate_backward.register_fake
def _(grad_out, query, key, value, self_value, out, row_stats, col_stats, kernel, scale, power, gamma, eps,
      normalize, update, symmetric):
    return (torch.empty_like(query), torch.empty_like(key), torch.empty_like(value),
            query.new_empty(0) if self_value is None else torch.empty_like(self_value))


_SCALARS = ("kernel", "scale", "power", "gamma", "eps", "normalize", "update", "symmetric")


def _backward(ctx, grad_out, _grad_row_stats, _grad_col_stats):
    query, key, value, self_value, out, row_stats, col_stats = ctx.saved_tensors
    dq, dk, dv, du = aggregate_backward(grad_out, query, key, value, self_value, out, row_stats, col_stats,
                                        *ctx.scalars)
    return dq, dk, dv, (du if self_value is not None else None), *([None] * len(_SCALARS))


aggregate_forward.register_autograd(_backward, setup_context=save_for_backward)


def aggregate(query, key, value, self_value, spec):
    """``(B, N, D)``, ``(B, M, D)``, ``(B, M, C)``, ``(B, N, C)`` or None -> ``(B, N, C)``; differentiable."""
    p = spec.params
    out, _, _ = aggregate_forward(query, key, value, self_value, spec.kernel.name, p.scale, p.power, p.gamma, p.eps,
                                  spec.normalize, spec.update, spec.symmetric)
    return out
