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

M is the number of key positions (N, or N/prod(pool_size) with ``sub_sample``). ``use_scale``
sets the scale of the two Gaussian modes' exponent (1/√inter, 1/√in or a number).

Module layout and defaults follow the widely used PyTorch implementation of the paper (the
``NONLocalBlock1D/2D/3D`` family): sub-modules ``g``, ``theta``, ``phi``, ``W`` (conv, BN) and, for
``concatenation``, ``concat_project`` (a bias-free ``Conv2d(2·inter, 1, 1)`` then ReLU);
``sub_sample=True`` appends a max-pool (kernel 2, 2×2 or 1×2×2) inside ``g`` and ``phi``; in the
``gaussian`` mode there is no ``theta`` and ``phi`` is just that max-pool (or ``None``). Its
state dicts load unchanged (``strict=True``) and give the same outputs.

Keyword options express the other common blocks exactly (:func:`nonlocal_ext.nn.convert` builds
them): pooling x once before φ and g with any window (``pool_input``, ``pool_size``: SlowFast,
PyTorchVideo), the softmax scale (``use_scale``: mmcv 1/√inter, timm 1/√in), the output norm
(``norm``: BatchNorm, GroupNorm or none) and the biases (``bias``, ``out_bias``).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ._common import (aggregate, channel_counts, channels_first, check_backend, check_bool, check_input, positions,
                      positive_int, zero_norm)
from .pooling import MaxPool1d, MaxPool2d, MaxPool3d

MODES = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
#: Other spellings of the modes in common implementations.
_MODE_ALIASES = {"embedded": "embedded_gaussian", "dot": "dot_product", "concatenate": "concatenation"}

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAXPOOL = {1: MaxPool1d, 2: MaxPool2d, 3: MaxPool3d}  # nn.MaxPool*d with a faster CPU forward (pooling.py)
#: The paper's key pooling window per number of spatial dims (video: space only).
DEFAULT_POOL_SIZE = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}
_SPATIAL = {1: "L", 2: "H, W", 3: "T, H, W"}
_NORMS = ("batch", "group", "none")


def _pool_size(pool_size, sub_sample, pool_input, dim, name):
    """The key pooling window as a tuple of ``dim`` positive ints (None without ``sub_sample``)."""
    if not sub_sample:
        if pool_size is not None or pool_input:
            raise ValueError(f"{name}: pool_size={pool_size!r} and pool_input={pool_input!r} set the key pooling, "
                             f"which needs sub_sample=True")
        return None
    if pool_size is None:
        return DEFAULT_POOL_SIZE[dim]
    sizes = (pool_size,) * dim if isinstance(pool_size, int) and not isinstance(pool_size, bool) else pool_size
    if (not isinstance(sizes, (tuple, list)) or len(sizes) != dim
            or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in sizes)):
        raise ValueError(f"{name}: pool_size must be a positive int or a tuple of {dim} positive ints, got {pool_size!r}")
    return tuple(sizes)


def _norm(norm, bn_layer, name):
    if norm is None:
        return "batch" if bn_layer else "none"
    if norm not in _NORMS:
        raise ValueError(f"{name}: norm must be one of {', '.join(map(repr, _NORMS))}, got {norm!r}")
    if not bn_layer and norm != "none":
        raise ValueError(f"{name}: bn_layer=False (no output norm) contradicts norm={norm!r}; pass only norm=")
    return norm


