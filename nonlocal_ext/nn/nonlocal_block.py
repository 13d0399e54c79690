r"""The nonlocal block of Wang, Girshick, Gupta and He (CVPR 2018): ``NonLocal1d/2d/3d``.

    z_i = W_z y_i + x_i,        y_i = (1 / C(x)) Σ_j f(x_i, x_j) g(x_j)

with θ, φ, g 1×1 convolutions to ``inter_channels`` and W_z a 1×1 convolution back to
``in_channels`` followed by a BatchNorm whose weight and bias start at 0 (``bn_layer=True``), or
a zero-initialized convolution (``bn_layer=False``): the block starts as the identity.

| mode | f(x_i, x_j) | C(x) | op call |
|---|---|---|---|
| ``gaussian`` | exp(x_iᵀ x_j) | Σ_j f | ``gaussian``, ``row`` on x itself |
| ``embedded_gaussian`` | exp(θ(x_i)ᵀ φ(x_j)) | Σ_j f | ``gaussian``, ``row`` (softmax) |
| ``dot_product`` | θ(x_i)ᵀ φ(x_j) | M | ``dot``, ``count`` (exact linear-time path) |
| ``concatenation`` | ReLU(w_fᵀ [θ(x_i), φ(x_j)]) | M | :func:`concat_relu_aggregate` |

M is the number of key positions (N, or N/2ᵈ with ``sub_sample``). ``use_scale=True`` divides
the exponent of the two Gaussian modes by √(channels of θ) (√in_channels for ``gaussian``).

Module layout and defaults follow the widely used PyTorch implementation of the paper (the
``NONLocalBlock1D/2D/3D`` family): sub-modules ``g``, ``theta``, ``phi``, ``W`` (conv, BN) and, for
``concatenation``, ``concat_project`` (a bias-free ``Conv2d(2·inter, 1, 1)`` then ReLU);
``sub_sample=True`` appends a max-pool (kernel 2, 2×2 or 1×2×2) inside ``g`` and ``phi``; in the
``gaussian`` mode there is no ``theta`` and ``phi`` is just that max-pool (or ``None``). Its
state dicts load unchanged (``strict=True``) and give the same outputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._common import aggregate, channel_counts, channels_first, check_input, positions

MODES = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
#: Other spellings of the modes in common implementations.
_MODE_ALIASES = {"embedded": "embedded_gaussian", "dot": "dot_product", "concatenate": "concatenation"}

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: lambda: nn.MaxPool1d(kernel_size=2), 2: lambda: nn.MaxPool2d(kernel_size=(2, 2)),
         3: lambda: nn.MaxPool3d(kernel_size=(1, 2, 2))}


def concat_relu_aggregate(a: torch.Tensor, b: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    r"""y_i = (1/M) Σ_j ReLU(a_i + b_j) v_j, exactly, in O((N + M)·C + M log M) memory and time.

    Args: a ``(B, N)``, b ``(B, M)``, value ``(B, M, C)``; returns ``(B, N, C)``.

    The concatenation affinity w_fᵀ[θ_i, φ_j] splits into a_i + b_j (a_i = w_θᵀθ_i, b_j = w_φᵀφ_j),
    and ReLU(a_i + b_j) is nonzero exactly on the keys with b_j > −a_i. With the keys sorted by b,
    those keys are a suffix starting at t_i = #{j : b_j ≤ −a_i}, so

        Σ_j ReLU(a_i + b_j) v_j = a_i · S_v[t_i] + S_bv[t_i],

    where S_v[t] = Σ_{r ≥ t} v_(r) and S_bv[t] = Σ_{r ≥ t} b_(r) v_(r) are suffix sums over the
    sorted keys. No N×M tensor is formed. Autograd differentiates the formula: the gradient of
    a_i is S_v[t_i]·G_i, of b_j and v_j the sums over the queries whose suffix contains j — the
    gradients of the dense ReLU formula (0 at the kink, as torch's ReLU). Sums are accumulated
    in at least float32.
    """
    out_dtype = value.dtype
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.promote_types(value.dtype, torch.float32))
    a, b, value = a.to(dtype), b.to(dtype), value.to(dtype)
    batch, m, c = value.shape
    order = torch.argsort(b, dim=-1)
    b_sorted = torch.gather(b, 1, order)
    v_sorted = torch.gather(value, 1, order.unsqueeze(-1).expand(-1, -1, c))

    def suffix_sums(x):  # (B, M, C') → (B, M + 1, C'); row t is Σ_{r ≥ t} x_r, row M is 0
        s = torch.flip(torch.cumsum(torch.flip(x, [1]), dim=1), [1])
        return torch.cat([s, s.new_zeros(batch, 1, x.shape[-1])], dim=1)

    both = suffix_sums(torch.cat([v_sorted, b_sorted.unsqueeze(-1) * v_sorted], dim=-1))
    start = torch.searchsorted(b_sorted.detach().contiguous(), (-a).detach().contiguous(), right=True)
    picked = torch.gather(both, 1, start.unsqueeze(-1).expand(-1, -1, 2 * c))
    y = a.unsqueeze(-1) * picked[..., :c] + picked[..., c:]
    return (y / max(m, 1)).to(out_dtype)


class _NonLocalNd(nn.Module):
    r"""Nonlocal block (Wang et al. 2018) for inputs ``(B, in_channels, *spatial)``; see the module docstring.

    Args:
        in_channels: channels of the input (and output).
        inter_channels: channels of θ, φ, g; default ``in_channels // 2`` (at least 1).
        mode: ``"embedded_gaussian"`` (default), ``"gaussian"``, ``"dot_product"`` or ``"concatenation"``.
        sub_sample: max-pool the key paths g and φ (kernel 2 / 2×2 / 1×2×2): M ≈ N/2ᵈ.
        bn_layer: W = Sequential(conv, BatchNorm) with the BN zero-initialized; else a zero conv.
        use_scale: divide the Gaussian modes' exponent by √(embedding channels).
        backend: the op's ``backend=`` (``"auto"`` picks the fastest available).

    Returns ``z = W(y) + x`` of the input's shape.
    """

    dimension: int = 0

    def __init__(self, in_channels: int, inter_channels: int | None = None, mode: str = "embedded_gaussian",
                 sub_sample: bool = True, bn_layer: bool = True, use_scale: bool = False, backend: str = "auto"):
        super().__init__()
        mode = _MODE_ALIASES.get(mode, mode)
        if mode not in MODES:
            raise ValueError(f"unknown mode={mode!r}; expected one of {', '.join(map(repr, MODES))}")
        self.in_channels, self.inter_channels = channel_counts(in_channels, inter_channels)
        self.mode, self.sub_sample, self.use_scale, self.backend = mode, bool(sub_sample), bool(use_scale), backend
        conv, d = _CONV[self.dimension], self.dimension

        self.g = conv(self.in_channels, self.inter_channels, kernel_size=1)
        if bn_layer:
            self.W = nn.Sequential(conv(self.inter_channels, self.in_channels, kernel_size=1), _BN[d](self.in_channels))
            nn.init.zeros_(self.W[1].weight)
            nn.init.zeros_(self.W[1].bias)
        else:
            self.W = conv(self.inter_channels, self.in_channels, kernel_size=1)
            nn.init.zeros_(self.W.weight)
            nn.init.zeros_(self.W.bias)
        if mode == "gaussian":
            self.theta = None
            self.phi = _POOL[d]() if sub_sample else None
        else:
            self.theta = conv(self.in_channels, self.inter_channels, kernel_size=1)
            self.phi = conv(self.in_channels, self.inter_channels, kernel_size=1)
        if mode == "concatenation":
            self.concat_project = nn.Sequential(
                nn.Conv2d(2 * self.inter_channels, 1, kernel_size=1, bias=False), nn.ReLU())
        if sub_sample:
            self.g = nn.Sequential(self.g, _POOL[d]())
            if mode != "gaussian":
                self.phi = nn.Sequential(self.phi, _POOL[d]())

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, sub_sample={self.sub_sample}, use_scale={self.use_scale}, backend={self.backend!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, type(self).__name__, dims=(self.dimension,))
        value = positions(self.g(x))                                    # (B, M, inter)
        if self.mode == "gaussian":
            query = positions(x)                                        # (B, N, in)
            key = positions(x if self.phi is None else self.phi(x))     # (B, M, in)
        else:
            query, key = positions(self.theta(x)), positions(self.phi(x))
        if self.mode == "concatenation":
            w = self.concat_project[0].weight.reshape(2, self.inter_channels)
            a, b = query @ w[0].to(query.dtype), key @ w[1].to(key.dtype)
            y = concat_relu_aggregate(a, b, value)
        elif self.mode == "dot_product":
            y = aggregate(query, key, value, "dot", normalize="count", backend=self.backend)
        else:
            scale = 1.0 / math.sqrt(query.shape[-1]) if self.use_scale else 1.0
            y = aggregate(query, key, value, "gaussian", scale=scale, normalize="row", backend=self.backend)
        return self.W(channels_first(y, x.shape[2:])) + x


class NonLocal1d(_NonLocalNd):
    __doc__ = _NonLocalNd.__doc__.replace("*spatial", "L")
    dimension = 1


class NonLocal2d(_NonLocalNd):
    __doc__ = _NonLocalNd.__doc__.replace("*spatial", "H, W")
    dimension = 2


class NonLocal3d(_NonLocalNd):
    __doc__ = _NonLocalNd.__doc__.replace("*spatial", "T, H, W")
    dimension = 3
