"""The cost model behind ``backend="auto"`` on CPU: :func:`choose` prices each path that can run a call and
takes the cheapest.

Every path is priced in GEMM-FLOP equivalents (time × the float32 GEMM rate) for B·N·M pairs:

* **dense** (``reference``, plain autograd): GEMMs of 2(D + C) FLOPs per pair in the forward, 3× that
  with the backward (dÂ = G vᵀ, dv = ÂᵀG, dq, dk), plus the elementwise passes over the N×M matrices
  (forming W, normalizing, their backward): :data:`DENSE_PASSES`, cheaper by :data:`CACHED_PASSES`
  when the whole N×M matrix fits in the core's cache (:data:`CACHED_BYTES`), dearer by
  :data:`UNCACHED_PASSES` when it exceeds the last-level cache (:data:`UNCACHED_BYTES`), and a fixed
  cost per call (:data:`DENSE_CALL`). Only while its N×M temporaries fit :data:`DENSE_MEMORY_BUDGET`.
* **fused** (``cpu``): the forward's 2(D + C) and the backward's 2(3D + 2C) (it recomputes q kᵀ
  instead of storing W; 2(2D + 2C) where the forward keeps the products, :func:`.cpu.products_fit`), at :data:`FUSED_FORWARD_SPEED` and :data:`FUSED_BACKWARD_SPEED` times the
  dense GEMM rate, the kernel's elementwise work in cache (:data:`FUSED_PASSES`), ``sym``'s column
  pass, a penalty for narrow key sets (M < 256 fills a 256-wide tile partly: :func:`narrow_penalty`)
  and a fixed cost per call (:data:`FUSED_CALL`).
* **chunked**: the fused path's GEMM work (it recomputes each block of W in the backward) at
  :data:`CHUNKED_SPEED`, the dense path's elementwise passes on blocks that stay in cache
  (:data:`CHUNKED_PASSES` of them), and a fixed cost per block of rows (:data:`CHUNKED_BLOCK`).
* **linear** (``kernel="dot"`` only): two thin products per pass, 2(N + M)·D·(C + 1) FLOPs per batch
  element (twice with ``symmetric``), 3× that with the backward, in float64 (it accumulates there):
  :data:`LINEAR_SPEED` times the dense float32 GEMM rate. It wins when N·M is large against D·C
  (attention shapes) and loses at nonlocal-block shapes (D = C = 256–1024 and M = N/4).

Half inputs whose products run in half on this CPU (``half``: :func:`.reference.half_class`, "amx" or
"avx512" by the CPU's half instructions) change the dense path's GEMM speed: :data:`HALF_DENSE_GEMM_EFFICIENCY`
times ``half_ratio``, the half/float32 ``torch.mm`` rate ratio of this CPU, timed once per process and dtype
(:func:`half_gemm_ratio`: two CPUs of one class measured 0.55 and 2.04, so the class cannot stand for it); and
the dense path's elementwise passes (:data:`HALF_DENSE_PASSES`, one value per class); the fused kernels' GEMM
work likewise runs :data:`HALF_FUSED_GEMM_EFFICIENCY` × ``half_ratio`` times faster (their elementwise work is
float32 either way; a per-class constant had read 0.62 and 1.39 on two CPUs of one class); ``chunked`` computes
in float32 throughout.

The fused constants hold where the fused kernels run as fast relative to ``torch.mm`` as on the machine that
measured the suite: :func:`fused_speed_scale` times one fused call against ``torch.mm`` once per process, and the
fused work per pair is divided by that probe over the fitted run's (:data:`FUSED_PROBE`; another CPU of the same
kind measured the fused kernels 1.26× faster relative to its ``torch.mm``, bench/NOTES.md).

The constants between the ``calibrate.py`` markers are fitted by ``bench/calibrate.py`` to the times
``make bench`` measured (``bench/results/blocks.json`` and ``cpu.json``), each path to its own rows, the
half constants of the class of the machine that measured them (:data:`FITTED_ON`); tests/test_cost.py
checks that they are that fit. The "amx" half constants were read on a Sapphire Rapids with AMX
(bench/NOTES.md, "`auto` on an AMX machine, and dense products in half"). bench/NOTES.md ("The auto cost
model, fitted") has the fit and the picks it gives.
"""