def _softmax_scale(use_scale, mode, in_channels, inter_channels, name):
    """(use_scale as given, the number it means) for the Gaussian modes' exp(scale·θᵀφ)."""
    if use_scale is False:
        return use_scale, 1.0
    if mode not in ("gaussian", "embedded_gaussian"):
        raise ValueError(f"{name}: use_scale={use_scale!r} applies to the Gaussian modes only, not mode={mode!r}")
    if use_scale is True:
        return use_scale, 1.0 / math.sqrt(in_channels if mode == "gaussian" else inter_channels)
    if use_scale == "inter":
        return use_scale, 1.0 / math.sqrt(inter_channels)
    if use_scale == "in":
        return use_scale, 1.0 / math.sqrt(in_channels)
    if isinstance(use_scale, numbers.Integral) and not isinstance(use_scale, bool):
        raise ValueError(f"{name}: use_scale={use_scale!r} is ambiguous (a flag or a scale?): pass True/False, "
                         f"or the scale as a float")
    if isinstance(use_scale, numbers.Real) and not isinstance(use_scale, bool) and math.isfinite(use_scale) and use_scale > 0:
        return use_scale, float(use_scale)
    raise ValueError(f"{name}: use_scale must be False, True, 'inter', 'in' or a finite positive number, "
                     f"got {use_scale!r}")


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
        sub_sample: max-pool the keys (window = stride = ``pool_size``, floor at odd sizes), M ≈ N/prod(pool_size).
        bn_layer: the output norm is a BatchNorm (``True``) or nothing (``False``, a zero-initialized conv);
            ``norm=`` says the same and more.
        use_scale: the softmax scale of the two Gaussian modes, exp(scale·θᵀφ): ``False`` 1;
            ``True`` 1/√(channels of θ) (inter_channels; in_channels in the ``gaussian`` mode);
            ``"inter"`` 1/√inter_channels; ``"in"`` 1/√in_channels; or a positive float (an int such as 1
            is refused as ambiguous).
        backend: the op's ``backend=`` (``"auto"`` picks the fastest available).

    Keyword-only (the options that express the blocks of other libraries exactly):
        pool_size: the max-pool window per spatial dim (an int for all of them, or a tuple); default
            2, 2×2 and 1×2×2 (the paper's), only with ``sub_sample``.
        pool_input: pool x once before φ and g (``pool`` sub-module; SlowFast/PyTorchVideo) instead of
            pooling the outputs of φ and g (inside ``phi`` and ``g``; the paper's code, mmcv). A max-pool
            does not commute with a convolution that has a bias, so the two differ.
        norm: ``"batch"``, ``"group"`` (``norm_groups`` groups) or ``"none"``; default from ``bn_layer``.
            The norm's weight and bias (or, with ``"none"``, the output conv) start at 0.
        norm_groups: groups of the GroupNorm (``norm="group"``).
        bias: biases on θ, φ and g.
        out_bias: bias on the output convolution W_z.
        device, dtype: factory keyword arguments of the parameters, as for ``torch.nn`` modules.

    Returns ``z = W(y) + x`` of the input's shape.

    Sub-modules: ``theta``, ``phi``, ``g`` (with the key pooling inside ``phi`` and ``g`` unless
    ``pool_input``), ``pool`` (with ``pool_input``), ``W`` (``Sequential(conv, norm)`` or a conv),
    ``concat_project``.
    """

    dimension: int = 0

    def __init__(self, in_channels: int, inter_channels: int | None = None, mode: str = "embedded_gaussian",
                 sub_sample: bool = True, bn_layer: bool = True, use_scale=False, backend: str = "auto", *,
                 pool_size=None, pool_input: bool = False, norm: str | None = None, norm_groups: int = 32,
                 bias: bool = True, out_bias: bool = True, device=None, dtype=None):
        super().__init__()
        d, name = self.dimension, type(self).__name__
        if not isinstance(mode, str) or _MODE_ALIASES.get(mode, mode) not in MODES:
            raise ValueError(f"{name}: unknown mode={mode!r}; expected one of {', '.join(map(repr, MODES))}")
        mode = _MODE_ALIASES.get(mode, mode)
        self.in_channels, self.inter_channels = channel_counts(in_channels, inter_channels)
        for flag, value in (("sub_sample", sub_sample), ("bn_layer", bn_layer), ("pool_input", pool_input),
                            ("bias", bias), ("out_bias", out_bias)):
            check_bool(value, flag)
        self.backend = check_backend(backend)
        self.mode, self.sub_sample, self.pool_input = mode, sub_sample, pool_input
        self.pool_size = _pool_size(pool_size, sub_sample, pool_input, d, name)
        self.norm = _norm(norm, bn_layer, name)
        if self.norm == "group":
            positive_int(norm_groups, "norm_groups")
            if self.in_channels % norm_groups:
                raise ValueError(f"{name}: norm_groups={norm_groups} must divide in_channels={self.in_channels}")
        self.use_scale, self.scale = _softmax_scale(use_scale, mode, self.in_channels, self.inter_channels, name)
        factory = {"device": device, "dtype": dtype}
        conv, pool = _CONV[d], (lambda: _MAXPOOL[d](kernel_size=self.pool_size))

        def projection():
            return conv(self.in_channels, self.inter_channels, kernel_size=1, bias=bias, **factory)

        self.g = projection()
        out_conv = conv(self.inter_channels, self.in_channels, kernel_size=1, bias=out_bias, **factory)
        if self.norm == "none":
            self.W = out_conv
            nn.init.zeros_(self.W.weight)
            if out_bias:
                nn.init.zeros_(self.W.bias)
        else:
            norm_layer = (_BN[d](self.in_channels, **factory) if self.norm == "batch"
                          else nn.GroupNorm(norm_groups, self.in_channels, **factory))
            self.W = nn.Sequential(out_conv, zero_norm(norm_layer))
        if mode == "gaussian":
            self.theta = None
            self.phi = pool() if sub_sample and not pool_input else None
        else:
            self.theta, self.phi = projection(), projection()
        if mode == "concatenation":
            self.concat_project = nn.Sequential(
                nn.Conv2d(2 * self.inter_channels, 1, kernel_size=1, bias=False, **factory), nn.ReLU())
        if sub_sample and pool_input:
            self.pool = pool()
        elif sub_sample:
            self.g = nn.Sequential(self.g, pool())
            if mode != "gaussian":
                self.phi = nn.Sequential(self.phi, pool())

    def extra_repr(self) -> str:
        pooling = (f"pool_size={self.pool_size}, pool_input={self.pool_input}" if self.sub_sample else "sub_sample=False")
        return (f"mode={self.mode!r}, {pooling}, scale={self.scale:.6g}, norm={self.norm!r}, "
                f"backend={self.backend!r}")

    def check_input(self, x: torch.Tensor) -> None:
        """A ValueError naming the layer, the expected shape and the argument to change, for an input
        of the wrong rank, with the wrong channel count, or smaller than the pooling window."""
        name = type(self).__name__
        check_input(x, name, dims=(self.dimension,), channels=self.in_channels)
        expected = f"(B, {self.in_channels}, {_SPATIAL[self.dimension]})"
        if self.sub_sample and any(s < k for s, k in zip(x.shape[2:], self.pool_size)):
            raise ValueError(f"{name}: input spatial size {tuple(x.shape[2:])} is smaller than the key pooling "
                             f"window pool_size={self.pool_size}; expected {expected} with each spatial size at "
                             f"least {self.pool_size}, or pass sub_sample=False (or a smaller pool_size)")

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(query (B, N, D), key (B, M, D), value (B, M, inter))`` of the input: θ(x), φ(x̂), g(x̂)
        at the key positions x̂ (x itself for θ and φ in the ``gaussian`` mode)."""
        # θ, φ, g in this order (autograd runs their convolutions' backwards in the reverse order): with g first,
        # as mmcv's block computes them, a training step of the converted timm block at res4 peaked 1 MB above the
        # original, and mmcv's 2.7 MB higher than in this order (bench/NOTES.md).
        keys_in = self.pool(x) if self.sub_sample and self.pool_input else x
        query = positions(x if self.mode == "gaussian" else self.theta(x))
        key = positions(keys_in if self.phi is None else self.phi(keys_in))
        return query, key, positions(self.g(keys_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.W(channels_first(self._aggregated(x), x.shape[2:])) + x

    def _aggregated(self, x: torch.Tensor) -> torch.Tensor:
        """y ``(B, N, inter)``. Its own function so that the embeddings and y are not held while W runs: the fused
        path saves what its backward needs itself (at res3 the step's peak was 6 MB lower)."""
        query, key, value = self.embed(x)
        if self.mode == "concatenation":
            a, b = self._concat_scores(query, key)
            return concat_relu_aggregate(a, b, value)
        if self.mode == "dot_product":
            return aggregate(query, key, value, "dot", normalize="count", backend=self.backend)
        return aggregate(query, key, value, "gaussian", scale=self.scale, normalize="row", backend=self.backend)

    def _concat_scores(self, query, key):
        w = self.concat_project[0].weight.reshape(2, self.inter_channels)
        return query @ w[0], key @ w[1]

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        r"""The normalized affinity Â ``(B, N, M)`` of the layer on ``x`` (AlexHex7's ``nl_map``), for inspection.

        Dense: it forms the N×M matrix (memory O(B·N·M)), so it is meant for small inputs. The layer's
        aggregate is ``y = affinity(x) @ value`` with ``value = embed(x)[2]``, and its output is
        ``W(y) + x``; the forward pass itself never forms this matrix.
        """
        self.check_input(x)
        query, key, _ = self.embed(x)
        m = key.shape[1]
        if self.mode == "concatenation":
            a, b = self._concat_scores(query, key)
            return torch.relu(a.unsqueeze(-1) + b.unsqueeze(-2)) / m
        scores = query @ key.transpose(1, 2)
        if self.mode == "dot_product":
            return scores / m
        return torch.softmax(self.scale * scores, dim=-1)


class NonLocal1d(_NonLocalNd):
    __doc__ = _NonLocalNd.__doc__.replace("*spatial", "L")
    dimension = 1


class NonLocal2d(_NonLocalNd):
    __doc__ = _NonLocalNd.__doc__.replace("*spatial", "H, W")
    dimension = 2


class NonLocal3d(_NonLocalNd):
    __doc__ = _NonLocalNd.__doc__.replace("*spatial", "T, H, W")
    dimension = 3
