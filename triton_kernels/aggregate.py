"""Fused forward and backward kernels of ``nonlocal_aggregate`` (docs/backends.md), one program per tile row.

Notation (all per batch element b; inputs contiguous (N, D), (M, D), (M, C), (N, C)):
    w̃_ij (or z_ij = log w̃_ij for gaussian) from :mod:`.tiles`;
    Â = A_i · w̃_ij · B_j with the row factor A_i and column factor B_j of the normalization
        none: A = 1 · count: A = 1/M · row: A = 1/r_i · sym: A = r_i^(−½), B = c_j^(−½)
        (gaussian: â = exp(z + la_i + lb_j) with la = log A, lb = log B), a zero sum giving 0;
    out_i = A_i [Σ_j w̃_ij B_j v_j − [diffusion] (Σ_j w̃_ij B_j) u_i].

Forward (:func:`forward_kernel`, grid (row blocks, C blocks, batch)): one pass over the key
blocks accumulates Σ_j w̃ B v, Σ_j w̃ B and the row sum r_i (online max m_i and l_i for gaussian, as
in FlashAttention), then writes out and the row statistic (r_i, or log r_i for gaussian). ``sym``
first runs the same kernel with ``WITH_VALUES=False`` on (key, query) swapped: the row sums of the
swapped problem are the column sums c_j (every kernel is symmetric in its two arguments).

Backward, with G = ∂L/∂out, S_i = G_i·out_i (= Σ_j dâ_ij â_ij) and gu_i = G_i·u_i
(:func:`backward_preprocess_kernel`):
    dâ_ij = G_i·v_j − gu_i,  dv_j = Σ_i â_ij G_i,  T_j = Σ_i dâ_ij â_ij,  du_i = −(Σ_j â_ij) G_i
    H_ij = ∂L/∂w̃_ij (times w̃_ij for gaussian):
        none/count: A_i dâ_ij · row: A_i (dâ_ij − S_i) · sym: A_i B_j dâ_ij − ½S_i A_i² − ½T_j B_j²
    C_ij = H_ij g1_ij (and C'_ij = H_ij g2_ij for the swapped pair of ``symmetric``)
    dot family:      dq_i = Σ_j C_ij k_j,                dk_j = Σ_i C_ij q_i
    distance family: dq_i = 2(q_i Σ_j C_ij − Σ_j C_ij k_j), dk_j = 2(k_j Σ_i C_ij − Σ_i C_ij q_i)
:func:`backward_column_kernel` (grid over key blocks) owns every column-indexed result: dv, T, dk and,
with ``symmetric``, the q_j part of C'; :func:`backward_row_kernel` (grid over query blocks) owns dq, du
and the k_i part of C'. Each program reduces over the other index in a fixed order and stores once: no
atomics, so the backward is deterministic. ``sym`` runs the column kernel twice: T first (every
H_ij needs the whole T_j), then dk. Every pass recomputes its tiles; nothing N×M is stored.

Every kernel takes the affinity as the ``tl.constexpr`` id ``KERNEL``; what follows from it (pair
variable q·k or ρ, coincident pairs, log domain) is read from the registry at compile time
(:func:`.tiles.is_distance`, :func:`.tiles.masks_coincident`, :func:`.tiles.log_domain`), not passed.

Wide D and C: the second grid axis enumerates output feature blocks (forward BLOCK_C; backward
OUT_D = OUT_C), and a program accumulates only its block of the outputs, recomputing the tile's GEMMs
over all of D and C in slices of BLOCK_D / BLOCK_C. The launcher picks the feature blocks of the call's
width class (:func:`.configs.configs_for`): one block (each tile computed once per pass) up to C = 512 in
the forward and D, C = 512 in the backward (but the float32 ``symmetric`` column pass at 512: four); more
blocks above. Epilogues that add a row-scaled input tile
to an accumulator (diffusion's u, the distance kernels' q_i and k_j, du's G) run after the accumulator is
stored (:func:`.tiles.scaled_rows_into`), so the two wide tiles are never live together. The backward's
accumulators are tuples of ``SLICE``-wide tiles (:func:`.tiles.zero_slices`), so that one slice of an operand
is loaded at a time, and from class 128 on its 16 × 16 pair tiles are batched products with one warp per
16-column chunk (``SPLIT_K``, :func:`.tiles.tile_dot`), so that no two warps compute the same tensor-core tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import (NORM_COUNT, NORM_ROW, NORM_SYM, is_distance, load_rows, log_domain, scaled_rows_into,
                    sliced_dot, store_rows, store_slices, tile_dot, value_dot, weight_tile, zero_slices)


@triton.jit
def _kernel_params(params_ptr):
    """``(scale, power, gamma, eps)``, stored by the launcher as one 4-vector."""
    return tl.load(params_ptr + 0), tl.load(params_ptr + 1), tl.load(params_ptr + 2), tl.load(params_ptr + 3)


@triton.jit
def _row_factor(row_sums, M, NORMALIZE: tl.constexpr, KERNEL: tl.constexpr):
    """A_i from r_i (log A_i from log r_i for log-domain kernels), a zero sum giving 0."""
    if log_domain(KERNEL):
        if NORMALIZE == NORM_COUNT:
            return -tl.log(tl.zeros_like(row_sums) + M)  # in the accumulator dtype (float64 too)
        elif NORMALIZE == NORM_ROW:
            return -row_sums
        elif NORMALIZE == NORM_SYM:
            return -0.5 * row_sums
        else:
            return tl.zeros_like(row_sums)
    else:
        if NORMALIZE == NORM_COUNT:
            return 1.0 / (tl.zeros_like(row_sums) + M)
        elif NORMALIZE == NORM_ROW:
            return tl.where(row_sums == 0, 0.0, 1.0 / tl.where(row_sums == 0, 1.0, row_sums))
        elif NORMALIZE == NORM_SYM:
            return tl.where(row_sums == 0, 0.0, 1.0 / tl.sqrt(tl.where(row_sums == 0, 1.0, row_sums)))
        else:
            return tl.zeros_like(row_sums) + 1.0


@triton.jit
def forward_kernel(
        q_ptr, k_ptr, v_ptr, u_ptr, q_sq_ptr, k_sq_ptr, col_factor_ptr, params_ptr, out_ptr, row_stats_ptr,
        N, M, D, C, n_bucket, m_bucket, d_bucket, c_bucket,
        KERNEL: tl.constexpr, SYMMETRIC: tl.constexpr, NORMALIZE: tl.constexpr, DIFFUSION: tl.constexpr,
        WITH_VALUES: tl.constexpr, LOW_PRECISION_VALUES: tl.constexpr,
        QK_PRECISION: tl.constexpr, VALUE_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
        EVEN_D: tl.constexpr, EVEN_C: tl.constexpr, DIRECT_D: tl.constexpr,
        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
        SPLIT_K: tl.constexpr):
    """out[I, c-block] and row_stats[I] (r_i, or log r_i for log-domain kernels)."""
    pid_i = tl.program_id(0)
    pid_c = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    q_ptr += batch * N * D
    k_ptr += batch * M * D
    v_ptr += batch * M * C
    u_ptr += batch * N * C
    out_ptr += batch * N * C
    q_sq_ptr += batch * N
    k_sq_ptr += batch * M
    col_factor_ptr += batch * M
    row_stats_ptr += batch * N
    scale, power, gamma, eps = _kernel_params(params_ptr)

    rows = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    row_mask = rows < N
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)

    acc = tl.zeros([BLOCK_I, BLOCK_C], dtype=ACC_DTYPE)   # Σ_j w̃ B v   (× e^(−m) for log domain)
    weighted_sums = tl.zeros([BLOCK_I], dtype=ACC_DTYPE)  # Σ_j w̃ B     (same scaling)
    row_sums = tl.zeros([BLOCK_I], dtype=ACC_DTYPE)       # r_i = Σ_j w̃ (same scaling)
    row_max = tl.full([BLOCK_I], float("-inf"), dtype=ACC_DTYPE)
    for j0 in tl.range(0, M, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_mask = cols < M
        z, _, _, _, _ = weight_tile(q_ptr, k_ptr, q_sq_ptr, k_sq_ptr, rows, cols, row_mask, col_mask, D,
                                    scale, power, gamma, eps, KERNEL, SYMMETRIC, EVEN_D, QK_PRECISION, ACC_DTYPE,
                                    BLOCK_I, BLOCK_J, BLOCK_D, DIRECT_D, SPLIT_K)
        if log_domain(KERNEL):
            z = tl.where(col_mask[None, :], z, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(z, 1))
            rescale = tl.exp(row_max - new_max)
            p = tl.exp(z - new_max[:, None])
            row_sums = row_sums * rescale + tl.sum(p, 1)
            if NORMALIZE == NORM_SYM and WITH_VALUES:  # (the column-sum pass has no column factor yet)
                log_b = tl.load(col_factor_ptr + cols, mask=col_mask, other=0.0)
                p = tl.exp(z - new_max[:, None] + log_b[None, :])
            weighted_sums = weighted_sums * rescale + tl.sum(p, 1)
            if WITH_VALUES:
                v = load_rows(v_ptr, cols, col_mask, offs_c, C, EVEN_C)
                acc = value_dot(p, v, acc * rescale[:, None], LOW_PRECISION_VALUES, VALUE_PRECISION)
            row_max = new_max
        else:
            w = tl.where(col_mask[None, :], z, 0.0)
            row_sums += tl.sum(w, 1)
            if NORMALIZE == NORM_SYM and WITH_VALUES:
                w = w * tl.load(col_factor_ptr + cols, mask=col_mask, other=0.0)[None, :]
            weighted_sums += tl.sum(w, 1)
            if WITH_VALUES:
                v = load_rows(v_ptr, cols, col_mask, offs_c, C, EVEN_C)
                acc = value_dot(w, v, acc, LOW_PRECISION_VALUES, VALUE_PRECISION)

    if log_domain(KERNEL):
        row_stat = row_max + tl.log(row_sums)  # log r_i
        factor = tl.exp(row_max + _row_factor(row_stat, M, NORMALIZE, KERNEL))
    else:
        row_stat = row_sums
        factor = _row_factor(row_stat, M, NORMALIZE, KERNEL)
    if pid_c == 0:
        tl.store(row_stats_ptr + rows, row_stat.to(row_stats_ptr.dtype.element_ty), mask=row_mask)
    if WITH_VALUES:
        store_rows(out_ptr, rows, row_mask, offs_c, C, acc * factor[:, None])
        if DIFFUSION:  # out_i −= A_i (Σ_j w̃ B) u_i, once the accumulator is stored
            scaled_rows_into(out_ptr, u_ptr, rows, row_mask, pid_c * BLOCK_C, C, -(weighted_sums * factor), True,
                             ACC_DTYPE, BLOCK_C)


@triton.jit
def backward_preprocess_kernel(g_ptr, out_ptr, u_ptr, s_ptr, gu_ptr, N, C, n_bucket, m_bucket, d_bucket, c_bucket,
                               DIFFUSION: tl.constexpr, ACC_DTYPE: tl.constexpr,
                               BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    """S_i = G_i·out_i and, for diffusion, gu_i = G_i·u_i (rows of G, out, u are C wide)."""
    pid_i = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    g_ptr += batch * N * C
    out_ptr += batch * N * C
    u_ptr += batch * N * C
    rows = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    row_mask = rows < N
    s = tl.zeros([BLOCK_I], dtype=ACC_DTYPE)
    gu = tl.zeros([BLOCK_I], dtype=ACC_DTYPE)
    for c0 in tl.range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        g = load_rows(g_ptr, rows, row_mask, offs_c, C, False).to(ACC_DTYPE)
        s += tl.sum(g * load_rows(out_ptr, rows, row_mask, offs_c, C, False).to(ACC_DTYPE), 1)
        if DIFFUSION:
            gu += tl.sum(g * load_rows(u_ptr, rows, row_mask, offs_c, C, False).to(ACC_DTYPE), 1)
    tl.store(s_ptr + batch * N + rows, s, mask=row_mask)
    if DIFFUSION:
        tl.store(gu_ptr + batch * N + rows, gu, mask=row_mask)


@triton.jit
def _backward_inputs(batch, N, M, D, C, q_ptr, k_ptr, v_ptr, g_ptr, q_sq_ptr, k_sq_ptr, row_factor_ptr, s_ptr, gu_ptr,
                     col_factor_ptr, t_ptr):
    """The inputs of both backward passes, moved to batch element ``batch`` (an int64)."""
    return (q_ptr + batch * N * D, k_ptr + batch * M * D, v_ptr + batch * M * C, g_ptr + batch * N * C,
            q_sq_ptr + batch * N, k_sq_ptr + batch * M, row_factor_ptr + batch * N, s_ptr + batch * N,
            gu_ptr + batch * N, col_factor_ptr + batch * M, t_ptr + batch * M)


@triton.jit
def _log_domain_h(z, d_a_hat, s_rows, t_cols, row_factor, col_factor, NORMALIZE: tl.constexpr):
    """∂L/∂w̃ times e^z for a weight term e^z of a log-domain tile (la, lb = log A, log B):
    none/count dâ e^(z+la+lb) · row (dâ − S_i) e^(z+la) · sym dâ e^(z+la+lb) − ½S_i e^(z+2la) − ½T_j e^(z+2lb);
    the exponents stay ≤ the normalizers', so nothing overflows."""
    la = row_factor[:, None]
    lb = col_factor[None, :]
    if NORMALIZE == NORM_SYM:
        return (d_a_hat * tl.exp(z + la + lb) - 0.5 * s_rows[:, None] * tl.exp(z + 2.0 * la)
                - 0.5 * t_cols[None, :] * tl.exp(z + 2.0 * lb))
    elif NORMALIZE == NORM_ROW:
        return (d_a_hat - s_rows[:, None]) * tl.exp(z + la + lb)
    else:
        return d_a_hat * tl.exp(z + la + lb)


