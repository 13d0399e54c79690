"""Per-tile maths shared by the forward and backward kernels (``@triton.jit`` helpers).

A tile is a block I of query rows against a block J of key columns. For it the kernels need

* the pair variable ``x_ij`` (:func:`pair_tile`): ``q_i·k_j`` for the dot family, or
  ``ρ_ij = ‖q_i‖² + ‖k_j‖² − 2 q_i·k_j`` (clamped at 0) for the distance family, one GEMM over
  D in blocks of ``BLOCK_D`` plus the squared norms computed once on the host (for D ≤ 3,
  ``DIRECT_D``, ρ from direct differences instead, as every backend forms it there);
* the symmetrized weight and its slopes (:func:`weight_tile`):
  ``w̃_ij = f(x_ij)`` or, with ``symmetric``, ``½[f(x_ij) + f(x'_ij)]`` where ``x'_ij`` pairs
  (k_i, q_j); ``g1 = ∂w̃/∂x_ij`` and ``g2 = ∂w̃/∂x'_ij``.

Log-domain kernels (gaussian) return ``z = log w̃`` instead of ``w̃``, and their slopes are
``∂ log w̃ / ∂x``: ``scale`` without symmetry, ``scale·σ(z − z')`` and ``scale·σ(z' − z)`` with it.

Coincident pairs (``ρ ≤ eps·(‖q‖² + ‖k‖²)``, kernels that mask them) get weight 0 and slope 0.
The kernel itself is a ``tl.constexpr`` id taken from :data:`nonlocal_ext.kernels.KERNELS`
(see :data:`KERNEL_IDS`), so there is one definition of each affinity; its properties (pair
variable, coincident pairs, log domain) are read from the registry at compile time by
:func:`is_distance`, :func:`masks_coincident` and :func:`log_domain`, not passed as flags.
"""

from __future__ import annotations

import triton
import triton.language as tl

from nonlocal_ext.kernels import KERNELS
from nonlocal_ext.spec import NORMALIZATIONS

#: ``tl.constexpr`` id of each affinity kernel, in the order of the registry.
KERNEL_IDS = {name: i for i, name in enumerate(KERNELS)}

# The registry's properties by kernel id, as plain values: Triton records the globals a kernel reads
# (a copy of each, compared by value when kernels are compiled together, and part of the cache key).
_IS_DISTANCE = tuple(kernel.family == "distance" for kernel in KERNELS.values())
_MASKS_COINCIDENT = tuple(kernel.masks_coincident for kernel in KERNELS.values())
_LOG_DOMAIN = tuple(kernel.log_domain for kernel in KERNELS.values())

DOT_KERNEL = tl.constexpr(KERNEL_IDS["dot"])
RBF_KERNEL = tl.constexpr(KERNEL_IDS["rbf"])
FRACTIONAL_KERNEL = tl.constexpr(KERNEL_IDS["fractional"])
LOG_KERNEL = tl.constexpr(KERNEL_IDS["log"])

#: ``tl.constexpr`` ids of the normalizations (``NORMALIZE``), in the order of ``spec.NORMALIZATIONS``.
NORMALIZE_IDS = {name: i for i, name in enumerate(NORMALIZATIONS)}
NORM_COUNT = tl.constexpr(NORMALIZE_IDS["count"])
NORM_ROW = tl.constexpr(NORMALIZE_IDS["row"])
NORM_SYM = tl.constexpr(NORMALIZE_IDS["sym"])
#: log 2, for the halves of the symmetric log-domain weight ½(e^z1 + e^z2).
LOG_2 = tl.constexpr(0.6931471805599453)


# Properties of the kernel with id KERNEL, evaluated when a variant is compiled (constexpr results, so
# `if is_distance(KERNEL):` selects code as a constexpr flag would).

@triton.constexpr_function
def is_distance(kernel_id):
    """Whether the pair variable is ρ = ‖q − k‖² (the registry's ``family == "distance"``), not q·k."""
    return _IS_DISTANCE[kernel_id]


