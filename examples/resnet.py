r"""The CIFAR-style ResNet of He, Zhang, Ren and Sun, “Deep Residual Learning for Image Recognition”
(CVPR 2016, §4.2): the baseline of the Q-tips experiment (Kannan, “Deep Neural Networks and PIDE
discretizations”, §5.2, uses ResNet-44: 0.66M parameters).

ResNet-(6n+2): an opening 3×3 convolution to ``width`` channels, then three stages of n basic
blocks (two 3×3 convolutions with BatchNorm and ReLU, and an identity skip) with ``width``,
2·``width`` and 4·``width`` channels, the first block of stages 2 and 3 halving the resolution;
global average pooling and a linear layer. Where a block changes the shape, the skip sub-samples
by 2 and pads the new channels with zeros (the paper's parameter-free option A), so that
depth 20/32/44 with width 16 has the paper's 0.27M/0.46M/0.66M parameters.
``opening_stride=2`` makes the opening convolution strided (a quarter of the cost, as for the
Hamiltonian network of ``hamiltonian.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride, self.pad = stride, out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        skip = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.pad:
            skip = F.pad(skip, (0, 0, 0, 0, 0, self.pad))              # zero channels (option A)
        return F.relu(out + skip)


class CifarResNet(nn.Module):
    """ResNet-``depth`` (depth = 6n + 2: 20, 32, 44, 56, ...) with stage widths ``width``·(1, 2, 4)."""

    def __init__(self, num_classes: int, depth: int = 20, width: int = 16, in_channels: int = 3,
                 opening_stride: int = 1):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, ...), got {depth}")
        n = (depth - 2) // 6
        self.opening = nn.Sequential(nn.Conv2d(in_channels, width, 3, stride=opening_stride, padding=1, bias=False),
                                     nn.BatchNorm2d(width), nn.ReLU())
        layers, c = [], width
        for stage, out in enumerate((width, 2 * width, 4 * width)):
            for b in range(n):
                layers.append(BasicBlock(c, out, stride=2 if stage and b == 0 else 1))
                c = out
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.opening(x)).mean(dim=(2, 3)))