@triton.jit
def _backward_tile(q_ptr, k_ptr, v_ptr, g_ptr, q_sq_ptr, k_sq_ptr, row_factor_ptr, col_factor_ptr,
                   s_ptr, gu_ptr, t_ptr, rows, cols, row_mask, col_mask, D, C, scale, power, gamma, eps,
                   KERNEL: tl.constexpr, SYMMETRIC: tl.constexpr, NORMALIZE: tl.constexpr,
                   DIFFUSION: tl.constexpr, WITH_H: tl.constexpr,
                   QK_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_C: tl.constexpr,
                   BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                   DIRECT_D: tl.constexpr, SPLIT_K: tl.constexpr):
    """Recompute one tile: ``(â, dâ, C = H·g1, C' = H·g2)``, all zero outside the valid rows and columns.

    ``WITH_H=False`` skips dâ and H (the first ``sym`` column pass, before T is known): dâ, C and C' are then 0.
    """
    z, g1, g2, dead1, dead2 = weight_tile(q_ptr, k_ptr, q_sq_ptr, k_sq_ptr, rows, cols, row_mask, col_mask, D,
                                          scale, power, gamma, eps, KERNEL, SYMMETRIC, EVEN_D, QK_PRECISION,
                                          ACC_DTYPE, BLOCK_I, BLOCK_J, BLOCK_D, DIRECT_D, SPLIT_K)
    valid = row_mask[:, None] & col_mask[None, :]
    row_factor = tl.load(row_factor_ptr + rows, mask=row_mask, other=0.0)
    col_factor = tl.load(col_factor_ptr + cols, mask=col_mask, other=0.0)
    if log_domain(KERNEL):
        a_hat = tl.where(valid, tl.exp(z + row_factor[:, None] + col_factor[None, :]), 0.0)
    else:
        a_hat = tl.where(valid, row_factor[:, None] * z * col_factor[None, :], 0.0)

    if WITH_H:
        d_a_hat = tile_dot(g_ptr, v_ptr, rows, cols, row_mask, col_mask, C,
                           tl.zeros([BLOCK_I, BLOCK_J], dtype=ACC_DTYPE), EVEN_C, QK_PRECISION, BLOCK_C, SPLIT_K)
        if DIFFUSION:
            d_a_hat -= tl.load(gu_ptr + rows, mask=row_mask, other=0.0)[:, None]

        s_rows = tl.load(s_ptr + rows, mask=row_mask, other=0.0)
        t_cols = tl.load(t_ptr + cols, mask=col_mask, other=0.0) if NORMALIZE == NORM_SYM else s_rows
        if log_domain(KERNEL):
            if SYMMETRIC:  # each term's gradient from its own exponent g = z_t − log 2 (weight_tile)
                c1 = scale * _log_domain_h(g1, d_a_hat, s_rows, t_cols, row_factor, col_factor, NORMALIZE)
                c2 = scale * _log_domain_h(g2, d_a_hat, s_rows, t_cols, row_factor, col_factor, NORMALIZE)
            else:
                c1 = scale * _log_domain_h(z, d_a_hat, s_rows, t_cols, row_factor, col_factor, NORMALIZE)
                c2 = tl.zeros_like(c1)
        else:
            if NORMALIZE == NORM_SYM:
                h = (d_a_hat * (row_factor[:, None] * col_factor[None, :])
                     - 0.5 * s_rows[:, None] * (row_factor * row_factor)[:, None]
                     - 0.5 * t_cols[None, :] * (col_factor * col_factor)[None, :])
            elif NORMALIZE == NORM_ROW:
                h = (d_a_hat - s_rows[:, None]) * row_factor[:, None]
            else:
                h = d_a_hat * row_factor[:, None]
            c1 = h * g1
            c2 = h * g2
        # outside the tile: 0; dead pairs: exactly 0, as in the dense formula, even for a NaN H
        c1 = tl.where(dead1 | ~valid, 0.0, c1)
        c2 = tl.where(dead2 | ~valid, 0.0, c2)
    else:
        d_a_hat = tl.zeros_like(a_hat)
        c1 = tl.zeros_like(a_hat)
        c2 = tl.zeros_like(a_hat)
    return a_hat, d_a_hat, c1, c2


