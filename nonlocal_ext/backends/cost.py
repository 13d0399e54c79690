"""The cost model behind ``backend="auto"`` on CPU: the dense ``reference`` or the fused ``cpu`` kernels.

Both paths are priced in GEMM-FLOP equivalents per affinity (pair i, j; B·N·M pairs per call):

* **dense** (``reference``, plain autograd): GEMMs of 2(D + C) FLOPs per pair in the forward, 3× that
  with the backward (dÂ = G vᵀ, dv = ÂᵀG, dq, dk), plus the elementwise passes over the N×M matrices
  (forming W, normalizing, their backward): :data:`DENSE_PASSES`, cheaper by :data:`CACHED_PASSES`
  when the whole N×M matrix fits in the core's cache (:data:`CACHED_BYTES`), dearer by
  :data:`UNCACHED_PASSES` when it exceeds the last-level cache (:data:`UNCACHED_BYTES`).
* **fused** (``cpu``): the forward's 2(D + C) and the backward's 2(3D + 2C) (it recomputes q kᵀ
  instead of storing W), at :data:`FUSED_FORWARD_SPEED` and :data:`FUSED_BACKWARD_SPEED` times the
  dense GEMM rate (its tiles go through brgemm without packing; its backward adds tile transposes and
  column partials), the kernel's elementwise work in cache (:data:`FUSED_PASSES`), ``sym``'s column
  pass, a penalty for narrow key sets (M < 256 fills a 256-wide tile partly: :func:`narrow_penalty`)
  and a fixed cost per call (:data:`FUSED_CALL`).

* **linear** (``kernel="dot"`` only): two thin products per pass, 2(N + M)·D·(C + 1) FLOPs per batch
  element (twice with ``symmetric``), 3× that with the backward, in float64 (it accumulates there):
  :data:`LINEAR_SPEED` times the dense float32 GEMM rate. It wins when N·M is large against D·C
  (attention shapes) and loses at nonlocal-block shapes (D = C = 256–1024 and M = N/4).

The constants come from one-thread CPU-time probes of the nonlocal-block suite
(``nonlocal-bench --suite blocks``) and of N = M ∈ {256…4096}, D = 64, C = 128; bench/NOTES.md
("The auto cost model"; the fused GEMM speeds and the half factors re-read on an AMX machine in
"`auto` on an AMX machine, and dense products in half") has the tables they were read from.
"""

from __future__ import annotations

#: Elementwise work of the dense path, in GEMM-FLOP equivalents per pair: (forward, forward+backward).
DENSE_PASSES = {"dot": (200.0, 600.0), "gaussian": (460.0, 1480.0), "rbf": (1400.0, 3000.0),
                "fractional": (2700.0, 7000.0), "log": (2700.0, 7000.0)}
#: The same work on matrices (B·N·M float32 values) that stay in the core's cache costs this fraction,
CACHED_PASSES = 0.35
CACHED_BYTES = 4 << 20
#: and on matrices larger than the last-level cache this multiple.
UNCACHED_PASSES = 2.0
UNCACHED_BYTES = 32 << 20
#: Elementwise work of the fused kernels per pair (exp/log in registers): forward, forward+backward.
FUSED_PASSES = (100.0, 300.0)
#: Fixed work of one fused call (custom-op dispatch, transposed copies, statistics, the backward's
#: partial sums), in GEMM-FLOP equivalents: forward, forward+backward.
FUSED_CALL = (7e6, 40e6)
FUSED_FORWARD_SPEED = 0.75
FUSED_BACKWARD_SPEED = 0.6
#: The linear path's float64 thin GEMMs, as a fraction of the dense float32 GEMM rate.
LINEAR_SPEED = 0.4
#: Half inputs where the CPU multiplies half natively (``reference.half_products``): the dense path's
#: GEMMs run this much faster than float32, its elementwise passes (half storage) cost this fraction,
#: and the fused kernels (half tile products, float32 weights) run this much faster overall.
HALF_DENSE_GEMM_SPEED = 4.0
HALF_DENSE_PASSES = 0.6
HALF_FUSED_SPEED = 1.5


def narrow_penalty(m: int) -> float:
    """Slow-down of the fused kernels when fewer than 256 keys fill their 256-wide tiles."""
    return 1.0 + 0.35 * max(0.0, (256 - m) / 256)


def dense_work(pairs: int, d: int, c: int, kernel: str, backward: bool, half: bool = False) -> float:
    """``half``: half inputs whose products run in half (``reference.half_products``)."""
    gemm = 2.0 * (d + c) * (3 if backward else 1)
    passes = DENSE_PASSES[kernel][backward]
    if pairs * 4 <= CACHED_BYTES:
        passes *= CACHED_PASSES
    elif pairs * 4 > UNCACHED_BYTES:
        passes *= UNCACHED_PASSES
    if half:
        gemm, passes = gemm / HALF_DENSE_GEMM_SPEED, passes * HALF_DENSE_PASSES
    return pairs * (gemm + passes)


def fused_work(pairs: int, m: int, d: int, c: int, normalize: str, backward: bool, half: bool = False) -> float:
    """``half``: half inputs on a CPU that multiplies them natively."""
    forward = 2.0 * (d + c) * (2 if normalize == "sym" else 1)  # sym: the column-sum pass first
    work = forward / FUSED_FORWARD_SPEED + FUSED_PASSES[backward]
    if backward:
        work += 2.0 * (3 * d + 2 * c + (d + c if normalize == "sym" else 0)) / FUSED_BACKWARD_SPEED
    if half:
        work /= HALF_FUSED_SPEED
    return pairs * work * narrow_penalty(m) + FUSED_CALL[backward]


def linear_work(batch: int, n: int, m: int, d: int, c: int, symmetric: bool, backward: bool) -> float:
    """The exact low-rank path of ``dot`` (backends/linear.py), in the same units."""
    flops = 2.0 * batch * (n + m) * d * (c + 1) * (2 if symmetric else 1) * (3 if backward else 1)
    return flops / LINEAR_SPEED
