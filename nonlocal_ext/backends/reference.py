"""``backend="reference"``: the dense PyTorch computation, the ground truth of every test.

It materializes the whole ``(B, N, M)`` affinity matrix and lets autograd differentiate it,
so it shares no backward code with the fused backends. It computes in the inputs' dtype,
except float16/bfloat16, whose weights, normalizations and sums it forms in float32 like every
other backend (so that the coincident-pair threshold ``eps`` means the same everywhere). For the
dot-family kernels (``dot``, ``gaussian``) on CPUs that multiply half natively
(:func:`half_products`), the two products q kᵀ and Â v (and their gradients) run in the half dtype
with float32 accumulation inside the GEMM, as ``softmax(q @ k.T) @ v`` does in that dtype: q kᵀ
is rounded to half once and Â once before Â v (FlashAttention's treatment of P; under ``row``, Â is
the half-precision softmax, whose max and sum are float32). Distance kernels
keep float32 products: ρ = ‖q‖² + ‖k‖² − 2q·k would cancel in half.

For the dot-family kernels it takes over the op's NaN/Inf screen where that is cheaper
(:func:`screens_products`): one sum over q kᵀ instead of over q and k.
"""

from __future__ import annotations

import math

import torch

from ..kernels import certainly_finite, in_log_domain, pair_variable, prepared_points, values_readable
from ..numerics import compute_dtype, safe_inverse_power

NAME = "reference"


def unsupported_reason(spec, query) -> str | None:
    return None


def screens_products(spec, query, key) -> bool:
    """Whether the op leaves its NaN/Inf screen of the query and key rows (:func:`prepared_points`) to this
    backend: for dot-family kernels on CPU tensors whose values can be read, where q kᵀ has fewer entries
    than q and k together (N·M < (N + M)·D: pooled keys, wide features). A NaN or ±Inf coordinate of a
    row makes every product of that row NaN or ±Inf (NaN·x is NaN, ±Inf·x is ±Inf or NaN, and M, N ≥ 1),
    so q kᵀ is all finite exactly when the rows are, or else it overflowed; either way
    :func:`_dot_products` then prepares the rows as the op would and multiplies again."""
    n, m, d = query.shape[-2], key.shape[-2], query.shape[-1]
    return (spec.kernel.family == "dot" and query.device.type == "cpu" and n > 0 and m > 0
            and n * m < (n + m) * d and values_readable(query) and values_readable(key))


def _dot_products(spec, query, key):
    """q kᵀ of a dot-family kernel, with the op's NaN/Inf rule applied here when it left it to this backend."""
    scores = query @ key.transpose(-1, -2)
    if screens_products(spec, query, key) and not certainly_finite(scores):
        query, key = prepared_points(spec.kernel, query, key)
        scores = query @ key.transpose(-1, -2)
    return scores


def _affinity(spec, query, key):
    """W (or log W for log-domain kernels under row/sym, see ``in_log_domain``), symmetrized if asked."""
    x, coincident = pair_variable(spec.kernel, query, key, eps=spec.params.eps)
    return _weights(spec, x, coincident)


def _weights(spec, x, coincident=None):
    """W (or log W) of the pair variables x, symmetrized if asked."""
    kernel, p = spec.kernel, spec.params
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


def half_class(spec, query) -> str | None:
    """Which half instructions the products of :func:`half_products` run on, for the cost model: "amx" (AMX
    tiles) or "avx512" (AVX512-BF16 / AVX512-FP16 dot instructions); None where the products are float32."""
    if not half_products(spec, query):
        return None
    return "amx" if torch.cpu._is_amx_tile_supported() else "avx512"


def half_products(spec, query) -> bool:
    """Whether q kᵀ and Â v run in the inputs' half dtype: dot-family kernels, half CPU tensors on a
    CPU with native half products (AVX512-BF16/AMX for bfloat16, AMX-FP16 for float16), the same test
    as the C++ kernels' half tile GEMMs. Elsewhere (CUDA included) the products are float32."""
    if spec.kernel.family != "dot" or query.device.type != "cpu":
        return False
    if query.dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return query.dtype == torch.float16 and torch.cpu._is_amx_fp16_supported()


def aggregate(query, key, value, self_value, spec):
    """out = Â v, or Â v − rowsum(Â) ⊙ u for diffusion; inputs are (B, N, D), (B, M, D), (B, M, C)."""
    dtype = compute_dtype(query.dtype)
    if half_products(spec, query):  # the products in half, the rest in float32
        scores = _dot_products(spec, query, key)
        if spec.normalize == "row" and in_log_domain(spec.kernel, "row") and not spec.symmetric:
            # softmax of a half tensor keeps its max and sum in float32 and stores Â in half
            a = torch.softmax(spec.kernel.log_weight(scores, spec.params), dim=-1)
        else:
            a = _normalized(spec, _weights(spec, scores.to(dtype)), key.shape[-2])
        out = a.to(query.dtype) @ value
        if spec.diffusion:
            u = value if self_value is None else self_value
            out = (out.to(dtype) - a.sum(-1, keepdim=True, dtype=dtype) * u.to(dtype)).to(query.dtype)
        return out
    q, k, v = (t if t.dtype == dtype else t.to(dtype) for t in (query, key, value))
    z = _weights(spec, _dot_products(spec, q, k)) if spec.kernel.family == "dot" else _affinity(spec, q, k)
    a = _normalized(spec, z, k.shape[-2])
    out = a @ v
    if spec.diffusion:
        u = v if self_value is None else self_value.to(dtype)
        out = out - a.sum(-1, keepdim=True) * u
    return out if out.dtype == query.dtype else out.to(query.dtype)