@triton.constexpr_function
def masks_coincident(kernel_id):
    """Whether coincident pairs get weight 0 and slope 0 (the registry's ``masks_coincident``)."""
    return _MASKS_COINCIDENT[kernel_id]


@triton.constexpr_function
def log_domain(kernel_id):
    """Whether the tiles hold log w̃ instead of w̃ (the registry's ``log_domain``)."""
    return _LOG_DOMAIN[kernel_id]


@triton.jit
def affinity(x, KERNEL: tl.constexpr, scale, power, gamma):
    """``(w, f′(x))`` of the linear-domain kernels (the table in ``nonlocal_ext/kernels.py``).

    dot: scale·x, scale · rbf: e^(−scale·x), −scale·w · fractional: scale·x^(−power/2),
    −(power/2)·w/x · log: −scale·log x − gamma, −scale/x.
    """
    if KERNEL == DOT_KERNEL:
        w = scale * x
        slope = tl.zeros_like(x) + scale
    elif KERNEL == RBF_KERNEL:
        w = tl.exp(-scale * x)
        slope = -scale * w
    elif KERNEL == FRACTIONAL_KERNEL:
        w = scale * tl.exp((-0.5 * power) * tl.log(x))
        slope = (-0.5 * power) * w / x
    else:
        tl.static_assert(KERNEL == LOG_KERNEL, "affinity(): unknown linear-domain kernel id")
        w = -scale * tl.log(x) - gamma
        slope = -scale / x
    return w, slope


@triton.jit
def load_rows(ptr, rows, row_mask, offs, width, EVEN: tl.constexpr):
    """``ptr[rows, offs]`` of a contiguous (rows, width) matrix; 0 outside. int64 offsets."""
    index = rows.to(tl.int64)[:, None] * width + offs[None, :]
    if EVEN:
        mask = row_mask[:, None]
    else:
        mask = row_mask[:, None] & (offs < width)[None, :]
    return tl.load(ptr + index, mask=mask, other=0.0)


@triton.jit
def store_rows(ptr, rows, row_mask, offs, width, value):
    index = rows.to(tl.int64)[:, None] * width + offs[None, :]
    tl.store(ptr + index, value.to(ptr.dtype.element_ty), mask=row_mask[:, None] & (offs < width)[None, :])


