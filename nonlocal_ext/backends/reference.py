"""``backend="reference"``: the dense PyTorch computation, the ground truth of every test.

It materializes the whole ``(B, N, M)`` affinity matrix and lets autograd differentiate it,
so it shares no backward code with the fused backends. It computes in the inputs' dtype,
except float16/bfloat16, which it accumulates in float32 like every other backend (so that the
coincident-pair threshold ``eps`` means the same everywhere).
"""

from __future__ import annotations

import math

import torch

from ..kernels import in_log_domain, pair_variable
from ._common import compute_dtype, safe_inverse_power

NAME = "reference"


def unsupported_reason(spec, query) -> str | None:
    return None


def _affinity(spec, query, key):
    """W (or log W for log-domain kernels under row/sym, see ``in_log_domain``), symmetrized if asked."""
    kernel, p = spec.kernel, spec.params
    x, coincident = pair_variable(kernel, query, key, eps=p.eps)
    if in_log_domain(kernel, spec.normalize):
        z = kernel.log_weight(x, p)
        if spec.symmetric:
            z = torch.logaddexp(z, z.transpose(-1, -2)) - math.log(2.0)
        return z
    w = kernel.weight(x, p)
    if coincident is not None:
        w = torch.where(coincident, torch.zeros_like(w), w)
    if spec.symmetric:
        w = 0.5 * (w + w.transpose(-1, -2))
    return w


def _normalized(spec, z, m):
    """Â from W (or from log W, with log-sum-exp normalizers)."""
    if in_log_domain(spec.kernel, spec.normalize):
        if spec.normalize == "row":
            return torch.softmax(z, dim=-1)
        half_log_r = 0.5 * torch.logsumexp(z, dim=-1, keepdim=True)  # sym
        half_log_c = 0.5 * torch.logsumexp(z, dim=-2, keepdim=True)
        return torch.exp(z - half_log_r - half_log_c)
    w = z
    if spec.normalize == "row":
        return w * safe_inverse_power(w.sum(-1, keepdim=True), 1.0)
    if spec.normalize == "sym":
        return (w * safe_inverse_power(w.sum(-1, keepdim=True), 0.5)
                * safe_inverse_power(w.sum(-2, keepdim=True), 0.5))
    return w / m if spec.normalize == "count" else w


def aggregate(query, key, value, self_value, spec):
    """out = Â v, or Â v − rowsum(Â) ⊙ u for diffusion; inputs are (B, N, D), (B, M, D), (B, M, C)."""
    dtype = compute_dtype(query.dtype)
    q, k, v = (t.to(dtype) for t in (query, key, value))
    a = _normalized(spec, _affinity(spec, q, k), k.shape[-2])
    out = a @ v
    if spec.diffusion:
        u = v if self_value is None else self_value.to(dtype)
        out = out - a.sum(-1, keepdim=True) * u
    return out.to(query.dtype)
