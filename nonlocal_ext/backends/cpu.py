"""``backend="cpu"``: the fused C++ kernels of ``csrc/`` as the custom ops ``torch.ops.nonlocal_ext``.

``aggregate_forward(query, key, value, self_value, kernel, scale, power, gamma, eps, normalize,
update, symmetric) -> (out, row_stats, col_stats)`` computes one tiled aggregation (docs/semantics.md, docs/backends.md)
and saves O(N + M) statistics: the row sums r_i (``log r_i`` for ``gaussian``) and, for
``sym``, the column sums c_j. ``aggregate_backward`` recomputes the affinity tiles from them, or, where
the forward kept its tile products q kᵀ (``keep_products``: :func:`keeps_products`), reads those.

The C++ library also registers the ops' autograd formula (csrc/autograd.cpp); ``backends/_common.py``
registers the fake (meta) kernels that ``torch.compile`` traces with, so the op is differentiable and
traceable without graph breaks. The kernels take float32 and float64, and float16/bfloat16: those accumulate in
float32, with the tile products in half precision where the CPU multiplies it natively
(``avx512_bf16``/AMX for bfloat16, ``avx512_fp16``/AMX-FP16 for float16; elsewhere float32 products of
the widened inputs); the result is in the inputs' dtype.
"""

from __future__ import annotations

import torch

from .._extension import require_extension
from ._common import cpu_kernels_owner, op_arguments

NAME = "cpu"

#: The C++ ops move the query and key rows of distance kernels by the keys' mean themselves (in the
#: pass that makes their operands; ``csrc/points.cpp``), so the op hands them untranslated inputs
#: (:func:`nonlocal_ext.kernels.prepared_points`).
TRANSLATES_POINTS = True


def unsupported_reason(spec, query) -> str | None:
    try:
        require_extension("backend='cpu'")
    except RuntimeError as error:
        return str(error)
    if query.device.type != "cpu":
        return f"backend='cpu' runs on CPU tensors, got a tensor on {query.device}"
    if cpu_kernels_owner() != NAME:
        return ("backend='cpu' is unavailable in this process: the Triton interpreter runs the Triton kernels "
                "as the ops' CPU kernels here (TRITON_INTERPRET=1)")
    return None


def products_fit(m: int, d: int, c: int) -> bool:
    """Whether the tile products q kᵀ (B·N·M values) take no more memory than the query rows (B·N·D) that the
    op saves anyway: M ≤ D. (M ≤ D + C was tried: at detection res4, M = 850 against D = C = 512, the kept
    products took the fused path's peak from below the dense path's to above it; bench/NOTES.md.)"""
    return m <= d


def keeps_products(spec, query, key, value, self_value) -> bool:
    """Whether the forward keeps its tile products q kᵀ for the backward (which then skips that GEMM, D-deep:
    2(2D + 2C) FLOPs per pair instead of 2(3D + 2C)): only when a backward will run, not ``symmetric`` (its
    second product is not kept), and where they take no more memory than the query rows the op saves anyway
    (:func:`products_fit`), so that the memory stays O(N·D)."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (query, key, value, self_value))
    return needs_grad and not spec.symmetric and products_fit(key.shape[-2], query.shape[-1], value.shape[-1])


def aggregate(query, key, value, self_value, spec):
    # Row-major inputs before the op, not inside it: autograd then saves these copies for the backward, which
    # would otherwise copy the inputs again (the layers' inputs are transposed views of convolution outputs).
    query, key, value, self_value = (t if t is None else t.contiguous() for t in (query, key, value, self_value))
    keep = keeps_products(spec, query, key, value, self_value)
    return torch.ops.nonlocal_ext.aggregate_forward(query, key, value, self_value, *op_arguments(spec), keep)[0]