@triton.jit
def scaled_rows_into(dst_ptr, src_ptr, rows, row_mask, col0, width, coef, ADD: tl.constexpr,
                     ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """``dst[rows, col0 : col0 + BLOCK] = [dst +] coef[:, None] · src[rows, same columns]`` in slices of
    64 columns, for the epilogues that add a row-scaled input tile (u, q_i, k_j) to a
    stored accumulator: called after the accumulator is stored, so that the BLOCK-wide input tile and the
    accumulator are never live together (at 512-wide tiles that pair spilled 400–1800 bytes). Slices of 64
    columns (a literal: every BLOCK passed is a multiple of it)."""
    tl.static_assert(BLOCK % 64 == 0)
    tl.debug_barrier()  # the accumulator's stores (another thread's layout) before this thread reads dst
    for c0 in tl.static_range(0, BLOCK, 64):
        offs = col0 + c0 + tl.arange(0, 64)
        term = coef[:, None] * load_rows(src_ptr, rows, row_mask, offs, width, False).to(ACC_DTYPE)
        if ADD:
            term += load_rows(dst_ptr, rows, row_mask, offs, width, False)
        store_rows(dst_ptr, rows, row_mask, offs, width, term)


@triton.jit
def zero_slices(ROWS: tl.constexpr, WIDTH: tl.constexpr, SLICE: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """A ROWS × WIDTH accumulator as a tuple of ROWS × SLICE zero tiles (WIDTH a multiple of SLICE).

    A product into it (:func:`sliced_dot`) loads and converts its right operand one slice at a time, so
    only one slice of that operand is live at once: the float32 column pass at 512 (tf32x3, which splits
    each operand in two) holds two or three such accumulators and did not fit the register file with
    full-width operands."""
    tl.static_assert(WIDTH % SLICE == 0)
    return (tl.zeros([ROWS, SLICE], dtype=ACC_DTYPE),) * (WIDTH // SLICE)


@triton.jit
def sliced_dot(a, b_ptr, rows, row_mask, col0, width, accs, LOW_PRECISION_OPERANDS: tl.constexpr,
               PRECISION: tl.constexpr, SLICE: tl.constexpr):
    """``accs[s] + a @ b[rows, col0 + s·SLICE : col0 + (s + 1)·SLICE]`` for each slice s of the accumulator
    (:func:`zero_slices`), b a contiguous (·, width) matrix (:func:`value_dot`); 0 outside ``width``."""
    out = ()
    for s in tl.static_range(len(accs)):
        offs = col0 + s * SLICE + tl.arange(0, SLICE)
        b = load_rows(b_ptr, rows, row_mask, offs, width, False)
        out = out + (value_dot(a, b, accs[s], LOW_PRECISION_OPERANDS, PRECISION),)
    return out


@triton.jit
def store_slices(ptr, rows, row_mask, col0, width, accs, coef, SLICE: tl.constexpr):
    """``ptr[rows, col0 + s·SLICE + ...] = coef · accs[s]`` for each slice s (:func:`zero_slices`)."""
    for s in tl.static_range(len(accs)):
        store_rows(ptr, rows, row_mask, col0 + s * SLICE + tl.arange(0, SLICE), width, coef * accs[s])


@triton.jit
def tile_dot(a_ptr, b_ptr, rows, cols, row_mask, col_mask, width, acc, EVEN: tl.constexpr, PRECISION: tl.constexpr,
             BLOCK: tl.constexpr, SPLIT_K: tl.constexpr):
    """``acc + a[rows] @ b[cols]ᵀ`` for contiguous (·, width) matrices a and b, in slices of ``BLOCK``.

    ``SPLIT_K`` > 1: each slice is cut into SPLIT_K chunks of ``BLOCK // SPLIT_K`` columns multiplied as one
    batched product, (SPLIT_K, rows, chunk) @ (SPLIT_K, chunk, cols), which Triton gives one warp per chunk
    (SPLIT_K = the program's warps), and the chunks are summed at the end. A 16 × 16 tile has two 16 × 8
    tensor-core instruction tiles; as a plain product over 8 warps, 4 or 8 warps computed each of them."""
    if SPLIT_K == 1:
        for w0 in tl.range(0, width, BLOCK):
            offs = w0 + tl.arange(0, BLOCK)
            a = load_rows(a_ptr, rows, row_mask, offs, width, EVEN)
            b = load_rows(b_ptr, cols, col_mask, offs, width, EVEN)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    else:
        CHUNK: tl.constexpr = BLOCK // SPLIT_K
        parts = tl.zeros([SPLIT_K, acc.shape[0], acc.shape[1]], dtype=acc.dtype)
        chunk0 = tl.arange(0, SPLIT_K) * CHUNK
        a_rows = rows.to(tl.int64)[None, :, None] * width
        b_cols = cols.to(tl.int64)[None, None, :] * width
        for w0 in tl.range(0, width, BLOCK):
            offs_a = w0 + chunk0[:, None, None] + tl.arange(0, CHUNK)[None, None, :]  # (SPLIT_K, 1, CHUNK)
            offs_b = w0 + chunk0[:, None, None] + tl.arange(0, CHUNK)[None, :, None]  # (SPLIT_K, CHUNK, 1)
            a = tl.load(a_ptr + a_rows + offs_a, mask=row_mask[None, :, None] & (offs_a < width), other=0.0)
            b = tl.load(b_ptr + b_cols + offs_b, mask=col_mask[None, None, :] & (offs_b < width), other=0.0)
            parts = tl.dot(a, b, parts, input_precision=PRECISION)
        acc += tl.sum(parts, 0)
    return acc


@triton.jit
def pair_tile(a_ptr, b_ptr, a_sq_ptr, b_sq_ptr, rows, cols, row_mask, col_mask, D, eps,
              KERNEL: tl.constexpr, EVEN_D: tl.constexpr, QK_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
              BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, DIRECT_D: tl.constexpr,
              SPLIT_K: tl.constexpr):
    """``(x, coincident, dead)`` between rows ``a[rows]`` and ``b[cols]``: x = a·b or ‖a − b‖².

    ``DIRECT_D`` > 0 (distance kernels with D = DIRECT_D ≤ 3 features): ρ = Σ_d (a_d − b_d)² from direct
    differences in the accumulator dtype, as the other backends form it there (no cancellation of
    ‖a‖² + ‖b‖² against 2a·b for close pairs); otherwise one GEMM over D in slices of ``BLOCK_D``.

    ``dead``: pairs whose gradient is exactly 0 in the dense formula: the coincident ones, and for
    distance kernels those where ‖q‖² + ‖k‖² − 2q·k is negative (round-off) or NaN — the clamp at 0
    passes no gradient there, so a NaN in one coordinate of q_i leaves the other coordinates of dq_i finite.
    """
    if is_distance(KERNEL):
        if DIRECT_D > 0:
            x = tl.zeros([BLOCK_I, BLOCK_J], dtype=ACC_DTYPE)
            for d in tl.static_range(DIRECT_D):
                a_d = tl.load(a_ptr + rows.to(tl.int64) * DIRECT_D + d, mask=row_mask, other=0.0).to(ACC_DTYPE)
                b_d = tl.load(b_ptr + cols.to(tl.int64) * DIRECT_D + d, mask=col_mask, other=0.0).to(ACC_DTYPE)
                diff = a_d[:, None] - b_d[None, :]
                x += diff * diff
            clamped = x != x  # NaN (a sum of squares is never negative)
        else:
            s = tile_dot(a_ptr, b_ptr, rows, cols, row_mask, col_mask, D,
                         tl.zeros([BLOCK_I, BLOCK_J], dtype=ACC_DTYPE), EVEN_D, QK_PRECISION, BLOCK_D, SPLIT_K)
        # The norms after the GEMM loop: held across it, their tile cost registers (16 spill bytes on
        # sm_80 under triton 3.8 in a float32 `symmetric` forward).
        a_sq = tl.load(a_sq_ptr + rows, mask=row_mask, other=0.0)
        b_sq = tl.load(b_sq_ptr + cols, mask=col_mask, other=0.0)
        norms = a_sq[:, None] + b_sq[None, :]
        if DIRECT_D == 0:
            raw = norms - 2.0 * s
            clamped = ~(raw >= 0.0)  # negative or NaN
            x = tl.where(raw < 0.0, 0.0, raw)  # clamp round-off at 0; NaN stays NaN (tl.maximum may drop it)
        if masks_coincident(KERNEL):
            coincident = x <= eps * norms
            x = tl.where(coincident, 1.0, x)
        else:
            coincident = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.int1)  # no coincident pairs (not `s != s`: NaN)
        dead = coincident | clamped
    else:
        x = tile_dot(a_ptr, b_ptr, rows, cols, row_mask, col_mask, D, tl.zeros([BLOCK_I, BLOCK_J], dtype=ACC_DTYPE),
                     EVEN_D, QK_PRECISION, BLOCK_D, SPLIT_K)
        coincident = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.int1)
        dead = coincident
    return x, coincident, dead


@triton.jit
def weight_tile(q_ptr, k_ptr, q_sq_ptr, k_sq_ptr, rows, cols, row_mask, col_mask, D,
                scale, power, gamma, eps,
                KERNEL: tl.constexpr, SYMMETRIC: tl.constexpr, EVEN_D: tl.constexpr,
                QK_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
                BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, DIRECT_D: tl.constexpr,
                SPLIT_K: tl.constexpr):
    """``(w̃ or log w̃, g1, g2, dead1, dead2)`` of one tile; ``g2`` is 0 without ``symmetric``.

    ``g1``, ``g2``: the slopes ∂w̃/∂x of the two terms (∂ log w̃/∂x for log-domain kernels), except for
    log-domain kernels with ``symmetric``, where they are the terms' own log-weights z1 − log 2 and
    z2 − log 2 (w̃ = e^g1 + e^g2, ∂w̃/∂x1 = scale·e^g1): the backward forms each term's gradient from its
    own exponent, so a NaN in the swapped term does not reach the (q_i, k_j) gradient (as in the dense
    formula, where ½(e^z1 + e^z2) differentiates term by term).

    ``dead1`` / ``dead2``: the pairs of (q_i, k_j) / (k_i, q_j) whose gradient is exactly 0 (see
    :func:`pair_tile`); the backward zeroes H·g there instead of multiplying (a NaN must not leak through).
    """
    x1, coincident1, dead1 = pair_tile(q_ptr, k_ptr, q_sq_ptr, k_sq_ptr, rows, cols, row_mask, col_mask, D, eps,
                                       KERNEL, EVEN_D, QK_PRECISION, ACC_DTYPE, BLOCK_I, BLOCK_J, BLOCK_D, DIRECT_D, SPLIT_K)
    if log_domain(KERNEL):
        z1 = scale * x1
        if SYMMETRIC:
            x2, _, _ = pair_tile(k_ptr, q_ptr, k_sq_ptr, q_sq_ptr, rows, cols, row_mask, col_mask, D, eps,
                                 KERNEL, EVEN_D, QK_PRECISION, ACC_DTYPE, BLOCK_I, BLOCK_J, BLOCK_D, DIRECT_D, SPLIT_K)
            z2 = scale * x2
            # log ½(e^z1 + e^z2) = max + log(½ + ½e^(min − max)). Selected with where, not
            # tl.maximum/minimum: a NaN in z1 or z2 lands in `low` or `high` and propagates.
            first_high = z1 >= z2
            high = tl.where(first_high, z1, z2)
            low = tl.where(first_high, z2, z1)
            ratio = tl.exp(low - high)  # ≤ 1: no overflow
            z = high + tl.log(0.5 + 0.5 * ratio)
            g1 = z1 - LOG_2  # each term's own log-weight (see above)
            g2 = z2 - LOG_2
        else:
            z = z1
            g1 = tl.zeros_like(z1) + scale  # (not z1·0 + scale: a NaN z must not reach the slope)
            g2 = tl.zeros_like(z1)
        return z, g1, g2, dead1, dead1
    else:
        w1, d1 = affinity(x1, KERNEL, scale, power, gamma)
        w1 = tl.where(coincident1, 0.0, w1)
        d1 = tl.where(coincident1, 0.0, d1)
        if SYMMETRIC:
            x2, coincident2, dead2 = pair_tile(k_ptr, q_ptr, k_sq_ptr, q_sq_ptr, rows, cols, row_mask, col_mask,
                                               D, eps, KERNEL, EVEN_D, QK_PRECISION, ACC_DTYPE,
                                               BLOCK_I, BLOCK_J, BLOCK_D, DIRECT_D, SPLIT_K)
            w2, d2 = affinity(x2, KERNEL, scale, power, gamma)
            w2 = tl.where(coincident2, 0.0, w2)
            d2 = tl.where(coincident2, 0.0, d2)
            return 0.5 * (w1 + w2), 0.5 * d1, 0.5 * d2, dead1, dead2
        return w1, d1, tl.zeros_like(d1), dead1, dead1


@triton.jit
def value_dot(a, b, acc, LOW_PRECISION_OPERANDS: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` with ``a`` in the compute dtype and ``b`` in the input dtype.

    ``LOW_PRECISION_OPERANDS``: cast ``a`` to ``b``'s half dtype (tensor cores at full rate; only
    used where ``a`` is bounded, e.g. Â of ``row``/``sym`` softmax-like tiles); otherwise ``b`` is
    promoted and the product uses ``PRECISION`` (tf32x3 for float32, tf32 for half inputs).
    """
    if LOW_PRECISION_OPERANDS:
        return tl.dot(a.to(b.dtype), b, acc)
    else:
        return tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
