"""``backend="cpu"``: the fused C++ kernels of ``csrc/`` as the custom ops ``torch.ops.nonlocal_ext``.

``aggregate_forward(query, key, value, self_value, kernel, scale, power, gamma, eps, normalize,
update, symmetric) -> (out, row_stats, col_stats)`` computes one tiled aggregation (docs/semantics.md, docs/backends.md)
and saves O(N + M) statistics: the row sums r_i (``log r_i`` for ``gaussian``) and, for
``sym``, the column sums c_j. ``aggregate_backward`` recomputes the affinity tiles from them.

This module registers, for those ops, the fake (meta) kernels that ``torch.compile`` traces with
and the autograd formula (``register_autograd``), so the op is differentiable and traceable
without graph breaks. The kernels take float32 and float64, and float16/bfloat16: those accumulate in
float32, with the tile products in half precision where the CPU multiplies it natively
(``avx512_bf16``/AMX for bfloat16, ``avx512_fp16``/AMX-FP16 for float16; elsewhere float32 products of
the widened inputs); the result is in the inputs' dtype.
"""

from __future__ import annotations

import torch

from .._extension import extension_available, require_extension
from ._common import forward_fake, save_for_backward

NAME = "cpu"

OP_NAMESPACE = "nonlocal_ext"


def unsupported_reason(spec, query) -> str | None:
    try:
        require_extension("backend='cpu'")
    except RuntimeError as error:
        return str(error)
    if query.device.type != "cpu":
        return f"backend='cpu' runs on CPU tensors, got a tensor on {query.device}"
    return None


def _op_arguments(spec):
    """The scalar arguments of both ops, in schema order after the tensors."""
    p = spec.params
    power = 0.0 if p.power is None else float(p.power)
    return (spec.kernel.name, float(p.scale), power, float(p.gamma), float(p.eps), spec.normalize,
            spec.update, bool(spec.symmetric))


def aggregate(query, key, value, self_value, spec):
    out, _, _ = torch.ops.nonlocal_ext.aggregate_forward(query, key, value, self_value, *_op_arguments(spec))
    return out


# --- torch.library registrations: fake kernels and autograd ------------------------------------


def _backward_fake(grad_out, query, key, value, self_value, out, row_stats, col_stats, *args):
    # The kernels return contiguous gradients whatever the inputs' strides.
    grad_self_value = None if self_value is None else self_value.new_empty(self_value.shape)
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), grad_self_value


def _backward(ctx, grad_out, _grad_row_stats, _grad_col_stats):
    query, key, value, self_value, out, row_stats, col_stats = ctx.saved_tensors
    grads = torch.ops.nonlocal_ext.aggregate_backward(
        grad_out, query, key, value, self_value, out, row_stats, col_stats, *ctx.scalars)
    return (*grads, *(None for _ in ctx.scalars))


def _register():
    forward = f"{OP_NAMESPACE}::aggregate_forward"
    torch.library.register_fake(forward)(forward_fake)
    torch.library.register_fake(f"{OP_NAMESPACE}::aggregate_backward")(_backward_fake)
    torch.library.register_autograd(forward, _backward, setup_context=save_for_backward)


if extension_available():
    _register()
