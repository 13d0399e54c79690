"""Small pieces shared by the backends (the numerics they share are in :mod:`nonlocal_ext.numerics`)."""

from __future__ import annotations

from ..numerics import compute_dtype


# --- pieces of the fused backends' custom ops (cpu, triton): same schema up to the scalars -------


def forward_fake(query, key, value, self_value, kernel, scale, power, gamma, eps, normalize, update, symmetric):
    """Fake (meta) kernel of ``aggregate_forward``: ``out (B, N, C)`` in the inputs' dtype, ``row_stats
    (B, N)`` and ``col_stats (B, M)`` for ``sym`` (else ``(B, 0)``) in the compute dtype."""
    batch, n, m, c = query.shape[0], query.shape[1], key.shape[1], value.shape[2]
    stats = compute_dtype(query.dtype)
    return (query.new_empty((batch, n, c)), query.new_empty((batch, n), dtype=stats),
            query.new_empty((batch, m if normalize == "sym" else 0), dtype=stats))


def save_for_backward(ctx, inputs, output):
    """``setup_context`` of ``aggregate_forward``'s autograd: the backward recomputes the tiles from the
    inputs, the output and the O(N + M) statistics, which are not differentiable outputs."""
    query, key, value, self_value, *scalars = inputs
    out, row_stats, col_stats = output
    ctx.save_for_backward(query, key, value, self_value, out, row_stats, col_stats)
    ctx.scalars = scalars
    ctx.mark_non_differentiable(row_stats, col_stats)
