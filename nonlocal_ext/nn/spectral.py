r"""The spectral nonlocal blocks of “A Spectral Nonlocal Block for Neural Networks”: ``SpectralNonLocal`` (SNL, Eq. 9; gSNL, Eq. 11).

    Z = g(X),   A = symmetrized, normalized affinity of θ(X) and φ(X)
    SNL  (Eq. 9):   Y = X + BN(Z W1 + A Z W2)
    gSNL (Eq. 11):  Y = X + BN(Z W1 + A Z W2 + (2A − I) Z W3)
                      = X + BN(Z (W1 − W3) + A Z (W2 + 2 W3))

A is W̃ = (W + Wᵀ)/2 of the kernel w_ij = f(θ_i, φ_j), normalized ``sym`` (D^−½ W̃ D^−½, as in
the authors' code) or ``row`` (D⁻¹ W̃, as in the paper's text). Both forms cost one aggregation
A Z (``symmetric=True`` in the op); gSNL applies the combined weights W1 − W3 and W2 + 2 W3. g, θ, φ
are 1×1 convolutions to ``inter_channels``; W1, W2, W3 bias-free 1×1 convolutions back to C, and
the BN is zero-initialized, so the block starts as the identity.

The default kernel is the Gaussian exp(scale·θᵀφ): its sums are positive, so both normalizations
are defined; so are ``rbf`` and ``fractional``. The paper's dot product (``kernel="dot"``) follows
the authors' code: θ and φ pass through a ReLU, so that every affinity scale·θ_iᵀφ_j and every row
and column sum is ≥ 0 before D^−½ W D^−½ (without it a negative sum makes ``sym`` NaN); it takes
the exact linear-time path. ``kernel="log"`` is refused: its weights change sign, so the degree
normalization is undefined.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._common import (aggregate, channel_counts, check_backend, check_bool, check_input, check_kernel, positions,
                      refuse_log, zero_norm)


class SpectralNonLocal(nn.Module):
    r"""SNL (``generalized=False``) or gSNL (``generalized=True``) on ``(B, C, *spatial)``, 1–3 spatial dims.

    Args:
        in_channels: C.
        inter_channels: channels of g, θ, φ; default C // 2 (at least 1).
        generalized: add the full-order term (2A − I) Z W3 of Eq. 11.
        kernel: affinity kernel of the op: ``"gaussian"`` (default), ``"rbf"``, ``"fractional"`` or
            ``"dot"`` (θ and φ through a ReLU, as in the authors' code).
        normalize: ``"sym"`` (default) or ``"row"``.
        scale: the kernel's scale; ``None`` means 1/√inter_channels.
        power, gamma, eps: the kernel's other parameters (``power`` for ``"fractional"``), as in the op.
        backend: the op's ``backend=``.
        device, dtype: factory keyword arguments of the parameters.
    """

    def __init__(self, in_channels: int, inter_channels: int | None = None, generalized: bool = False,
                 kernel: str = "gaussian", normalize: str = "sym", scale: float | None = None,
                 backend: str = "auto", *, power: float | None = None, gamma: float | None = None,
                 eps: float | None = None, device=None, dtype=None):
        super().__init__()
        c, ci = channel_counts(in_channels, inter_channels)
        check_bool(generalized, "generalized")
        if normalize not in ("sym", "row"):
            raise ValueError(f"SpectralNonLocal: normalize must be 'sym' or 'row', got {normalize!r}")
        self.scale = 1.0 / math.sqrt(ci) if scale is None else scale
        check_kernel(kernel, "SpectralNonLocal", scale=self.scale, power=power, gamma=gamma, eps=eps)
        refuse_log(kernel, "SpectralNonLocal", "D^-1/2 W D^-1/2 (sym)" if normalize == "sym" else "D^-1 W (row)")
        self.in_channels, self.inter_channels = c, ci
        self.generalized, self.kernel, self.normalize = generalized, kernel, normalize
        self.backend = check_backend(backend)
        self.kernel_params = {"scale": float(self.scale), "power": power, "gamma": gamma, "eps": eps}
        factory = {"device": device, "dtype": dtype}
        self.g = nn.Conv1d(c, ci, kernel_size=1, **factory)
        self.theta = nn.Conv1d(c, ci, kernel_size=1, **factory)
        self.phi = nn.Conv1d(c, ci, kernel_size=1, **factory)
        self.w1 = nn.Conv1d(ci, c, kernel_size=1, bias=False, **factory)
        self.w2 = nn.Conv1d(ci, c, kernel_size=1, bias=False, **factory)
        self.w3 = nn.Conv1d(ci, c, kernel_size=1, bias=False, **factory) if generalized else None
        self.bn = zero_norm(nn.BatchNorm1d(c, **factory))

    def extra_repr(self) -> str:
        return (f"generalized={self.generalized}, kernel={self.kernel!r}, normalize={self.normalize!r}, "
                f"scale={self.scale:g}, backend={self.backend!r}")

    def embed(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """θ and φ of ``(B, C, N)`` as ``(B, N, Ci)``; through a ReLU for ``kernel="dot"``."""
        query, key = positions(self.theta(flat)), positions(self.phi(flat))
        if self.kernel == "dot":
            query, key = F.relu(query), F.relu(key)
        return query, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, "SpectralNonLocal", channels=self.in_channels)
        flat = x.flatten(2)                                             # (B, C, N)
        z = self.g(flat)                                                # (B, Ci, N)
        query, key = self.embed(flat)
        az = aggregate(query, key, positions(z), self.kernel, symmetric=True, normalize=self.normalize,
                       backend=self.backend, **self.kernel_params).transpose(1, 2)
        w_self, w_graph = self.w1.weight, self.w2.weight
        if self.generalized:                                            # Z(W1 − W3) + AZ(W2 + 2W3)
            w_self, w_graph = w_self - self.w3.weight, w_graph + 2 * self.w3.weight
        out = F.conv1d(z, w_self) + F.conv1d(az, w_graph)
        return x + self.bn(out).reshape(x.shape)