from __future__ import annotations

import math

import torch

from .chunked import BLOCK_ELEMENTS as CHUNK_ELEMENTS  # elements of W per block of ``chunked``
from .cpu import products_fit

#: Bytes the dense path's N×M temporaries may take (it holds up to DENSE_TEMPORARIES matrices of
#: B·N·M elements with autograd).
DENSE_MEMORY_BUDGET = 1 << 30
DENSE_TEMPORARIES = 8
#: The whole N×M matrix (B·N·M float32 values) in the core's cache, or beyond the last-level cache.
CACHED_BYTES = 4 << 20
UNCACHED_BYTES = 32 << 20

# The constants fitted by `bench/calibrate.py --write` to the measured suite (not edited by hand):
# calibrate.py: begin
DENSE_PASSES = {
    "dot": (256.2, 689.3),
    "gaussian": (207.3, 381.2),
    "rbf": (921.4, 1542.0),
    "fractional": (1432.0, 2727.0),
    "log": (1432.0, 2727.0),
}
CACHED_PASSES = 0.8571
UNCACHED_PASSES = 2.811
DENSE_CALL = (27880000.0, 121000000.0)
FUSED_PASSES = (117.9, 423.4)
FUSED_CALL = (29360000.0, 70860000.0)
FUSED_FORWARD_SPEED = 1.074
FUSED_BACKWARD_SPEED = 1.066
NARROW_PENALTY = 1.185
DENSE_NARROW_PENALTY = 1.17
CHUNKED_SPEED = 0.7942
CHUNKED_PASSES = 0.7392
CHUNKED_BLOCK = (65730000.0, 221900000.0)
LINEAR_SPEED = 0.2856
HALF_DENSE_GEMM_EFFICIENCY = 0.9676
HALF_DENSE_PASSES = {
    "amx": 0.6,
    "avx512": 0.7119,
}
HALF_FUSED_GEMM_EFFICIENCY = 0.5667
FUSED_PROBE = 0.9326
FITTED_ON = "avx512"
# calibrate.py: end

#: The paths :func:`choose` prices, by ``backend=`` name.
PATHS = ("reference", "cpu", "chunked", "linear")

#: Side of the square products :func:`half_gemm_ratio` times (≈ 0.3 GFLOP each: a few ms in all).
RATIO_GEMM_SIZE = 512
#: The call :func:`fused_speed_scale` times: the ``cpu`` forward of ``gaussian`` + ``row``, float32, batch 1,
#: N = M, D, C (a case of ``make bench``'s sweep, so that every fitted run has it), against float32 ``torch.mm``
#: of PROBE_GEMM_SIZE² matrices: ≈ 0.15 s in all.
PROBE_SHAPE = (2048, 64, 128)
PROBE_GEMM_SIZE = 1024


def probe_of(fused_seconds: float, gemm_gflops: float) -> float:
    """The fused kernels' speed relative to ``torch.mm``: the probe call's GFLOP/s (2·N·N·(D + C) FLOPs) over the
    float32 GEMM rate. :data:`FUSED_PROBE` is its value on the fitted run."""
    n, d, c = PROBE_SHAPE
    return 2.0 * n * n * (d + c) / fused_seconds / 1e9 / gemm_gflops


#: What this process measured of its CPU, by key: ("half", dtype) → :func:`half_gemm_ratio`, "fused" →
#: :func:`fused_speed_scale` (tests clear it).
MEASURED: dict = {}


def _measured_once(key, measure):
    """``measure()`` at the first call in a process, then its value; 1.0 while ``torch.compile`` traces a call
    before anything was measured (timing cannot be traced; 1.0 prices as on the fitted machine)."""
    if key not in MEASURED:
        if torch.compiler.is_compiling():
            return 1.0
        MEASURED[key] = measure()
    return MEASURED[key]


