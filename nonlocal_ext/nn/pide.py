r"""The PIDE nonlocal blocks of Kannan, “Deep Neural Networks and PIDE discretizations” (Eq. 4.1–4.8): ``PIDENonLocal``.

A block of ``stages`` stages with identity skips to the block input X; one affinity between
θ(X) (all N positions) and φ(X̂) (X̂ = X max-pooled by ``pool``, M positions) serves every stage:

    B⁰ = X,     Bᵗ = X + h · K_t(Pᵗ),     K_t = 1×1 conv → ReLU → BatchNorm

where Pᵗ_i, with λ = ``scale``, ρ_ij = ‖θ(X)_i − φ(X̂)_j‖ and v = B̂ᵗ⁻¹ (the pooled previous
stage; v = Bᵗ⁻¹ without pooling), is

| operator | Pᵗ_i | kernel of the op |
|---|---|---|
| ``diffusion`` (Eq. 4.1) | (1/M) Σ_j λ θ_iᵀφ_j (v_j − Bᵗ⁻¹_i) | ``dot`` |
| ``fractional_laplacian`` (s ∈ (0, 1)) | c_{n,s}/M Σ_j λ ρ_ij^−(n+2s) (Bᵗ⁻¹_i − v_j) | ``fractional``, power n+2s |
| ``inverse_fractional_laplacian``, 0 < s < n/2 (Eq. 4.7) | c_{n,−s}/M Σ_j λ ρ_ij^−(n−2s) v_j | ``fractional``, power n−2s |
| ``inverse_fractional_laplacian``, s = n/2 (Eq. 4.8) | c_n/M Σ_j (−2λ log ρ_ij − γ) v_j | ``log`` |

The normalizer is the number of keys M (the thesis' choice "N" of §4.2.1, ``normalize="count"``).
The diffusion-like operators integrate against v_j − u_i with the full-resolution u = Bᵗ⁻¹ as the
op's ``self_value`` (``update="diffusion"``); the fractional Laplacian uses the opposite sign
(Bᵗ⁻¹_i − v_j), in line with the definition of (−Δ)ˢ (Kannan, “Deep Neural Networks and PIDE discretizations”, §4.2.2). Coincident pairs
(ρ = 0) get weight 0 (the thesis' safe divide; for the log kernel this is its −γ/(2λ) rule).

Constants (Kannan, “Deep Neural Networks and PIDE discretizations”, §3.2), from the gamma function:

    c_{n,s}  = 4ˢ Γ(n/2 + s) / (π^{n/2} |Γ(−s)|)
    c_{n,−s} = Γ(n/2 − s) / (4ˢ π^{n/2} Γ(s))
    c_n      = 1 / ((4π)^{n/2} Γ(n/2))

(s = ½, n = 2: c_{2,½} = c_{2,−½} = 1/(2π); c_2 = 1/(4π)). ``n`` is the dimensional constant of
the operator (the thesis uses n = 2 for images), not the number of positions.

θ and φ are 1×1 convolutions to ``inter_channels`` (default C/2); the values are the block's own
C channels.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels import EULER_GAMMA
from ._common import (aggregate, channel_counts, check_backend, check_input, check_kernel, check_number, max_pool,
                      positions, positive_int, shared_positions)

OPERATORS = ("diffusion", "fractional_laplacian", "inverse_fractional_laplacian")


def c_ns(n: float, s: float) -> float:
    """c_{n,s} = 4ˢ Γ(n/2 + s) / (π^{n/2} |Γ(−s)|), the constant of the fractional Laplacian (−Δ)ˢ."""
    return 4.0 ** s * math.gamma(n / 2 + s) / (math.pi ** (n / 2) * abs(math.gamma(-s)))


def c_n_minus_s(n: float, s: float) -> float:
    """c_{n,−s} = Γ(n/2 − s) / (4ˢ π^{n/2} Γ(s)), the constant of the Riesz potential (−Δ)^−s."""
    return math.gamma(n / 2 - s) / (4.0 ** s * math.pi ** (n / 2) * math.gamma(s))


def c_n(n: float) -> float:
    """c_n = 1 / ((4π)^{n/2} Γ(n/2)), the constant of the log kernel ((−Δ)^−s at s = n/2)."""
    return 1.0 / ((4.0 * math.pi) ** (n / 2) * math.gamma(n / 2))


def operator_call(operator: str, s: float, n: float, scale: float) -> tuple[float, dict]:
    """(sign·constant, keyword arguments of the op) for one PIDE operator."""
    if operator == "diffusion":
        return 1.0, {"kernel": "dot", "scale": scale, "update": "diffusion"}
    if operator == "fractional_laplacian":
        # c Σ_j w_ij (u_i − v_j) = −c · [Σ_j w_ij v_j − rowsum(w)_i u_i]
        return -c_ns(n, s), {"kernel": "fractional", "scale": scale, "power": n + 2 * s, "update": "diffusion"}
    if math.isclose(s, n / 2):
        return c_n(n), {"kernel": "log", "scale": scale, "gamma": EULER_GAMMA, "update": "aggregate"}
    return c_n_minus_s(n, s), {"kernel": "fractional", "scale": scale, "power": n - 2 * s, "update": "aggregate"}


class PIDENonLocal(nn.Module):
    r"""PIDE nonlocal block (Kannan, “Deep Neural Networks and PIDE discretizations”, §4.2) on ``(B, C, *spatial)`` with 1, 2 or 3 spatial dims.

    Args:
        in_channels: C (also the channels of the values).
        operator: ``"diffusion"`` (Eq. 4.1), ``"fractional_laplacian"`` (−Δ)ˢ, or
            ``"inverse_fractional_laplacian"`` (−Δ)^−s (Riesz kernel; log kernel at s = n/2).
        s: fractional order: in (0, 1) for the fractional Laplacian, in (0, n/2] for the inverse.
        n: dimensional constant of the operator (2 for images).
        scale: λ, the kernel scale (0.1 in the thesis).
        h: step size of the stages (0.04–0.08 in the thesis).
        stages: number of stages sharing the affinity (2 in the thesis).
        pool: max-pool window (int, or one per spatial dim) of the keys X̂; None: no sub-sampling.
        inter_channels: channels of θ and φ; default C // 2 (at least 1).
        backend: the op's ``backend=``.
        eps: the op's coincident-pair threshold of the fractional and log kernels (``None``: its default).
        device, dtype: factory keyword arguments of the parameters.
    """

    def __init__(self, in_channels: int, operator: str = "diffusion", s: float = 0.5, n: float = 2,
                 scale: float = 0.1, h: float = 0.05, stages: int = 2, pool=None,
                 inter_channels: int | None = None, backend: str = "auto", *, eps: float | None = None,
                 device=None, dtype=None):
        super().__init__()
        c, ci = channel_counts(in_channels, inter_channels)
        if not isinstance(operator, str) or operator not in OPERATORS:
            raise ValueError(f"PIDENonLocal: unknown operator={operator!r}; expected one of "
                             f"{', '.join(map(repr, OPERATORS))}")
        n = check_number(n, "n", positive=True)
        s = check_number(s, "s")
        if operator == "fractional_laplacian" and not 0 < s < 1:
            raise ValueError(f"PIDENonLocal: the fractional Laplacian needs 0 < s < 1, got s={s!r}")
        if operator == "inverse_fractional_laplacian" and not (0 < s < n / 2 or math.isclose(s, n / 2)):
            raise ValueError(f"PIDENonLocal: the inverse fractional Laplacian needs 0 < s <= n/2 = {n / 2:g}, "
                             f"got s={s!r}")
        scale = check_number(scale, "scale", positive=True)
        h = check_number(h, "h", positive=True)
        positive_int(stages, "stages")
        if pool is not None:
            sizes = pool if isinstance(pool, tuple) else (pool,)
            if not sizes or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in sizes):
                raise ValueError(f"PIDENonLocal: pool must be None, a positive int or a tuple of positive ints "
                                 f"(one per spatial dim), got {pool!r}")
        self.in_channels, self.inter_channels = c, ci
        self.operator, self.s, self.n, self.scale, self.h, self.pool = operator, s, n, scale, h, pool
        self.backend = check_backend(backend)
        self.constant, self.op_kwargs = operator_call(operator, self.s, self.n, self.scale)
        if eps is not None:
            self.op_kwargs["eps"] = eps
        check_kernel(self.op_kwargs["kernel"], "PIDENonLocal", scale=scale, power=self.op_kwargs.get("power"),
                     gamma=self.op_kwargs.get("gamma"), eps=eps)
        factory = {"device": device, "dtype": dtype}
        self.theta = nn.Conv1d(c, ci, kernel_size=1, **factory)
        self.phi = nn.Conv1d(c, ci, kernel_size=1, **factory)
        self.K = nn.ModuleList(
            nn.Sequential(nn.Conv1d(c, c, kernel_size=1, **factory), nn.ReLU(), nn.BatchNorm1d(c, **factory))
            for _ in range(stages))

    def extra_repr(self) -> str:
        return (f"operator={self.operator!r}, s={self.s:g}, n={self.n:g}, scale={self.scale:g}, h={self.h:g}, "
                f"pool={self.pool!r}, constant={self.constant:.6g}, backend={self.backend!r}")

    def _keys(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` → the key positions ``(B, M, C)``: pooled if ``pool`` is set."""
        return positions(t if self.pool is None else max_pool(t, self.pool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, "PIDENonLocal", channels=self.in_channels)
        if isinstance(self.pool, tuple) and len(self.pool) != x.dim() - 2:
            raise ValueError(f"PIDENonLocal: pool={self.pool} has {len(self.pool)} sizes but the input "
                             f"{tuple(x.shape)} has {x.dim() - 2} spatial dims; pass one size per spatial dim "
                             f"or an int")
        spatial = x.shape[2:]
        flat = x.flatten(2)                                             # (B, C, N)
        query = shared_positions(self.theta(flat))                      # θ(X):  (B, N, Ci)
        key = shared_positions(self.phi(self._keys(x).transpose(1, 2)))  # φ(X̂):  (B, M, Ci)
        diffusion = self.op_kwargs["update"] == "diffusion"
        prev = x
        for k_t in self.K:
            value = self._keys(prev)                                    # v = B̂ᵗ⁻¹
            self_value = positions(prev) if diffusion and self.pool is not None else None
            p = aggregate(query, key, value, self_value=self_value, normalize="count", backend=self.backend,
                          **self.op_kwargs)
            p = (self.constant * p).transpose(1, 2)
            prev = (flat + self.h * k_t(p)).reshape(x.shape[0], -1, *spatial)
        return prev
