"""The nonlocal blocks' key max-pool: ``MaxPool1d/2d/3d``, the ``torch.nn`` classes with a faster CPU forward.

The blocks pool their keys with windows equal to their strides (``kernel_size=pool_size``). On CPU tensors of
float32 and float64, contiguous, that pooling runs the C++ op ``nonlocal_ext::max_pool_forward`` (csrc/pooling.cpp):
the same values, indices and gradients as ``torch.nn.functional.max_pool1d/2d/3d``, with the maximum selected
without branches (a forward 2–11× faster than torch's on one core at the layers' shapes: bench/NOTES.md, "The
layers' key max-pool as our own kernel"). Every
other input, configuration or a build without the extension runs the ``torch.nn`` forward. The modules are
subclasses of ``nn.MaxPool1d/2d/3d``: same arguments, repr and (empty) state dict.
"""

from __future__ import annotations

import torch
from torch import nn

from .._extension import extension_available

_OPS = None


def _ops():
    """``torch.ops.nonlocal_ext`` with the pooling ops' fake kernels and autograd registered (once, at import), or
    None without the compiled extension (or with one built before it had these ops)."""
    global _OPS
    if _OPS is None and extension_available() and hasattr(torch.ops.nonlocal_ext, "max_pool_forward"):
        forward, backward = "nonlocal_ext::max_pool_forward", "nonlocal_ext::max_pool_backward"
        ops = torch.ops.nonlocal_ext

        @torch.library.register_fake(forward)
        def _(x, window):
            shape = (*x.shape[:2], *(size // k for size, k in zip(x.shape[2:], window)))
            return x.new_empty(shape), x.new_empty(shape, dtype=torch.long)

        @torch.library.register_fake(backward)
        def _(grad_out, indices, input_like):
            return grad_out.new_empty(input_like.shape)

        def setup_context(ctx, inputs, output):
            x, _window = inputs
            ctx.save_for_backward(output[1])
            ctx.input_like = x.new_empty(()).expand(x.shape)  # its shape only
            ctx.mark_non_differentiable(output[1])

        def backward_formula(ctx, grad_out, _grad_indices):
            (indices,) = ctx.saved_tensors
            return ops.max_pool_backward(grad_out, indices, ctx.input_like), None

        torch.library.register_autograd(forward, backward_formula, setup_context=setup_context)

        def setup_backward_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[1])

        def double_backward(ctx, grad_grad_in):  # the backward is linear in grad_out: a gather at the indices
            (indices,) = ctx.saved_tensors
            picked = grad_grad_in.flatten(2).gather(2, indices.flatten(2)).view(indices.shape)
            return picked, None, None

        torch.library.register_autograd(backward, double_backward, setup_context=setup_backward_context)
        _OPS = ops
    return _OPS


_ops()  # registered before anything traces a layer (registration inside a torch.compile trace would break it)


class _KeyPool:
    """The forward of the blocks' key pooling (mixed into the ``nn.MaxPool`` classes below)."""

    def _runs_op(self, x: torch.Tensor) -> bool:
        dims = x.dim() - 2
        window = _as_tuple(self.kernel_size, dims)
        return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.is_contiguous()
                and dims == self._dims and _as_tuple(self.stride, dims) == window
                and _as_tuple(self.padding, dims) == (0,) * dims and _as_tuple(self.dilation, dims) == (1,) * dims
                and not self.ceil_mode and not self.return_indices
                and all(size >= k for size, k in zip(x.shape[2:], window)) and _OPS is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runs_op(x):
            return _OPS.max_pool_forward(x, list(_as_tuple(self.kernel_size, self._dims)))[0]
        return super().forward(x)


def _as_tuple(value, dims: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


class MaxPool1d(_KeyPool, nn.MaxPool1d):
    _dims = 1


class MaxPool2d(_KeyPool, nn.MaxPool2d):
    _dims = 2


class MaxPool3d(_KeyPool, nn.MaxPool3d):
    _dims = 3