@triton.jit
def backward_column_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, q_sq_ptr, k_sq_ptr, row_factor_ptr, col_factor_ptr, s_ptr, gu_ptr, t_ptr,
        params_ptr, dv_ptr, dk_ptr, dq_swap_ptr,
        N, M, D, C, n_bucket, m_bucket, d_bucket, c_bucket,
        KERNEL: tl.constexpr, SYMMETRIC: tl.constexpr, NORMALIZE: tl.constexpr, DIFFUSION: tl.constexpr,
        WITH_DV_T: tl.constexpr, WITH_DK: tl.constexpr, LOW_PRECISION_VALUES: tl.constexpr,
        QK_PRECISION: tl.constexpr, VALUE_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
        EVEN_D: tl.constexpr, EVEN_C: tl.constexpr, DIRECT_D: tl.constexpr,
        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
        OUT_D: tl.constexpr, OUT_C: tl.constexpr, SLICE: tl.constexpr, SPLIT_K: tl.constexpr):
    """Column pass over key block J and feature block f: dv[J, f] and, for ``sym`` + diffusion,
    Σ_i â_ij gu_i into t (``WITH_DV_T``); dk[J, f] and, with ``symmetric``, the swapped pair's dq[J, f]
    (``WITH_DK``). The launcher completes T_j = v_j·dv_j − Σ_i â_ij gu_i (= Σ_i dâ_ij â_ij) between the
    two ``sym`` passes, so the first needs no dâ = G vᵀ product."""
    pid_j = tl.program_id(0)
    pid_f = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    q_ptr, k_ptr, v_ptr, g_ptr, q_sq_ptr, k_sq_ptr, row_factor_ptr, s_ptr, gu_ptr, col_factor_ptr, t_ptr = \
        _backward_inputs(batch, N, M, D, C, q_ptr, k_ptr, v_ptr, g_ptr, q_sq_ptr, k_sq_ptr, row_factor_ptr, s_ptr,
                         gu_ptr, col_factor_ptr, t_ptr)
    dv_ptr += batch * M * C
    dk_ptr += batch * M * D
    dq_swap_ptr += batch * M * D
    scale, power, gamma, eps = _kernel_params(params_ptr)

    cols = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    col_mask = cols < M
    c0 = pid_f * OUT_C
    d0 = pid_f * OUT_D

    # The accumulators as tuples of SLICE-wide tiles (tiles.zero_slices): one slice of G, q, k live at a time.
    dv = zero_slices(BLOCK_J, OUT_C, SLICE, ACC_DTYPE)
    t_cols = tl.zeros([BLOCK_J], dtype=ACC_DTYPE)
    dk = zero_slices(BLOCK_J, OUT_D, SLICE, ACC_DTYPE)        # Σ_i C_ij q_i
    c_cols = tl.zeros([BLOCK_J], dtype=ACC_DTYPE)        # Σ_i C_ij
    dq_swap = zero_slices(BLOCK_J, OUT_D, SLICE, ACC_DTYPE)   # Σ_i C'_ij k_i
    c_swap_cols = tl.zeros([BLOCK_J], dtype=ACC_DTYPE)   # Σ_i C'_ij
    for i0 in tl.range(0, N, BLOCK_I):
        rows = i0 + tl.arange(0, BLOCK_I)
        row_mask = rows < N
        a_hat, d_a_hat, c1, c2 = _backward_tile(
            q_ptr, k_ptr, v_ptr, g_ptr, q_sq_ptr, k_sq_ptr, row_factor_ptr, col_factor_ptr, s_ptr, gu_ptr, t_ptr,
            rows, cols, row_mask, col_mask, D, C, scale, power, gamma, eps,
            KERNEL, SYMMETRIC, NORMALIZE, DIFFUSION, WITH_DK,
            QK_PRECISION, ACC_DTYPE, EVEN_D, EVEN_C, BLOCK_I, BLOCK_J, BLOCK_D, BLOCK_C, DIRECT_D, SPLIT_K)
        if WITH_DV_T:
            dv = sliced_dot(tl.trans(a_hat), g_ptr, rows, row_mask, c0, C, dv, LOW_PRECISION_VALUES, VALUE_PRECISION,
                            SLICE)
            if NORMALIZE == NORM_SYM and DIFFUSION:  # Σ_i â_ij gu_i, the diffusion part of T_j (launcher)
                t_cols += tl.sum(a_hat * tl.load(gu_ptr + rows, mask=row_mask, other=0.0)[:, None], 0)
        if WITH_DK:
            dk = sliced_dot(tl.trans(c1), q_ptr, rows, row_mask, d0, D, dk, LOW_PRECISION_VALUES, VALUE_PRECISION,
                            SLICE)
            c_cols += tl.sum(c1, 0)
            if SYMMETRIC:
                dq_swap = sliced_dot(tl.trans(c2), k_ptr, rows, row_mask, d0, D, dq_swap, LOW_PRECISION_VALUES,
                                     VALUE_PRECISION, SLICE)
                c_swap_cols += tl.sum(c2, 0)

    if WITH_DV_T:
        store_slices(dv_ptr, cols, col_mask, c0, C, dv, 1.0, SLICE)
        if NORMALIZE == NORM_SYM and DIFFUSION:
            if pid_f == 0:
                tl.store(t_ptr + cols, t_cols.to(t_ptr.dtype.element_ty), mask=col_mask)
    if WITH_DK:
        if is_distance(KERNEL):  # dk_j = 2(k_j Σ_i C_ij − Σ_i C_ij q_i): the second sum stored first
            store_slices(dk_ptr, cols, col_mask, d0, D, dk, -2.0, SLICE)
            scaled_rows_into(dk_ptr, k_ptr, cols, col_mask, d0, D, 2.0 * c_cols, True, ACC_DTYPE, OUT_D)
        else:
            store_slices(dk_ptr, cols, col_mask, d0, D, dk, 1.0, SLICE)
        if SYMMETRIC:
            if is_distance(KERNEL):
                store_slices(dq_swap_ptr, cols, col_mask, d0, D, dq_swap, -2.0, SLICE)
                scaled_rows_into(dq_swap_ptr, q_ptr, cols, col_mask, d0, D, 2.0 * c_swap_cols, True, ACC_DTYPE, OUT_D)
            else:
                store_slices(dq_swap_ptr, cols, col_mask, d0, D, dq_swap, 1.0, SLICE)


