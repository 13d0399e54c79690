"""The public op."""

from __future__ import annotations

import math

import torch

from . import backends
from .kernels import prepared_points
from .spec import check_sym_sums, validate


def _autocast_dtype(query) -> torch.dtype | None:
    """The autocast dtype in effect for the query's device type, or None when autocast is off there."""
    if not isinstance(query, torch.Tensor):
        return None
    device_type = query.device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast_cast(t, device_type: str, dtype: torch.dtype):
    """PyTorch's rule for ops that run in the autocast dtype (``torch.library.register_autocast``,
    SDPA, matmul): floating tensors on the autocast device are cast, float64 and the rest are not."""
    eligible = (isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == device_type
                and t.dtype is not torch.float64)
    return t.to(dtype) if eligible else t


def nonlocal_aggregate(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel: str = "gaussian", *,
                       scale: float = 1.0, power: float | None = None, gamma: float | None = None,
                       eps: float | None = None, normalize: str = "row", update: str = "aggregate",
                       symmetric: bool = False, self_value: torch.Tensor | None = None,
                       backend: str = "auto") -> torch.Tensor:
    r"""Nonlocal aggregation ``out = Â v`` (or diffusion ``Â v − rowsum(Â) ⊙ u``) without forming W when it can.

    Args:
        query: ``(..., N, D)``; key: ``(..., M, D)``; value: ``(..., M, C)``; the same leading
            batch dims on all, one floating dtype, one device.
        kernel: the affinity ``w_ij = f(q_i, k_j)``: ``"dot"`` scale·q·k, ``"gaussian"`` exp(scale·q·k),
            ``"rbf"`` exp(−scale·‖q−k‖²), ``"fractional"`` scale·‖q−k‖^(−power),
            ``"log"`` −2·scale·log‖q−k‖ − gamma (see :mod:`nonlocal_ext.kernels`).
        scale: the kernel's scale; ``"rbf"`` and ``"log"`` need ``scale > 0`` (a negative one makes
            them grow without bound with the distance).
        power: the exponent of ``"fractional"``, required there and refused by the other kernels.
        gamma: the constant of ``"log"`` (``None``: the Euler–Mascheroni constant); refused by the
            other kernels.
        eps: coincident pairs ``‖q−k‖² ≤ eps·(‖q̄‖² + ‖k̄‖²)`` get weight 0 under ``"fractional"``
            and ``"log"``; ``None`` means 1e-12 for float64 and 1e-4 otherwise. q̄ = q − μ and
            k̄ = k − μ, μ the mean of the finite key entries of the batch element: the rule, like
            the distances, does not change when all points move together.
        normalize: ``"none"`` Â = W; ``"count"`` W/M; ``"row"`` D_r⁻¹W; ``"sym"`` D_r^(−½) W D_c^(−½),
            with r, c the row and column sums of W; a zero sum normalizes to zero (safe divide).
            ``"sym"`` needs non-negative sums: refused for ``"fractional"`` with ``scale < 0``; with
            ``"dot"`` or ``"log"``, whose weights take either sign, a negative sum on the given data
            raises a ValueError (checked on the result, one host synchronization; not under
            ``torch.compile``, ``torch.func`` transforms, CUDA graph capture or on meta/fake tensors,
            where it gives NaN).
        update: ``"aggregate"`` Â v; ``"diffusion"`` Â v − rowsum(Â) ⊙ u.
        symmetric: use (W + Wᵀ)/2 (needs N == M).
        self_value: u for diffusion, ``(..., N, C)``; default ``value`` (needs N == M).
        backend: ``"auto"``, ``"reference"`` (dense), ``"chunked"`` (O(rows·M) memory),
            ``"linear"`` (exact low-rank path of ``"dot"``), ``"cpu"``, ``"triton"``.

    Returns:
        ``(..., N, C)`` in the inputs' dtype; differentiable in query, key, value and self_value.

    Autocast: inside ``torch.autocast(device_type, dtype)`` for the inputs' device, floating inputs
    other than float64 are cast to the autocast dtype (the convention of ``torch.library.register_autocast``
    and of ``scaled_dot_product_attention``), so mixed bfloat16/float32 inputs are accepted and the
    result is in the autocast dtype; the op then runs with autocast off (every backend accumulates
    half precision in float32 itself).
    """
    dtype = _autocast_dtype(query)
    if dtype is None:
        return _aggregate(query, key, value, kernel, scale=scale, power=power, gamma=gamma, eps=eps,
                          normalize=normalize, update=update, symmetric=symmetric, self_value=self_value,
                          backend=backend)
    device_type = query.device.type
    query, key, value, self_value = (_autocast_cast(t, device_type, dtype) for t in (query, key, value, self_value))
    with torch.autocast(device_type, enabled=False):
        return _aggregate(query, key, value, kernel, scale=scale, power=power, gamma=gamma, eps=eps,
                          normalize=normalize, update=update, symmetric=symmetric, self_value=self_value,
                          backend=backend)


def _aggregate(query, key, value, kernel, *, scale, power, gamma, eps, normalize, update, symmetric, self_value,
               backend):
    spec = validate(query, key, value, kernel, scale=scale, power=power, gamma=gamma, eps=eps,
                    normalize=normalize, update=update, symmetric=symmetric, self_value=self_value,
                    backend=backend)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, self_value))
    impl = backends.select(backend, spec, query, key, value, backward=needs_grad)
    # A NaN/Inf anywhere in a query or key row makes the row NaN (Inf propagates like NaN in every
    # backend); distance kernels also take coordinates relative to the keys' centre (translation
    # invariant in every backend, no cancellation for points far from the origin), here or, for a
    # backend that translates as it copies its operands, in the backend.
    # A backend may take the NaN/Inf screen over where it is cheaper on what it computes anyway
    # (``screens_products``: the dense reference on q kᵀ).
    screens = getattr(impl, "screens_products", None)
    if screens is None or not screens(spec, query, key):
        query, key = prepared_points(spec.kernel, query, key,
                                     translate=not getattr(impl, "TRANSLATES_POINTS", False))
    batch = query.shape[:-2]

    def flat(t):  # one batch dim (a reshape call costs microseconds: skipped where there is one already)
        return t if t is None or t.dim() == 3 else t.reshape((math.prod(batch),) + t.shape[-2:])

    out = impl.aggregate(flat(query), flat(key), flat(value), flat(self_value), spec)
    check_sym_sums(spec, (query, key, value, self_value), out)
    return out if len(batch) == 1 else out.reshape(batch + out.shape[-2:])
