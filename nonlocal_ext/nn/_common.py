"""Helpers shared by the layers: position-major views, the op call, pooling, initialization.

The layers hold feature maps as ``(B, C, *spatial)``; the op wants ``(B, positions, features)``.
``positions`` and ``channels_first`` convert between the two; a 1×1 convolution on
``(B, C, *spatial)`` is a ``Conv1d(kernel_size=1)`` on ``(B, C, N)`` and a BatchNorm over
``(B, C, *spatial)`` is a ``BatchNorm1d`` over ``(B, C, N)`` (same per-channel statistics), which
is how the dimension-agnostic layers (NonLocalStage, SpectralNonLocal, PIDENonLocal) work for
1, 2 and 3 spatial dims alike.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import BACKENDS
from ..kernels import KERNELS, resolve_params
from ..ops import nonlocal_aggregate


def check_input(x: torch.Tensor, layer: str, dims=(1, 2, 3), channels: int | None = None) -> None:
    """A TypeError/ValueError naming ``layer``, the expected shape and ``in_channels`` for an input
    that is not ``(B, channels, *spatial)`` with ``dims`` spatial dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() - 2 not in dims:
        spatial = " or ".join(str(d) for d in dims)
        raise ValueError(f"{layer} expects input of shape (B, C, *spatial) with {spatial} spatial dims, "
                         f"got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        spatial = {1: "L", 2: "H, W", 3: "T, H, W"}[x.dim() - 2]
        raise ValueError(f"{layer} expects input of shape (B, {channels}, {spatial}), got {tuple(x.shape)}: "
                         f"{x.shape[1]} channels where the layer was built with in_channels={channels}")


def positions(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` → ``(B, N, C)`` with N = prod(spatial)."""
    return x.flatten(2).transpose(1, 2)


def shared_positions(x: torch.Tensor) -> torch.Tensor:
    """:func:`positions`, row-major: for embeddings that several aggregations share (the stage's units, the PIDE
    steps). The fused CPU op makes transposed inputs row-major before each call and autograd keeps each copy; one
    copy here serves every call, and the convolution output it is taken from is freed."""
    return positions(x).contiguous()


def channels_first(y: torch.Tensor, spatial) -> torch.Tensor:
    """``(B, N, C)`` → ``(B, C, *spatial)``, contiguous.

    A view would be channels-last in memory, and the convolution and BatchNorm after it keep that
    layout; BatchNorm's CPU backward on a channels-last 3-D input is ~10× slower than on a contiguous
    one (a training step of the converted PyTorchVideo block at B=16, C=1024, 14×14: 141 → 104 ms,
    docs/benchmarks.md).
    """
    return y.transpose(1, 2).contiguous().view(y.shape[0], y.shape[2], *spatial)


def aggregate(query, key, value, kernel, **kwargs) -> torch.Tensor:
    """``nonlocal_aggregate`` for the layers (their one call site of the op).

    No dtype handling of its own: under ``torch.autocast`` the op casts its floating inputs to the
    autocast dtype and returns that dtype (as ``matmul`` and ``scaled_dot_product_attention`` do),
    while the layers' convolutions, norms and residual sums are plain ``torch.nn`` calls under
    torch's own autocast rules, so a layer computes in the dtypes of the equivalent block of
    convolutions, BatchNorm and matmuls. Outside autocast every tensor is in the layer's dtype.
    """
    return nonlocal_aggregate(query, key, value, kernel, **kwargs)


def max_pool(x: torch.Tensor, size) -> torch.Tensor:
    """Max-pool the spatial dims of ``(B, C, *spatial)`` with window = stride = ``size``
    (an int for every spatial dim, or one per dim); ``ceil_mode`` keeps a partial window at odd
    sizes, so every position is covered."""
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[x.dim() - 2]
    return pool(x, kernel_size=size, stride=size, ceil_mode=True)


def zero_norm(norm: nn.Module) -> nn.Module:
    """A BatchNorm or GroupNorm whose affine weight and bias start at 0: the residual branch it ends
    starts at exactly 0, so the block starts as the identity (and stays trainable: ∂/∂weight ≠ 0)."""
    nn.init.zeros_(norm.weight)
    nn.init.zeros_(norm.bias)
    return norm


def check_backend(backend) -> str:
    """``backend`` if it names a backend of the op (or ``"auto"``), else a ValueError naming it.
    Whether that backend can run a given input is the op's decision, at the call."""
    names = ("auto", *BACKENDS)
    if not isinstance(backend, str) or backend not in names:
        raise ValueError(f"backend must be one of {', '.join(map(repr, names))}, got {backend!r}")
    return backend


def check_kernel(kernel, layer: str, *, scale, power, gamma, eps) -> None:
    """A ValueError/TypeError naming the argument for an unknown ``kernel`` or kernel parameters
    that kernel does not accept (the op's own per-kernel rules, checked at construction)."""
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"{layer}: kernel must be one of {', '.join(map(repr, KERNELS))}, got {kernel!r}")
    resolve_params(KERNELS[kernel], torch.float32, scale=scale, power=power, gamma=gamma, eps=eps)


def refuse_log(kernel, layer: str, normalization: str) -> None:
    """A ValueError naming ``layer``, its ``normalization`` and the argument for ``kernel="log"``, whose
    weights take both signs (a degree normalization of them is undefined)."""
    if kernel == "log":
        raise ValueError(f"{layer}: kernel='log' has weights of both signs, so its degree normalization "
                         f"{normalization} is undefined; pass kernel='gaussian', 'rbf', 'fractional' or 'dot'")


def check_number(value, name: str, positive: bool = False) -> float:
    """``float(value)`` for a finite real number (> 0 with ``positive``), else a TypeError/ValueError naming ``name``."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number, got {value!r}")
    return float(value)


def check_bool(value, name: str) -> bool:
    """``value`` if it is a bool, else a TypeError naming ``name`` (``"yes"`` or 1 are not flags)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def positive_int(value, name: str) -> int:
    """``value`` if it is a positive int (not a bool), else a ValueError naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def channel_counts(in_channels, inter_channels) -> tuple[int, int]:
    """``(C, inter)`` of a layer: ``inter_channels`` defaults to C // 2 (at least 1)."""
    c = positive_int(in_channels, "in_channels")
    if inter_channels is None:
        return c, max(c // 2, 1)
    return c, positive_int(inter_channels, "inter_channels (or None)")
