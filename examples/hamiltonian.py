r"""A Hamiltonian network with optional PIDE nonlocal blocks, for image classification.

Sources: Chang et al., “Reversible Architectures for Arbitrarily Deep Residual Neural Networks”
(AAAI 2018), and Kannan, “Deep Neural Networks and PIDE discretizations” (Master's thesis,
University of Bonn, 2020): the network in its §2.4.2 and §4.1, the nonlocal blocks in §4.2.

Hamiltonian block (Verlet scheme, Eq. 2.17 of the thesis): the input X is split channel-wise into
(Y, Z) and

    Y_{j+1} = Y_j + h K_{j1}ᵀ σ(K_{j1} Z_j + b_{j1})
    Z_{j+1} = Z_j − h K_{j2}ᵀ σ(K_{j2} Y_{j+1} + b_{j2})

with K a 3×3 convolution, Kᵀ its transpose (``conv_transpose2d`` with the same weight) and
σ = ReLU; the output is the concatenation (Y_{j+1}, Z_{j+1}).

Network (the thesis' Fig. 4.1, §4.4): an opening 3×3 convolution (with ReLU; optionally strided), then Units of
``blocks`` Hamiltonian blocks each; Units are joined by 2×2 average pooling and a 1×1
convolution (with ReLU) that widens the channels; global average pooling and a linear layer
close it. Additions to the thesis' description: a BatchNorm after the opening and joining
convolutions and one on the pooled features before the linear layer (without them, on Q-tips
the pooled features hardly differ between images: in a 10-epoch trial the small networks of
``train_qtips.py`` stayed at chance level). With ``nonlocal_operator`` set, a :class:`nonlocal_ext.nn.PIDENonLocal` block follows the
second Hamiltonian block of each Unit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nonlocal_ext.nn import PIDENonLocal


class HamiltonianBlock(nn.Module):
    """One Verlet step of Eq. 2.17 on ``(B, channels, H, W)`` (channels even)."""

    def __init__(self, channels: int, h: float = 0.1):
        super().__init__()
        if channels % 2:
            raise ValueError(f"a Hamiltonian block splits its channels in two halves, got {channels}")
        half = channels // 2
        self.h = h
        self.k1 = nn.Parameter(torch.empty(half, half, 3, 3))
        self.k2 = nn.Parameter(torch.empty(half, half, 3, 3))
        self.b1 = nn.Parameter(torch.zeros(half))
        self.b2 = nn.Parameter(torch.zeros(half))
        for k in (self.k1, self.k2):
            nn.init.kaiming_normal_(k, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, z = x.chunk(2, dim=1)
        y = y + self.h * F.conv_transpose2d(F.relu(F.conv2d(z, self.k1, self.b1, padding=1)), self.k1, padding=1)
        z = z - self.h * F.conv_transpose2d(F.relu(F.conv2d(y, self.k2, self.b2, padding=1)), self.k2, padding=1)
        return torch.cat([y, z], dim=1)


class HamiltonianNet(nn.Module):
    """Hamiltonian network; ``nonlocal_operator=None`` gives the plain network.

    Args:
        num_classes: outputs of the final linear layer.
        channels: channels of each Unit (the thesis uses 32, 64, 112).
        blocks: Hamiltonian blocks per Unit (the thesis uses 6).
        h: step size of the Hamiltonian blocks.
        nonlocal_operator: ``"diffusion"``, ``"fractional_laplacian"``,
            ``"inverse_fractional_laplacian"`` or None.
        nonlocal_kwargs: arguments of :class:`PIDENonLocal` (``s``, ``scale``, ``h``, ``pool``, ...);
            ``pool`` may be a list with one entry per Unit.
        opening_stride: stride of the opening convolution (1 in the thesis; 2 quarters the cost).
    """

    def __init__(self, num_classes: int, channels=(16, 32, 64), blocks: int = 3, h: float = 0.1,
                 nonlocal_operator: str | None = None, nonlocal_kwargs: dict | None = None, in_channels: int = 3,
                 opening_stride: int = 1):
        super().__init__()
        self.opening = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, stride=opening_stride, padding=1),
                                     nn.BatchNorm2d(channels[0]), nn.ReLU())
        nonlocal_kwargs = dict(nonlocal_kwargs or {})
        pools = nonlocal_kwargs.pop("pool", None)
        if not isinstance(pools, (list, tuple)):
            pools = [pools] * len(channels)
        self.units = nn.ModuleList()
        self.joins = nn.ModuleList()
        for u, c in enumerate(channels):
            layers = []
            for b in range(blocks):
                layers.append(HamiltonianBlock(c, h))
                if nonlocal_operator is not None and b == 1:  # after the second block of the Unit
                    layers.append(PIDENonLocal(c, nonlocal_operator, pool=pools[u], **nonlocal_kwargs))
            self.units.append(nn.Sequential(*layers))
            if u + 1 < len(channels):
                self.joins.append(nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(c, channels[u + 1], 1),
                                                nn.BatchNorm2d(channels[u + 1]), nn.ReLU()))
        # the class lives in a few marker pixels: the pooled features differ little between images,
        # and a BatchNorm on them lets the linear layer see those differences from the first step
        self.head = nn.Sequential(nn.BatchNorm1d(channels[-1]), nn.Linear(channels[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.opening(x)
        for u, unit in enumerate(self.units):
            x = unit(x)
            if u < len(self.joins):
                x = self.joins[u](x)
        return self.head(x.mean(dim=(2, 3)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


if __name__ == "__main__":
    for op in (None, "diffusion"):
        net = HamiltonianNet(15, nonlocal_operator=op, nonlocal_kwargs={"pool": 2})
        out = net(torch.randn(2, 3, 64, 64))
        print(op, tuple(out.shape), count_parameters(net), "parameters", math.prod(out.shape))
