"""Host launchers of the fused kernels: checks, layouts, statistics, grids; no autograd here.

:func:`forward` and :func:`backward` take inputs flattened to one batch dim, ``(B, N, D)``,
``(B, M, D)``, ``(B, M, C)``, ``(B, N, C)`` or None, plus the validated
:class:`~nonlocal_ext.spec.AggregateSpec`. Everything they allocate is O((N + M)(D + C)) per batch
element: the inputs made contiguous once, squared norms, per-row and per-column statistics,
outputs and gradients. The kernels are in :mod:`.aggregate`; the grid's first axis runs over row
(or column) tiles, the second over feature tiles, the third over the batch.

Under ``TRITON_INTERPRET=1`` (CPU tensors, tests) the kernels run with the fixed
:data:`~.configs.INTERPRETER_BLOCKS` (feature tiles of the call's width class); on CUDA they are
autotuned over the width class's list in :mod:`.configs`.
"""

from __future__ import annotations

import math
import threading

import torch
import triton
import triton.language as tl

from nonlocal_ext.kernels import uses_direct_differences
from nonlocal_ext.numerics import compute_dtype, safe_inverse_power

from . import aggregate
from .configs import (BUCKET_KEYS, VARIANT_KEYS, bucket, configs_for, even_heuristics, family_width, for_target,
                      interpreter_blocks, target_of)
from .tiles import KERNEL_IDS, NORMALIZE_IDS

#: True when the kernels were created under TRITON_INTERPRET=1 (they then run on CPU tensors).
INTERPRETED = not isinstance(aggregate.forward_kernel, triton.runtime.JITFunction)

#: Tests set this: every output buffer is filled with NaN before the kernels write it, so that an
#: element a kernel forgot to write shows up.
POISON_OUTPUTS = False

#: Tests set this to a list: each launch appends ``(kernel name, [shapes of its tensor arguments])``.
LAUNCH_LOG: list | None = None

_TUNED = {}

#: The interpreter patches ``triton.language`` for the duration of a launch, so two Python threads
#: interpreting kernels at once break each other ("Did you forget to add @triton.jit?"): its launches
#: take turns. (Compiled launches on CUDA need no lock.)
_INTERPRETER_LOCK = threading.Lock()


def _tuned(kernel, configs, with_even=True):
    """The autotuned (and tail-heuristic) wrapper of a kernel, built once."""
    cache_key = (kernel, id(configs))
    if cache_key not in _TUNED:
        fn = triton.heuristics(even_heuristics())(kernel) if with_even else kernel
        _TUNED[cache_key] = triton.autotune(configs=configs, key=BUCKET_KEYS + VARIANT_KEYS
                                            + ["WITH_VALUES", "WITH_DV_T", "WITH_DK"])(fn)
    return _TUNED[cache_key]