def half_gemm_ratio(dtype: torch.dtype) -> float:
    """The ``torch.mm`` rate of ``dtype`` (bfloat16 or float16) over float32's on this CPU, measured at the first
    call in a process: the better of two rounds per dtype, interleaved, each the median of 5 products of
    :data:`RATIO_GEMM_SIZE`² matrices after 2 warm-up ones (a process's first half products can run 10× slow)."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype: expected torch.bfloat16 or torch.float16, got {dtype}")

    def measure():
        from ..benchmark.measure import gemm_gflops
        rates = {dtype: 0.0, torch.float32: 0.0}
        with torch.no_grad(), torch.autocast("cpu", enabled=False):  # the products in the dtypes asked for
            for _ in range(2):
                for each in rates:
                    rates[each] = max(rates[each], gemm_gflops("cpu", each, RATIO_GEMM_SIZE))
        return rates[dtype] / rates[torch.float32]
    return _measured_once(("half", dtype), measure)


def fused_speed_scale() -> float:
    """How much faster, relative to ``torch.mm``, the fused kernels run on this CPU than on the machine the
    constants were fitted on: :func:`probe_of` measured here over :data:`FUSED_PROBE`. Measured at the first call in
    a process (outside autocast and autograd): the better of two interleaved rounds of each, a round the median of
    5 calls after 2 warm-up ones (a process's first ``torch.mm`` round read 1.4× slow on the fitted machine, which
    made the fused path look that much faster); the fused path's work per pair is divided by it. Needs the ``cpu``
    kernels built."""
    def measure():
        from ..benchmark.measure import gemm_gflops, time_step
        from ..ops import nonlocal_aggregate
        n, d, c = PROBE_SHAPE
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, n, width, generator=g) for width in (d, d, c))
        seconds, rate = math.inf, 0.0
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            for _ in range(2):
                rate = max(rate, gemm_gflops("cpu", torch.float32, PROBE_GEMM_SIZE))
                seconds = min(seconds, sorted(time_step(
                    lambda: nonlocal_aggregate(q, k, v, "gaussian", backend="cpu"), "cpu", 5, warmup=2))[2])
        return probe_of(seconds, rate) / FUSED_PROBE
    return _measured_once("fused", measure)


def narrow_penalty(m: int, penalty: float | None = None) -> float:
    """Slow-down of GEMMs over fewer than 256 keys: the fused kernels' 256-wide tiles filled partly
    (:data:`NARROW_PENALTY`), or the dense and chunked products q kᵀ with few columns and Â v with a short
    inner dimension (:data:`DENSE_NARROW_PENALTY`)."""
    return 1.0 + (NARROW_PENALTY if penalty is None else penalty) * max(0.0, (256 - m) / 256)


def _passes(pairs: int, kernel: str, backward: bool) -> float:
    passes = DENSE_PASSES[kernel][backward]
    if pairs * 4 <= CACHED_BYTES:
        return passes * CACHED_PASSES
    return passes * UNCACHED_PASSES if pairs * 4 > UNCACHED_BYTES else passes


def _checked_ratio(half_ratio: float | None) -> float:
    if not half_ratio or not half_ratio > 0:
        raise ValueError(f"half_ratio: expected the positive half/float32 GEMM rate ratio, got {half_ratio!r}")
    return half_ratio


def dense_work(pairs: int, m: int, d: int, c: int, kernel: str, backward: bool, half: str | None = None,
               half_ratio: float | None = None) -> float:
    """``half``: the class of half products these inputs run (:func:`.reference.half_class`), or None;
    ``half_ratio``: then the half/float32 GEMM rate ratio of the CPU (:func:`half_gemm_ratio`)."""
    gemm = 2.0 * (d + c) * (3 if backward else 1) * narrow_penalty(m, DENSE_NARROW_PENALTY)
    passes = _passes(pairs, kernel, backward)
    if half:
        gemm, passes = gemm / (HALF_DENSE_GEMM_EFFICIENCY * _checked_ratio(half_ratio)), passes * HALF_DENSE_PASSES[half]
    return pairs * (gemm + passes) + DENSE_CALL[backward]


def _recomputing_gemms(d: int, c: int, normalize: str, backward: bool, kept: bool = False) -> tuple[float, float]:
    """GEMM FLOPs per pair of a path that never stores W: (forward, backward). ``kept``: the backward reads the
    forward's products q kᵀ instead of recomputing them (once, or twice with ``sym``'s terms pass)."""
    sym = normalize == "sym"
    forward = 2.0 * (d + c) * (2 if sym else 1)  # sym: the column-sum pass first
    back = 2.0 * (3 * d + 2 * c + (d + c if sym else 0) - (d * (2 if sym else 1) if kept else 0))
    return forward, back if backward else 0.0


def fused_work(pairs: int, m: int, d: int, c: int, normalize: str, backward: bool, half: str | None = None,
               scale: float = 1.0, symmetric: bool = False, half_ratio: float | None = None) -> float:
    """``half``, ``half_ratio``: as for :func:`dense_work` (the fused kernels' half tile products follow the same
    test and run on the same instructions: their GEMM work at :data:`HALF_FUSED_GEMM_EFFICIENCY` × the ratio,
    their elementwise work in float32 as for float32 inputs);
    ``scale``: the fused kernels' speed on this CPU against the fitted machine's (:func:`fused_speed_scale`);
    without ``symmetric``, a backward where the products fit (:func:`.cpu.products_fit`) reads them."""
    if not scale > 0:
        raise ValueError(f"fused_scale: expected the positive speed ratio of fused_speed_scale(), got {scale!r}")
    forward, back = _recomputing_gemms(d, c, normalize, backward, kept=not symmetric and products_fit(m, d, c))
    gemm = forward / FUSED_FORWARD_SPEED + back / FUSED_BACKWARD_SPEED
    if half:
        gemm /= HALF_FUSED_GEMM_EFFICIENCY * _checked_ratio(half_ratio)
    return pairs * (gemm + FUSED_PASSES[backward]) * narrow_penalty(m) / scale + FUSED_CALL[backward]


def chunked_work(pairs: int, m: int, d: int, c: int, kernel: str, normalize: str, backward: bool) -> float:
    """The blocks of rows of ``chunked`` (float32 work for every input dtype)."""
    forward, back = _recomputing_gemms(d, c, normalize, backward)
    gemm = (forward + back) / CHUNKED_SPEED * narrow_penalty(m, DENSE_NARROW_PENALTY)
    passes = DENSE_PASSES[kernel][backward] * CHUNKED_PASSES
    return pairs * (gemm + passes) + math.ceil(pairs / CHUNK_ELEMENTS) * CHUNKED_BLOCK[backward]


def linear_work(batch: int, n: int, m: int, d: int, c: int, symmetric: bool, backward: bool) -> float:
    """The exact low-rank path of ``dot`` (backends/linear.py), in the same units."""
    flops = 2.0 * batch * (n + m) * d * (c + 1) * (2 if symmetric else 1) * (3 if backward else 1)
    return flops / LINEAR_SPEED


def prices(batch: int, n: int, m: int, d: int, c: int, kernel: str, normalize: str, symmetric: bool,
           backward: bool, half: str | None, fused: bool, item_bytes: int = 4,
           half_ratio: float | None = None, fused_scale: float = 1.0) -> dict[str, float]:
    """The work of each path that may run the call, by name: ``reference`` while its temporaries fit the
    budget (``item_bytes``: 8 for float64), ``cpu`` where the fused kernels are available (``fused``; priced
    with ``fused_scale``, see :func:`fused_work`), ``chunked`` always, ``linear`` for ``dot``. With ``half``,
    ``half_ratio`` is required (see :func:`dense_work`)."""
    pairs = batch * n * m
    out = {"chunked": chunked_work(pairs, m, d, c, kernel, normalize, backward)}
    if DENSE_TEMPORARIES * pairs * max(item_bytes, 4) <= DENSE_MEMORY_BUDGET:
        out["reference"] = dense_work(pairs, m, d, c, kernel, backward, half, half_ratio)
    if fused:
        out["cpu"] = fused_work(pairs, m, d, c, normalize, backward, half, fused_scale, symmetric, half_ratio)
    if kernel == "dot":
        out["linear"] = linear_work(batch, n, m, d, c, symmetric, backward)
    return out


def choose(*args, **kwargs) -> str:
    """The cheapest of :func:`prices` (same arguments), by ``backend=`` name."""
    options = prices(*args, **kwargs)
    return min(options, key=options.get)
