"""``backend="chunked"``: pure PyTorch on any device, memory O(rows·M) instead of O(N·M).

The rows of W are processed in blocks of ``rows`` queries against all M keys; no more than
one ``(B, rows, M)`` block of W (and a few temporaries of that size) exists at a time.

Forward, per block I of rows (the definitions of docs/semantics.md):
    Z_I   = f(q_I, k) (or log f for log-domain kernels), symmetrized as ½[f(q_i,k_j) + f(k_i,q_j)]
    r_I   = Σ_j w_Ij                       (log-sum-exp for log-domain kernels)
    Â_I   = w_Ij · r_i^(−a) · c_j^(−b)     (a, b) = none (0,0), row (1,0), sym (½,½); count: W/M
    out_I = Â_I v − [diffusion] rowsum(Â_I) ⊙ u_I
A block holds whole rows, so r comes from the block itself, in forward and backward alike.
``sym`` needs the column sums c first: one extra pass over the row blocks accumulates them,
and they are all the forward saves besides the inputs (O(M)).

Backward recomputes each block. With G = ∂L/∂out:
    dâ_ij = G_i·v_j − [diffusion] G_i·u_i,     dv = ÂᵀG,     du = −rowsum(Â) ⊙ G
    ∂L/∂w_ij = none: dâ · count: dâ/M · row: (dâ_ij − S_i)/r_i
               · sym: dâ_ij/√(r_i c_j) − ½ S_i/r_i − ½ T_j/c_j
with S_i = Σ_j dâ_ij â_ij (= G_i·out_i; a block holds whole rows, so it is summed directly)
and T_j = Σ_i dâ_ij â_ij (``sym`` takes one pass for T, then one for the rest). The kernel's
derivative turns ∂L/∂w into ∂L/∂x, which :func:`~nonlocal_ext.kernels.pair_gradients` sends to
q and k.
Log-domain kernels (gaussian) under ``row``/``sym`` carry w·∂L/∂w instead, built from Â-like blocks
exp(z − a·log r − b·log c) that cannot overflow, and multiply by d log f/dx.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from ..kernels import in_log_domain, pair_gradients, pair_variable
from ..numerics import compute_dtype, safe_inverse_power

NAME = "chunked"

#: Elements of W held per block (B · rows · M); a few temporaries of this size exist at once.
BLOCK_ELEMENTS = 1 << 20

# Â = w · r^(−a) · c^(−b): the exponents (a, b) of the row and column sums per normalization.
_EXPONENTS = {"none": (0.0, 0.0), "count": (0.0, 0.0), "row": (1.0, 0.0), "sym": (0.5, 0.5)}


def unsupported_reason(spec, query) -> str | None:
    return None


def rows_per_block(batch: int, m: int, block_elements: int = BLOCK_ELEMENTS) -> int:
    return max(1, block_elements // max(1, batch * m))


class _Inputs:
    """The inputs in the compute dtype, with the squared norms distance kernels reuse per block."""

    def __init__(self, spec, query, key, value, self_value):
        dtype = compute_dtype(query.dtype)
        self.q, self.k, self.v = (t.to(dtype) for t in (query, key, value))
        self.u = None if self_value is None else self_value.to(dtype)
        if spec.diffusion and self.u is None:
            self.u = self.v
        distance = spec.kernel.family == "distance"
        self.q_sqnorm = self.q.square().sum(-1) if distance else None
        self.k_sqnorm = self.k.square().sum(-1) if distance else None

    def rows(self, t, rows):
        return None if t is None else t[:, rows]


def _block(spec, t: _Inputs, rows: slice, with_derivative: bool):
    """Z = W (or log W) for query rows I against all keys, and the derivative factors.

    Returns ``(z, slope_direct, slope_swap)``: ``slope_direct = ∂w̃/∂x_ij`` for the pair (q_i, k_j) and,
    with ``symmetric``, ``slope_swap = ∂w̃/∂x'_ij`` for the swapped pair (k_i, q_j). For log-domain
    kernels they are ``∂ log w̃/∂x`` instead. For kernels that mask coincident pairs, a slope is a
    pair ``(slope, coincident)``: a coincident pair contributes no gradient even where ∂L/∂w is
    NaN, so the mask is applied after the product (see :func:`_times_slope`).
    """
    kernel, p = spec.kernel, spec.params
    x, coincident = pair_variable(kernel, t.q[:, rows], t.k, t.rows(t.q_sqnorm, rows), t.k_sqnorm, p.eps)
    terms = [(x, coincident)]
    if spec.symmetric:
        terms.append(pair_variable(kernel, t.k[:, rows], t.q, t.rows(t.k_sqnorm, rows), t.q_sqnorm, p.eps))

    if in_log_domain(kernel, spec.normalize):
        logs = [kernel.log_weight(xi, p) for xi, _ in terms]
        slope = kernel.log_derivative(p)
        if not spec.symmetric:
            return logs[0], slope, None
        z = torch.logaddexp(logs[0], logs[1]) - math.log(2.0)
        if not with_derivative:
            return z, None, None
        # log w̃ = log ½(e^L + e^L'): ∂/∂L = sigmoid(L − L').
        return z, slope * torch.sigmoid(logs[0] - logs[1]), slope * torch.sigmoid(logs[1] - logs[0])

    weights, slopes = [], []
    for xi, ci in terms:
        w = kernel.weight(xi, p)
        d = kernel.derivative(xi, w, p) if with_derivative else None
        if ci is not None:
            w = w.masked_fill(ci, 0.0)
        weights.append(w)
        slopes.append(d if ci is None or d is None else (d, ci))
    if not spec.symmetric:
        return weights[0], slopes[0], None
    z = 0.5 * (weights[0] + weights[1])
    if not with_derivative:
        return z, None, None
    return z, _halved(slopes[0]), _halved(slopes[1])


def _halved(slope):
    return (0.5 * slope[0], slope[1]) if isinstance(slope, tuple) else 0.5 * slope


def _times_slope(slope, h):
    """∂L/∂x = slope ⊙ h, zero on coincident pairs (whatever h is there)."""
    if isinstance(slope, tuple):
        slope, coincident = slope
        return (slope * h).masked_fill(coincident, 0.0)
    return slope * h


def _sums(log_domain, z, dim):
    """Row (dim=-1) or column (dim=-2) sums of a block: Σ w, or log Σ exp(z) for log-domain kernels."""
    return torch.logsumexp(z, dim=dim) if log_domain else z.sum(dim)


class _BlockNormalizer:
    """Â and the ∂L/∂w factors of one block of whole rows.

    Holds r_i^(−a) and c_j^(−b) factors (as −a·log r_i, −b·log c_j for log-domain kernels). A
    block holds whole rows, so its row sums come from the block itself; the column sums, which
    ``sym`` needs, come from a pass over all rows (:func:`column_sums`).
    """

    def __init__(self, spec, z, col_sums):
        self.log_domain = in_log_domain(spec.kernel, spec.normalize)
        self.z = z
        self.row_sums = _sums(self.log_domain, z, -1) if spec.normalize in ("row", "sym") else None
        self.col_sums = col_sums

    def _factors(self, a, b):
        """(r_i^(−a) as a column, c_j^(−b) as a row), None where the exponent is 0."""
        if self.log_domain:
            row = -a * self.row_sums[..., None] if a else None
            col = -b * self.col_sums[:, None, :] if b else None
        else:
            row = safe_inverse_power(self.row_sums, a)[..., None] if a else None
            col = safe_inverse_power(self.col_sums, b)[:, None, :] if b else None
        return row, col

    def weights(self, a, b):
        """w̃_ij · r_i^(−a) · c_j^(−b)."""
        row, col = self._factors(a, b)
        if self.log_domain:
            if a == 1 and b == 0:
                return torch.softmax(self.z, dim=-1)
            z = self.z
            for e in (row, col):
                z = z if e is None else z + e
            return torch.exp(z)
        z = self.z
        for e in (row, col):
            z = z if e is None else z * e
        return z

    def factor(self, a, b):
        """r_i^(−a)·c_j^(−b) (times w̃ for log-domain kernels): turns ∂L/∂â-like blocks into ∂L/∂w."""
        if self.log_domain:
            return self.weights(a, b)
        row, col = self._factors(a, b)
        if row is None or col is None:
            return 1.0 if row is None and col is None else (row if col is None else col)
        return row * col


def column_sums(spec, t: _Inputs, blocks):
    """c_j = Σ_i w̃_ij (log c_j for log-domain kernels) for ``sym``, accumulated over the row blocks."""
    if spec.normalize != "sym":
        return None
    log_domain = in_log_domain(spec.kernel, spec.normalize)
    sums = t.q.new_full((t.q.shape[0], t.k.shape[1]), -math.inf if log_domain else 0.0)
    for rows in blocks:
        z, _, _ = _block(spec, t, rows, with_derivative=False)
        part = _sums(log_domain, z, -2)
        sums = torch.logaddexp(sums, part) if log_domain else sums + part
    return sums


def _a_hat_of(spec, norm: _BlockNormalizer, m):
    """Â for the block."""
    a_hat = norm.weights(*_EXPONENTS[spec.normalize])
    return a_hat / m if spec.normalize == "count" else a_hat


def _a_hat_block(spec, t: _Inputs, rows, col_sums, with_derivative=False):
    """Recompute one block: ``(Â_I, its normalizer, slope_direct, slope_swap)``."""
    z, slope_direct, slope_swap = _block(spec, t, rows, with_derivative)
    norm = _BlockNormalizer(spec, z, col_sums)
    return _a_hat_of(spec, norm, t.k.shape[1]), norm, slope_direct, slope_swap


def _row_blocks(t: _Inputs, block_elements):
    b, n, m = t.q.shape[0], t.q.shape[1], t.k.shape[1]
    step = rows_per_block(b, m, block_elements)
    return [slice(start, start + step) for start in range(0, n, step)]


def forward(query, key, value, self_value, spec, block_elements=BLOCK_ELEMENTS):
    """Returns ``(out, col_sums)``; ``col_sums`` (what ``sym`` saves for the backward) is None otherwise."""
    t = _Inputs(spec, query, key, value, self_value)
    blocks = _row_blocks(t, block_elements)
    col_sums = column_sums(spec, t, blocks)
    out = torch.full(t.q.shape[:2] + t.v.shape[-1:], math.nan, dtype=t.v.dtype, device=t.v.device)
    for rows in blocks:
        a_hat, _, _, _ = _a_hat_block(spec, t, rows, col_sums)
        out_rows = a_hat @ t.v
        if spec.diffusion:
            out_rows -= a_hat.sum(-1, keepdim=True) * t.u[:, rows]
        out[:, rows] = out_rows
    return out.to(query.dtype), col_sums


def _d_a_hat(g_rows, v, g_dot_u_rows):
    """∂L/∂â for a block of rows: G_i·v_j − [diffusion] G_i·u_i."""
    d_a_hat = g_rows @ v.transpose(-1, -2)
    return d_a_hat if g_dot_u_rows is None else d_a_hat - g_dot_u_rows[..., None]


def backward(grad_out, query, key, value, self_value, col_sums, spec, block_elements=BLOCK_ELEMENTS):
    """Returns ``(grad_query, grad_key, grad_value, grad_self_value)``, recomputing W per block."""
    t = _Inputs(spec, query, key, value, self_value)
    g = grad_out.to(t.v.dtype)
    m = t.k.shape[1]
    g_dot_u = (g * t.u).sum(-1) if spec.diffusion else None
    blocks = _row_blocks(t, block_elements)

    t_cols = None  # T_j = Σ_i dâ_ij â_ij, needed by every row of ``sym`` before any ∂L/∂w
    if spec.normalize == "sym":
        t_cols = t.q.new_zeros(t.q.shape[0], m)
        for rows in blocks:
            a_hat, _, _, _ = _a_hat_block(spec, t, rows, col_sums)
            t_cols += (a_hat * _d_a_hat(g[:, rows], t.v, t.rows(g_dot_u, rows))).sum(-2)

    grad_q, grad_k, grad_v = torch.zeros_like(t.q), torch.zeros_like(t.k), torch.zeros_like(t.v)
    grad_u = torch.zeros_like(t.u) if spec.diffusion else None
    for rows in blocks:
        a_hat, norm, slope_direct, slope_swap = _a_hat_block(spec, t, rows, col_sums, with_derivative=True)
        g_rows = g[:, rows]
        grad_v += a_hat.transpose(-1, -2) @ g_rows
        if spec.diffusion:
            grad_u[:, rows] = -a_hat.sum(-1, keepdim=True) * g_rows
        d_a_hat = _d_a_hat(g_rows, t.v, t.rows(g_dot_u, rows))

        # h = ∂L/∂w (w·∂L/∂w for log-domain kernels), with S_i = Σ_j dâ_ij â_ij taken from the
        # block itself: it equals G_i·out_i, but summing the block cancels more accurately.
        if spec.normalize == "row":
            s_rows = (a_hat * d_a_hat).sum(-1, keepdim=True)
            h = (d_a_hat - s_rows) * (a_hat if norm.log_domain else norm.factor(1.0, 0.0))
        elif spec.normalize == "sym":
            s_rows = (a_hat * d_a_hat).sum(-1, keepdim=True)
            h = (d_a_hat * norm.factor(0.5, 0.5)
                 - 0.5 * s_rows * norm.factor(1.0, 0.0)
                 - 0.5 * t_cols[:, None, :] * norm.factor(0.0, 1.0))
        else:
            h = d_a_hat * norm.factor(0.0, 0.0)
            if spec.normalize == "count":
                h = h / m

        dq_rows, dk = pair_gradients(spec.kernel, _times_slope(slope_direct, h), t.q[:, rows], t.k)
        grad_q[:, rows] += dq_rows
        grad_k += dk
        if spec.symmetric:
            dk_rows, dq = pair_gradients(spec.kernel, _times_slope(slope_swap, h), t.k[:, rows], t.q)
            grad_k[:, rows] += dk_rows
            grad_q += dq

    if spec.diffusion and self_value is None:  # u is v
        grad_v += grad_u
        grad_u = None
    return tuple(None if x is None else x.to(query.dtype) for x in (grad_q, grad_k, grad_v, grad_u))


class ChunkedAggregate(torch.autograd.Function):
    """Thin autograd wrapper: saves the inputs (and the column sums of ``sym``); backward recomputes W."""

    @staticmethod
    def forward(ctx, query, key, value, self_value, spec, block_elements):
        out, col_sums = forward(query, key, value, self_value, spec, block_elements)
        ctx.save_for_backward(query, key, value, self_value, col_sums)
        ctx.spec, ctx.block_elements = spec, block_elements
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grads = backward(grad_out, *ctx.saved_tensors, ctx.spec, ctx.block_elements)
        return (*grads, None, None)


def aggregate(query, key, value, self_value, spec, block_elements=None):
    """``block_elements`` defaults to the module's ``BLOCK_ELEMENTS``, read at call time.

    When even one row per batch element exceeds the budget (B·M > block_elements), the batch is
    split into groups that each fit, so a block never grows with B.
    """
    block_elements = BLOCK_ELEMENTS if block_elements is None else block_elements
    b, m = key.shape[0], key.shape[1]
    group = max(1, block_elements // max(1, m))
    if b <= group:
        return ChunkedAggregate.apply(query, key, value, self_value, spec, block_elements)
    outs = [ChunkedAggregate.apply(query[i:i + group], key[i:i + group], value[i:i + group],
                                   None if self_value is None else self_value[i:i + group], spec, block_elements)
            for i in range(0, b, group)]
    return torch.cat(outs)