def _launch(kernel, configs, grid_of, args, constexprs, sizes, with_even=True):
    """Run ``kernel`` with ``args`` (tensors and sizes) and ``constexprs``.

    ``grid_of(blocks)`` maps the tile sizes to the grid. ``sizes`` = (N, M, D, C) for the buckets.
    """
    if LAUNCH_LOG is not None:
        LAUNCH_LOG.append((kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__,
                           [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
    n, m, d, c = sizes
    buckets = dict(zip(BUCKET_KEYS, (bucket(n), bucket(m), bucket(d), bucket(c))))
    if INTERPRETED:
        blocks = interpreter_blocks(configs[0])
        even = {}
        if with_even:
            even = {"EVEN_D": d % blocks["BLOCK_D"] == 0, "EVEN_C": c % blocks["BLOCK_C"] == 0}
        with _INTERPRETER_LOCK:
            kernel[grid_of(blocks)](*args, **buckets, **constexprs, **even, **blocks)
        return
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    configs = for_target(configs, target_of(torch.cuda.get_device_capability(device)))
    _tuned(kernel, configs, with_even)[lambda meta: grid_of(meta)](*args, **buckets, **constexprs)


@triton.jit
def _dot_probe_kernel(a_ptr, b_ptr, c_ptr, SIZE: tl.constexpr):
    rows = tl.arange(0, SIZE)
    tile = rows[:, None] * SIZE + rows[None, :]
    tl.store(c_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile)))


_BFLOAT16_DOT_EXACT: bool | None = None


def interpreter_takes_bfloat16() -> bool:
    """Whether this process's Triton interpreter computes a bfloat16 ``tl.dot`` correctly.

    Triton 3.9's interpreter stores bfloat16 as uint16 and multiplies the bit patterns in ``tl.dot``
    (triton-lang/triton#11584); bfloat16 loads, casts and stores are right. One 16 × 16 product of
    small integers (exact in bfloat16 and float32) decides, once per process.
    """
    global _BFLOAT16_DOT_EXACT
    if _BFLOAT16_DOT_EXACT is None:
        ints = torch.arange(16 * 16).reshape(16, 16)
        a, b = (ints % 5 - 2).to(torch.bfloat16), (ints % 3 - 1).to(torch.bfloat16).T.contiguous()
        c = torch.full((16, 16), math.nan)
        with _INTERPRETER_LOCK:
            _dot_probe_kernel[(1,)](a, b, c, SIZE=16)
        _BFLOAT16_DOT_EXACT = torch.equal(c, a.float() @ b.float())
    return _BFLOAT16_DOT_EXACT


def _new(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, math.nan, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def variant_constexprs(spec, dtype: torch.dtype, features: int | None = None) -> dict:
    """The ``tl.constexpr`` arguments that select the compiled variant for ``spec``, ``dtype`` and the
    number of query/key ``features`` D (None: the GEMM form of ρ, as for any D > 3).

    Distance kernels with D ≤ 3 form ρ from direct differences (``DIRECT_D = D``), as every backend
    does there (:func:`nonlocal_ext.kernels.uses_direct_differences`).

    Precision of the ``tl.dot`` products: float32 inputs use tf32x3 (near-fp32 accuracy on tensor
    cores), float64 IEEE (interpreter only), half inputs multiply in their own type with
    float32 accumulation. Products of a float32 tile (Â, C) by an input tile keep the tile in
    float32 (tf32 for half inputs, so no half overflow of unnormalized weights), except the
    softmax-like case gaussian + row/sym with half inputs, where Â ≤ 1 and the tile is cast to the
    input's half type as FlashAttention does.
    """
    kernel = spec.kernel
    half = dtype in (torch.float16, torch.bfloat16)
    precision = {torch.float64: "ieee", torch.float32: "tf32x3"}.get(dtype, "tf32")
    return dict(
        KERNEL=KERNEL_IDS[kernel.name],  # the kernels derive the rest of the affinity from its id (tiles.py)
        SYMMETRIC=spec.symmetric,
        NORMALIZE=NORMALIZE_IDS[spec.normalize],
        DIFFUSION=spec.diffusion,
        LOW_PRECISION_VALUES=half and kernel.log_domain and spec.normalize in ("row", "sym"),
        QK_PRECISION=precision,
        VALUE_PRECISION=precision,
        ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        DIRECT_D=features if features is not None and uses_direct_differences(kernel, features) else 0,
    )


def _params(spec, dtype, device):
    """(scale, power, gamma, eps) as a device tensor. On CUDA written by fill kernels, not copied from the
    host: a host-to-device copy synchronizes, which CUDA-graph capture forbids (training loops capture)."""
    p = spec.params
    values = [p.scale, 0.0 if p.power is None else p.power, p.gamma, p.eps]
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    params = torch.empty(len(values), dtype=dtype, device=device)
    for i, value in enumerate(values):
        params[i].fill_(value)
    return params


def _sqnorms(spec, x, dtype):
    if spec.kernel.family != "distance":
        return x.new_zeros(1, dtype=dtype)
    return x.to(dtype).square().sum(-1)


def row_factor(spec, row_stats, m):
    """A_i (log A_i for log-domain kernels) from the saved row statistics (r_i or log r_i)."""
    if spec.kernel.log_domain:
        return {"none": torch.zeros_like(row_stats), "count": torch.full_like(row_stats, -math.log(m)),
                "row": -row_stats, "sym": -0.5 * row_stats}[spec.normalize]
    return {"none": torch.ones_like(row_stats), "count": torch.full_like(row_stats, 1.0 / m),
            "row": safe_inverse_power(row_stats, 1.0), "sym": safe_inverse_power(row_stats, 0.5)}[spec.normalize]


def col_factor(spec, col_stats):
    """B_j (log B_j) from the column statistics of ``sym``; 1 (0) for the other normalizations."""
    if spec.normalize != "sym":
        return torch.zeros_like(col_stats) if spec.kernel.log_domain else torch.ones_like(col_stats)
    return -0.5 * col_stats if spec.kernel.log_domain else safe_inverse_power(col_stats, 0.5)


class _Prepared:
    """Contiguous inputs, squared norms and kernel parameters of one call."""

    def __init__(self, spec, query, key, value, self_value):
        self.spec = spec
        self.dtype = query.dtype
        self.acc = compute_dtype(query.dtype)
        self.fp32 = query.dtype in (torch.float32, torch.float64)
        self.q, self.k, self.v = (t.contiguous() for t in (query, key, value))
        self.u = None
        if spec.diffusion:
            self.u = self.v if self_value is None else self_value.contiguous()
        self.b, self.n, self.d = self.q.shape
        self.m, self.c = self.k.shape[1], self.v.shape[2]
        self.q_sq = _sqnorms(spec, self.q, self.acc)
        self.k_sq = _sqnorms(spec, self.k, self.acc)
        self.params = _params(spec, self.acc, self.q.device)
        self.constexprs = variant_constexprs(spec, self.dtype, self.d)
        self.dummy = self.q.new_zeros(1, dtype=self.acc)

    def new(self, *shape, dtype=None):
        return _new(shape, self.acc if dtype is None else dtype, self.q.device)


def _row_sums(p: _Prepared, swapped: bool):
    """r_i (log r_i) of the problem, or with ``swapped`` its column sums c_j (log c_j)."""
    a, b_, a_sq, b_sq, rows, cols = (p.k, p.q, p.k_sq, p.q_sq, p.m, p.n) if swapped else \
        (p.q, p.k, p.q_sq, p.k_sq, p.n, p.m)
    stats = p.new(p.b, rows)
    constexprs = dict(p.constexprs, WITH_VALUES=False, DIFFUSION=False)
    _launch(aggregate.forward_kernel, configs_for("forward", p.fp32, width=0),
            lambda blk: (triton.cdiv(rows, blk["BLOCK_I"]), 1, p.b),
            (a, b_, p.dummy, p.dummy, a_sq, b_sq, p.dummy, p.params, p.dummy, stats, rows, cols, p.d, 0),
            constexprs, (rows, cols, p.d, 0))
    return stats


def forward(query, key, value, self_value, spec):
    """Returns ``(out, row_stats, col_stats)``: ``out (B, N, C)`` in the compute dtype, ``row_stats (B, N)``
    (r_i, or log r_i for gaussian), ``col_stats (B, M)`` (c_j or log c_j for ``sym``, else empty)."""
    p = _Prepared(spec, query, key, value, self_value)
    if spec.normalize == "sym" and p.b * p.n * p.m:
        col_stats = _row_sums(p, swapped=True)
    else:
        col_stats = p.new(p.b, p.m if spec.normalize == "sym" else 0)
        col_stats.zero_()
    if p.b * p.n * p.m * p.c == 0:  # nothing to sum: out = 0 (M = 0 is only allowed with normalize="none")
        out = torch.zeros(p.b, p.n, p.c, dtype=p.acc, device=p.q.device)
        return out, torch.zeros(p.b, p.n, dtype=p.acc, device=p.q.device), col_stats
    out = p.new(p.b, p.n, p.c)
    row_stats = p.new(p.b, p.n)
    factor = col_factor(spec, col_stats) if spec.normalize == "sym" else p.dummy
    _launch(aggregate.forward_kernel, configs_for("forward", p.fp32, width=p.c),
            lambda blk: (triton.cdiv(p.n, blk["BLOCK_I"]), triton.cdiv(p.c, blk["BLOCK_C"]), p.b),
            (p.q, p.k, p.v, p.u if p.u is not None else p.dummy, p.q_sq, p.k_sq, factor, p.params, out, row_stats,
             p.n, p.m, p.d, p.c),
            dict(p.constexprs, WITH_VALUES=True), (p.n, p.m, p.d, p.c))
    return out, row_stats, col_stats


def backward(grad_out, query, key, value, self_value, out, row_stats, col_stats, spec):
    """Returns ``(grad_query, grad_key, grad_value, grad_self_value)`` in the inputs' dtype
    (``grad_self_value`` None without ``self_value``); ``out`` is the forward's compute-dtype output."""
    p = _Prepared(spec, query, key, value, self_value)
    if p.b * p.n * p.m * p.c == 0:  # out has no elements or does not depend on the inputs
        zeros = [torch.zeros_like(t) for t in (query, key, value)]
        return (*zeros, None if self_value is None else torch.zeros_like(self_value))
    g = grad_out.to(p.dtype).contiguous()
    out = out.contiguous()
    u_or_dummy = p.u if p.u is not None else p.dummy
    nd_chunks = lambda blk: max(triton.cdiv(p.c, blk["OUT_C"]), triton.cdiv(p.d, blk["OUT_D"]), 1)  # noqa: E731
    width = family_width("column", p.d, p.c)

    # δ preprocess: S_i = G_i·out_i, gu_i = G_i·u_i
    s_rows = p.new(p.b, p.n)
    gu_rows = p.new(p.b, p.n) if spec.diffusion else p.dummy
    _launch(aggregate.backward_preprocess_kernel, configs_for("preprocess", p.fp32),
            lambda blk: (triton.cdiv(p.n, blk["BLOCK_I"]), p.b),
            (g, out, u_or_dummy, s_rows, gu_rows, p.n, p.c),
            dict(DIFFUSION=spec.diffusion, ACC_DTYPE=p.constexprs["ACC_DTYPE"]), (p.n, p.m, p.d, p.c),
            with_even=False)

    rows_f = row_factor(spec, row_stats, p.m).contiguous()
    cols_f = col_factor(spec, col_stats if spec.normalize == "sym" else p.new(p.b, p.m)).contiguous()
    sym = spec.normalize == "sym"
    dv = p.new(p.b, p.m, p.c)
    dk = p.new(p.b, p.m, p.d)
    dq_swap = p.new(p.b, p.m, p.d) if spec.symmetric else p.dummy
    t_cols = p.new(p.b, p.m) if sym else p.dummy
    column_args = lambda: (p.q, p.k, p.v, g, p.q_sq, p.k_sq, rows_f, cols_f, s_rows, gu_rows, t_cols,  # noqa: E731
                           p.params, dv, dk, dq_swap, p.n, p.m, p.d, p.c)
    column_grid = lambda blk: (triton.cdiv(p.m, blk["BLOCK_J"]), nd_chunks(blk), p.b)  # noqa: E731
    for with_dv_t, with_dk in ([(True, False), (False, True)] if sym else [(True, True)]):
        if sym and with_dk:  # T_j = Σ_i dâ_ij â_ij = v_j·dv_j − Σ_i â_ij gu_i (the first pass wrote the sum)
            t = (p.v.to(p.acc) * dv).sum(-1)
            t_cols.copy_(t - t_cols if spec.diffusion else t)
        _launch(aggregate.backward_column_kernel, configs_for("column", p.fp32, spec.symmetric, width), column_grid, column_args(),
                dict(p.constexprs, WITH_DV_T=with_dv_t, WITH_DK=with_dk), (p.n, p.m, p.d, p.c))

    dq = p.new(p.b, p.n, p.d)
    dk_swap = p.new(p.b, p.n, p.d) if spec.symmetric else p.dummy
    du = p.new(p.b, p.n, p.c) if spec.diffusion else p.dummy
    _launch(aggregate.backward_row_kernel, configs_for("row", p.fp32, spec.symmetric, width),
            lambda blk: (triton.cdiv(p.n, blk["BLOCK_I"]), nd_chunks(blk), p.b),
            (p.q, p.k, p.v, g, p.q_sq, p.k_sq, rows_f, cols_f, s_rows, gu_rows, t_cols, p.params,
             dq, dk_swap, du, p.n, p.m, p.d, p.c),
            p.constexprs, (p.n, p.m, p.d, p.c))

    if spec.symmetric:  # the swapped pair's gradients, in a fixed order
        dq = dq + dq_swap
        dk = dk + dk_swap
    grad_u = None
    if spec.diffusion:
        if self_value is None:  # u is v
            dv = dv + du
        else:
            grad_u = du.to(p.dtype)
    return dq.to(p.dtype), dk.to(p.dtype), dv.to(p.dtype), grad_u
