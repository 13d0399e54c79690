r"""The spectral nonlocal blocks of seed 000: ``SpectralNonLocal`` (SNL, Eq. 9; gSNL, Eq. 11).

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
are defined. The paper's plain dot product (``kernel="dot"``) takes the exact linear-time path but
needs positive row (and column) sums: a negative one makes ``sym`` NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._common import aggregate, channel_counts, check_input, positions, zero_norm


class SpectralNonLocal(nn.Module):
    r"""SNL (``generalized=False``) or gSNL (``generalized=True``) on ``(B, C, *spatial)``, 1–3 spatial dims.

    Args:
        in_channels: C.
        inter_channels: channels of g, θ, φ; default C // 2 (at least 1).
        generalized: add the full-order term (2A − I) Z W3 of Eq. 11.
        kernel: affinity kernel of the op (default ``"gaussian"``).
        normalize: ``"sym"`` (default) or ``"row"``.
        scale: the kernel's scale; ``None`` means 1/√inter_channels.
        backend: the op's ``backend=``.
    """

    def __init__(self, in_channels: int, inter_channels: int | None = None, generalized: bool = False,
                 kernel: str = "gaussian", normalize: str = "sym", scale: float | None = None,
                 backend: str = "auto"):
        super().__init__()
        c, ci = channel_counts(in_channels, inter_channels)
        if normalize not in ("sym", "row"):
            raise ValueError(f"normalize must be 'sym' or 'row', got {normalize!r}")
        self.in_channels, self.inter_channels = c, ci
        self.generalized, self.kernel, self.normalize, self.backend = bool(generalized), kernel, normalize, backend
        self.scale = 1.0 / math.sqrt(ci) if scale is None else float(scale)
        self.g = nn.Conv1d(c, ci, kernel_size=1)
        self.theta = nn.Conv1d(c, ci, kernel_size=1)
        self.phi = nn.Conv1d(c, ci, kernel_size=1)
        self.w1 = nn.Conv1d(ci, c, kernel_size=1, bias=False)
        self.w2 = nn.Conv1d(ci, c, kernel_size=1, bias=False)
        self.w3 = nn.Conv1d(ci, c, kernel_size=1, bias=False) if generalized else None
        self.bn = zero_norm(nn.BatchNorm1d(c))

    def extra_repr(self) -> str:
        return (f"generalized={self.generalized}, kernel={self.kernel!r}, normalize={self.normalize!r}, "
                f"scale={self.scale:g}, backend={self.backend!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, "SpectralNonLocal")
        flat = x.flatten(2)                                             # (B, C, N)
        z = self.g(flat)                                                # (B, Ci, N)
        az = aggregate(positions(self.theta(flat)), positions(self.phi(flat)), positions(z), self.kernel,
                       scale=self.scale, symmetric=True, normalize=self.normalize,
                       backend=self.backend).transpose(1, 2).to(z.dtype)
        w_self, w_graph = self.w1.weight, self.w2.weight
        if self.generalized:                                            # Z(W1 − W3) + AZ(W2 + 2W3)
            w_self, w_graph = w_self - self.w3.weight, w_graph + 2 * self.w3.weight
        out = F.conv1d(z, w_self.to(z.dtype)) + F.conv1d(az, w_graph.to(az.dtype))
        return x + self.bn(out).reshape(x.shape)
