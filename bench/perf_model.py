"""Static performance model of the Triton kernels: FLOPs and bytes per call, and H100 peak time.

    .venv/bin/python bench/perf_model.py [--n 4096] [--m N] [--d 64] [--c 64] [--batch 1] [--dtype fp16]

For each variant (affinity kernel × normalization × update × symmetric) and pass (forward, backward)
this counts the work the fused kernels of nonlocal_ext/triton_kernels/aggregate.py do — including the
recomputation of tiles in the backward — and divides by an H100 SXM's peak (DESIGN §3):
990 TFLOP/s dense bf16/fp16 tensor-core math (float32 inputs: tf32x3, three tf32 products at 495
TFLOP/s, so 165 TFLOP/s effective), 3.35 TB/s HBM3. A GPU owner reads the achieved fraction as
``peak time / measured time`` (``nonlocal-bench --device cuda`` measures the time).

Counting (multiply-add = 2 FLOPs; per batch element; "GEMM" = tensor-core work):
    one tile recomputation  S = q kᵀ: 2·N·M·D (×2 with symmetric: the swapped pair k qᵀ)
    forward                 [sym: + column-sum pass, one recomputation] + recomputation + Â v: 2·N·M·C
    backward                preprocess (no GEMM) + column pass(es) + row pass, each pass:
                            recomputation + dâ = G vᵀ: 2·N·M·C, and
                              column: dv = Âᵀ G: 2·N·M·C, dk = Cᵀ q: 2·N·M·D (+ dq' with symmetric)
                              row:    dq = C k: 2·N·M·D (+ dk' with symmetric)
                            sym runs the column pass twice (T first, then dk)
    elementwise (exp/log/pow per pair) is not counted as FLOPs: it runs on the SFU/FMA pipes,
    beside the tensor cores, and is reported as "pair evaluations" instead.
Bytes: each input read once per pass and each output written once (the ideal of a fused kernel
whose tiles stay in L2/shared memory); wide D or C tiled over the grid re-read their inputs once per
feature tile, which is counted.
The peak time is max(FLOPs / 990e12, bytes / 3.35e12): a roofline bound, not a prediction.
"""

from __future__ import annotations

import argparse
import itertools
import math

PEAK_FLOPS = 990e12   # H100 SXM, dense fp16/bf16 tensor cores
#: float32 inputs run every product as tf32x3: three tf32 MMAs (dense tf32 peak 495 TFLOP/s).
PEAK_FLOPS_BY_DTYPE = {"fp16": PEAK_FLOPS, "bf16": PEAK_FLOPS, "fp32": 495e12 / 3}
PEAK_BYTES = 3.35e12  # H100 SXM HBM3
FEATURE_TILE = 64     # BLOCK_D = BLOCK_C of the default configurations

AFFINITIES = ("gaussian", "rbf", "fractional", "log")
NORMALIZATIONS = ("none", "count", "row", "sym")


def _feature_tiles(d, c):
    return max(math.ceil(c / FEATURE_TILE), math.ceil(d / FEATURE_TILE), 1)


def forward_cost(n, m, d, c, normalize, symmetric, element_bytes, batch=1):
    """(flops, bytes, pair evaluations) of one forward call."""
    pairs = 2 if symmetric else 1
    c_tiles = max(math.ceil(c / FEATURE_TILE), 1)
    recompute = 2 * n * m * d * pairs
    flops = c_tiles * (recompute + 2 * n * m * min(c, FEATURE_TILE)) if c > FEATURE_TILE else recompute + 2 * n * m * c
    evaluations = n * m * pairs * c_tiles
    read = (n + m) * d + m * c + n * c  # q, k, v, u (u: diffusion; counted always, an upper bound)
    written = n * c + n
    if normalize == "sym":
        flops += recompute
        evaluations += n * m * pairs
        read += (n + m) * d
        written += m
    return batch * flops, batch * (read + written) * element_bytes, batch * evaluations


def backward_cost(n, m, d, c, normalize, symmetric, element_bytes, batch=1):
    """(flops, bytes, pair evaluations) of one backward call."""
    pairs = 2 if symmetric else 1
    tiles = _feature_tiles(d, c)
    recompute = 2 * n * m * d * pairs + 2 * n * m * c  # S (and S'), dâ = G vᵀ
    column_passes = 2 if normalize == "sym" else 1
    flops = tiles * (column_passes * recompute + recompute)
    flops += 2 * n * m * c  # dv = Âᵀ G (column pass)
    flops += 2 * n * m * d * pairs * 2  # dk (+dq') in the column pass, dq (+dk') in the row pass
    evaluations = tiles * (column_passes + 1) * n * m * pairs
    read = (column_passes + 1) * tiles * ((n + m) * d + m * c + n * c) + 2 * n * c
    written = m * c + 2 * (n + m) * d + n * c + n
    return batch * flops, batch * (read + written) * element_bytes, batch * evaluations


def peak_time(flops, nbytes, peak_flops=PEAK_FLOPS):
    return max(flops / peak_flops, nbytes / PEAK_BYTES)


def rows(n, m, d, c, element_bytes, batch=1, peak_flops=PEAK_FLOPS):
    for kernel, normalize, symmetric in itertools.product(AFFINITIES, NORMALIZATIONS, (False, True)):
        if symmetric and n != m:
            continue
        for name, cost in (("fwd", forward_cost), ("bwd", backward_cost)):
            flops, nbytes, evaluations = cost(n, m, d, c, normalize, symmetric, element_bytes, batch)
            yield dict(kernel=kernel, normalize=normalize, symmetric=symmetric, pass_=name, flops=flops,
                       bytes=nbytes, pair_evaluations=evaluations, peak_seconds=peak_time(flops, nbytes, peak_flops))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--m", type=int, default=None)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--c", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    args = parser.parse_args(argv)
    m = args.n if args.m is None else args.m
    element_bytes = 4 if args.dtype == "fp32" else 2
    peak_flops = PEAK_FLOPS_BY_DTYPE[args.dtype]
    print(f"H100 peak model: {peak_flops / 1e12:.0f} TFLOP/s, {PEAK_BYTES / 1e12:.2f} TB/s; "
          f"N={args.n} M={m} D={args.d} C={args.c} batch={args.batch} {args.dtype} "
          "(update does not change the counts; affinity kernels differ only in pair evaluations' cost)")
    print(f"{'normalize':<9} {'symm':<5} {'pass':<4} {'GFLOP':>9} {'MB':>9} {'Gpairs':>8} {'peak us':>9} {'bound':>7}")
    seen = set()
    for r in rows(args.n, m, args.d, args.c, element_bytes, args.batch, peak_flops):
        key = (r["normalize"], r["symmetric"], r["pass_"])
        if key in seen:  # identical for every affinity kernel
            continue
        seen.add(key)
        bound = "math" if r["flops"] / peak_flops >= r["bytes"] / PEAK_BYTES else "memory"
        print(f"{r['normalize']:<9} {str(r['symmetric']):<5} {r['pass_']:<4} {r['flops'] / 1e9:>9.2f} "
              f"{r['bytes'] / 1e6:>9.2f} {r['pair_evaluations'] / 1e9:>8.3f} {r['peak_seconds'] * 1e6:>9.1f} {bound:>7}")


if __name__ == "__main__":
    main()
