"""``backend="linear"``: the exact linear-time path for ``kernel="dot"``.

``W = scale · q kᵀ`` has rank ≤ D, so every product with W is two thin GEMMs:
``W V = scale · q (kᵀ V)`` and ``Wᵀ V = scale · k (qᵀ V)``; ``symmetric`` averages the two.
The row sums are ``r = W 1``, the column sums ``c = Wᵀ 1`` and ``sym`` normalization is
``Â v = r^(−½) ⊙ W (c^(−½) ⊙ v)``. Cost O((N+M)·D·C) instead of O(N·M·D); exact; autograd
differentiates it directly. The diffusion term needs ``rowsum(Â) = Â 1``, which rides along
as one extra column of ones appended to v.

It accumulates in float64 whatever the input dtype: the normalizations divide one low-rank
product by another, and the gradient of that ratio cancels (to exactly 0 when M = 1 under
``row``); in float32 the cancellation costs about 50× the error of the dense computation.
The path is O((N+M)·D·C), so the wider dtype is cheap against any O(N·M·D) backend.
"""

from __future__ import annotations

import torch

from ..numerics import safe_inverse_power

NAME = "linear"


def unsupported_reason(spec, query) -> str | None:
    if spec.kernel.name != "dot":
        return f"backend='linear' is the exact low-rank path of kernel='dot' only, not kernel={spec.kernel.name!r}"
    return None


def aggregate(query, key, value, self_value, spec):
    dtype = query.dtype
    q, k, v = (t.to(torch.float64) for t in (query, key, value))
    scale, m = spec.params.scale, k.shape[-2]

    def times_w(x):  # W x
        out = q @ (k.transpose(-1, -2) @ x)
        if spec.symmetric:
            out = 0.5 * (out + k @ (q.transpose(-1, -2) @ x))
        return scale * out

    def times_wt(x):  # Wᵀ x
        return times_w(x) if spec.symmetric else scale * (k @ (q.transpose(-1, -2) @ x))

    ones_m = v.new_ones(v.shape[:-1] + (1,))
    v1 = torch.cat([v, ones_m], dim=-1)  # [v | 1]: the last column of Â v1 is rowsum(Â)
    if spec.normalize == "sym":
        col_sums = times_wt(q.new_ones(q.shape[:-1] + (1,)))
        y1 = times_w(v1 * safe_inverse_power(col_sums, 0.5))
        row_sums = times_w(ones_m)
        y1 = y1 * safe_inverse_power(row_sums, 0.5)
    else:
        y1 = times_w(v1)
        if spec.normalize == "row":
            y1 = y1 * safe_inverse_power(y1[..., -1:], 1.0)
        elif spec.normalize == "count":
            y1 = y1 / m
    out, row_sums_a = y1[..., :-1], y1[..., -1:]
    if spec.diffusion:
        u = v if self_value is None else self_value.to(v.dtype)
        out = out - row_sums_a * u
    return out.to(dtype)
