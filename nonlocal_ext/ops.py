"""The public op."""

from __future__ import annotations

import math

import torch

from . import backends
from .kernels import prepared_points
from .spec import validate


def nonlocal_aggregate(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel: str = "gaussian", *,
                       scale: float = 1.0, power: float | None = None, gamma: float = 0.5772156649015329,
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
        scale, power, gamma: kernel parameters; ``power`` is required by ``"fractional"`` only.
        eps: coincident pairs ``‖q−k‖² ≤ eps·(‖q̄‖² + ‖k̄‖²)`` get weight 0 under ``"fractional"``
            and ``"log"``; ``None`` means 1e-12 for float64 and 1e-4 otherwise. q̄ = q − μ and
            k̄ = k − μ, μ the mean of the finite key entries of the batch element: the rule, like
            the distances, does not change when all points move together.
        normalize: ``"none"`` Â = W; ``"count"`` W/M; ``"row"`` D_r⁻¹W; ``"sym"`` D_r^(−½) W D_c^(−½),
            with r, c the row and column sums of W; a zero sum normalizes to zero (safe divide).
        update: ``"aggregate"`` Â v; ``"diffusion"`` Â v − rowsum(Â) ⊙ u.
        symmetric: use (W + Wᵀ)/2 (needs N == M).
        self_value: u for diffusion, ``(..., N, C)``; default ``value`` (needs N == M).
        backend: ``"auto"``, ``"reference"`` (dense), ``"chunked"`` (O(rows·M) memory),
            ``"linear"`` (exact low-rank path of ``"dot"``), ``"cpu"``, ``"triton"``.

    Returns:
        ``(..., N, C)`` in the inputs' dtype; differentiable in query, key, value and self_value.
    """
    spec = validate(query, key, value, kernel, scale=scale, power=power, gamma=gamma, eps=eps,
                    normalize=normalize, update=update, symmetric=symmetric, self_value=self_value,
                    backend=backend)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, self_value))
    impl = backends.select(backend, spec, query, key, value, backward=needs_grad)
    # A NaN/Inf anywhere in a query or key row makes the row NaN (Inf propagates like NaN in every
    # backend); distance kernels also take coordinates relative to the keys' centre (translation
    # invariant in every backend, no cancellation for points far from the origin).
    query, key = prepared_points(spec.kernel, query, key)
    batch = query.shape[:-2]

    def flat(t):
        return None if t is None else t.reshape((math.prod(batch),) + t.shape[-2:])

    out = impl.aggregate(flat(query), flat(key), flat(value), flat(self_value), spec)
    return out.reshape(batch + out.shape[-2:])