@triton.jit
def backward_row_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, q_sq_ptr, k_sq_ptr, row_factor_ptr, col_factor_ptr, s_ptr, gu_ptr, t_ptr,
        params_ptr, dq_ptr, dk_swap_ptr, du_ptr,
        N, M, D, C, n_bucket, m_bucket, d_bucket, c_bucket,
        KERNEL: tl.constexpr, SYMMETRIC: tl.constexpr, NORMALIZE: tl.constexpr, DIFFUSION: tl.constexpr,
        LOW_PRECISION_VALUES: tl.constexpr,
        QK_PRECISION: tl.constexpr, VALUE_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
        EVEN_D: tl.constexpr, EVEN_C: tl.constexpr, DIRECT_D: tl.constexpr,
        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
        OUT_D: tl.constexpr, OUT_C: tl.constexpr, SLICE: tl.constexpr, SPLIT_K: tl.constexpr):
    """Row pass over query block I and feature block f: dq[I, f], du[I, f] (diffusion) and, with
    ``symmetric``, the swapped pair's dk[I, f]."""
    pid_i = tl.program_id(0)
    pid_f = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    q_ptr, k_ptr, v_ptr, g_ptr, q_sq_ptr, k_sq_ptr, row_factor_ptr, s_ptr, gu_ptr, col_factor_ptr, t_ptr = \
        _backward_inputs(batch, N, M, D, C, q_ptr, k_ptr, v_ptr, g_ptr, q_sq_ptr, k_sq_ptr, row_factor_ptr, s_ptr,
                         gu_ptr, col_factor_ptr, t_ptr)
    dq_ptr += batch * N * D
    dk_swap_ptr += batch * N * D
    du_ptr += batch * N * C
    scale, power, gamma, eps = _kernel_params(params_ptr)

    rows = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    row_mask = rows < N
    d0 = pid_f * OUT_D

    dq = zero_slices(BLOCK_I, OUT_D, SLICE, ACC_DTYPE)       # Σ_j C_ij k_j (as in the column pass)
    c_rows = tl.zeros([BLOCK_I], dtype=ACC_DTYPE)              # Σ_j C_ij
    dk_swap = zero_slices(BLOCK_I, OUT_D, SLICE, ACC_DTYPE)  # Σ_j C'_ij q_j
    c_swap_rows = tl.zeros([BLOCK_I], dtype=ACC_DTYPE)       # Σ_j C'_ij
    a_hat_rows = tl.zeros([BLOCK_I], dtype=ACC_DTYPE)        # Σ_j â_ij
    for j0 in tl.range(0, M, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_mask = cols < M
        a_hat, d_a_hat, c1, c2 = _backward_tile(
            q_ptr, k_ptr, v_ptr, g_ptr, q_sq_ptr, k_sq_ptr, row_factor_ptr, col_factor_ptr, s_ptr, gu_ptr, t_ptr,
            rows, cols, row_mask, col_mask, D, C, scale, power, gamma, eps,
            KERNEL, SYMMETRIC, NORMALIZE, DIFFUSION, True,
            QK_PRECISION, ACC_DTYPE, EVEN_D, EVEN_C, BLOCK_I, BLOCK_J, BLOCK_D, BLOCK_C, DIRECT_D, SPLIT_K)
        dq = sliced_dot(c1, k_ptr, cols, col_mask, d0, D, dq, LOW_PRECISION_VALUES, VALUE_PRECISION, SLICE)
        c_rows += tl.sum(c1, 1)
        if SYMMETRIC:
            dk_swap = sliced_dot(c2, q_ptr, cols, col_mask, d0, D, dk_swap, LOW_PRECISION_VALUES, VALUE_PRECISION,
                                 SLICE)
            c_swap_rows += tl.sum(c2, 1)
        if DIFFUSION:
            a_hat_rows += tl.sum(a_hat, 1)

    if is_distance(KERNEL):  # dq_i = 2(q_i Σ_j C_ij − Σ_j C_ij k_j): the second sum stored first
        store_slices(dq_ptr, rows, row_mask, d0, D, dq, -2.0, SLICE)
        scaled_rows_into(dq_ptr, q_ptr, rows, row_mask, d0, D, 2.0 * c_rows, True, ACC_DTYPE, OUT_D)
    else:
        store_slices(dq_ptr, rows, row_mask, d0, D, dq, 1.0, SLICE)
    if SYMMETRIC:
        if is_distance(KERNEL):
            store_slices(dk_swap_ptr, rows, row_mask, d0, D, dk_swap, -2.0, SLICE)
            scaled_rows_into(dk_swap_ptr, k_ptr, rows, row_mask, d0, D, 2.0 * c_swap_rows, True, ACC_DTYPE, OUT_D)
        else:
            store_slices(dk_swap_ptr, rows, row_mask, d0, D, dk_swap, 1.0, SLICE)
    if DIFFUSION:  # du_i = −(Σ_j â_ij) G_i
        scaled_rows_into(du_ptr, g_ptr, rows, row_mask, pid_f * OUT_C, C, -a_hat_rows, False, ACC_DTYPE, OUT_C)
