r"""The nonlocal stage of Tao et al., “Nonlocal Neural Networks, Nonlocal Diffusion and Nonlocal Modeling”
(NeurIPS 2018), in the form of “A Spectral Nonlocal Block for Neural Networks” (Zhu et al.), Eq. 3: ``NonLocalStage``.

One affinity A, from θ and φ of the stage input X, is shared by ``units`` consecutive units; each
unit applies the nonlocal-stage operator F(A, Z) = (A − D_A) Z W (graph Laplacian instead of A):

    A    = D⁻¹ W,  w_ij = exp(scale · θ(X)_iᵀ φ(X)_j)        (row-normalized, so D_A = I)
    z⁰   = X
    zᵗ   = zᵗ⁻¹ + BN_t(W_t((A − I) g_t(zᵗ⁻¹))),   [(A − I) v]_i = Σ_j a_ij (v_j − v_i)

with g_t a 1×1 convolution to ``inter_channels``, W_t one back to C and BN_t zero-initialized
(the stage starts as the identity). Each unit is one op call with ``update="diffusion"`` on the
same query/key embeddings: S units cost S aggregations, no N×N tensor exists.

A unit could also be read as z ← z + ReLU(BN(W((A − I) z))). Two differences, on
purpose: (1) no ReLU after the BN: with the BN zero-initialized (identity at init) the branch
is exactly 0, where ReLU's derivative is 0, so no gradient would ever reach the unit and it
would stay the identity; “A Spectral Nonlocal Block for Neural Networks” Eq. 3 has no activation either (F(A, Z) = (A − D_A) Z W);
(2) a g embedding per unit (Z = g(z), as in Eq. 1–3 and Tao et al.), so the op aggregates
``inter_channels`` instead of C channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._common import (aggregate, channel_counts, check_backend, check_input, check_kernel, positions, positive_int,
                      refuse_log, shared_positions, zero_norm)


class NonLocalStage(nn.Module):
    r"""Nonlocal stage (“A Spectral Nonlocal Block for Neural Networks”, Eq. 3) on ``(B, C, *spatial)`` with 1, 2 or 3 spatial dims.

    Args:
        in_channels: C.
        inter_channels: channels of θ, φ and each unit's g; default C // 2 (at least 1).
        units: number of units sharing the affinity (default 2).
        kernel: the op's affinity kernel between θ and φ: ``"gaussian"`` (default: softmax rows),
            ``"rbf"``, ``"fractional"``, or ``"dot"`` (θ and φ through a ReLU so that the row sums are ≥ 0,
            as in the authors' code of the spectral nonlocal block); ``"log"`` is refused (weights of
            both signs: the row normalization is undefined).
        scale: the kernel's scale; ``None`` means 1/√inter_channels.
        power, gamma, eps: the kernel's other parameters (``power`` for ``"fractional"``), as in the op.
        backend: the op's ``backend=``.
        device, dtype: factory keyword arguments of the parameters.
    """

    def __init__(self, in_channels: int, inter_channels: int | None = None, units: int = 2,
                 kernel: str = "gaussian", scale: float | None = None, backend: str = "auto", *,
                 power: float | None = None, gamma: float | None = None, eps: float | None = None,
                 device=None, dtype=None):
        super().__init__()
        c, ci = channel_counts(in_channels, inter_channels)
        positive_int(units, "units")
        self.scale = 1.0 / math.sqrt(ci) if scale is None else scale
        check_kernel(kernel, "NonLocalStage", scale=self.scale, power=power, gamma=gamma, eps=eps)
        refuse_log(kernel, "NonLocalStage", "D^-1 W (row)")
        self.in_channels, self.inter_channels, self.kernel = c, ci, kernel
        self.backend = check_backend(backend)
        self.kernel_params = {"scale": float(self.scale), "power": power, "gamma": gamma, "eps": eps}
        factory = {"device": device, "dtype": dtype}
        self.theta = nn.Conv1d(c, ci, kernel_size=1, **factory)
        self.phi = nn.Conv1d(c, ci, kernel_size=1, **factory)
        self.units = nn.ModuleList(
            nn.ModuleDict({"g": nn.Conv1d(c, ci, kernel_size=1, **factory),
                           "W": nn.Conv1d(ci, c, kernel_size=1, **factory),
                           "bn": zero_norm(nn.BatchNorm1d(c, **factory))})
            for _ in range(units))

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}, scale={self.scale:g}, backend={self.backend!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, "NonLocalStage", channels=self.in_channels)
        flat = x.flatten(2)                                             # (B, C, N)
        query, key = shared_positions(self.theta(flat)), shared_positions(self.phi(flat))
        if self.kernel == "dot":
            query, key = F.relu(query), F.relu(key)
        z = flat
        for unit in self.units:
            laplace = aggregate(query, key, positions(unit["g"](z)), self.kernel, normalize="row",
                                update="diffusion", backend=self.backend, **self.kernel_params)
            z = z + unit["bn"](unit["W"](laplace.transpose(1, 2)))
        return z.reshape(x.shape)
