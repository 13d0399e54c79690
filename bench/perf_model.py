"""The work-model report: executed/needed tensor-core work of the fused kernels, and predicted H100 times.

    .venv/bin/python bench/perf_model.py                 # the whole report (no GPU needed)
    .venv/bin/python bench/perf_model.py --shape 16,196,49,512,512 --kernel fractional --normalize count

The model is :mod:`nonlocal_ext.triton_kernels.work_model` (its docstring says what is counted and
which efficiencies are assumed); tests/test_triton.py checks its FLOP counts against the interpreter's
exact count of ``tl.dot`` work, tests/test_work_model.py its ratios and ``auto``'s decisions. Sections:

1. executed / needed tensor-core work at D = C ∈ {64, …, 1024}, before (the tiling of the previous
   kernels: 64-wide feature tiles, every program recomputing the tile over all of D) and now, over
   every kernel × normalization × update × symmetric × dtype (max over them, and gaussian + row), and
   the same work as the warps issue it (instruction tiles that several warps repeat counted each time);
2. the nonlocal-block suite (B, N, M, D = C): predicted H100 forward + backward times of the fused,
   dense and SDPA paths, the dense path's N×M memory and ``auto``'s choice (budget: 80 GB × the
   default fraction of free memory; a real call uses the device's free memory).
"""

from __future__ import annotations

import argparse
import itertools

from nonlocal_ext.aot import AFFINITIES, DTYPES
from nonlocal_ext.backends import cuda_choice
from nonlocal_ext.spec import NORMALIZATIONS, UPDATES
from nonlocal_ext.triton_kernels import work_model
from nonlocal_ext.triton_kernels.work_model import Call, fused_work

KERNELS = AFFINITIES  # the kernels the fused Triton path runs on CUDA (dot takes the linear path)
H100_BYTES = 80e9

#: The tiles of the kernels before wide feature tiles (the interpreter's 32×32 rows × keys, 64-wide
#: GEMM slices, 64-wide feature tiles for every output), as the issue counted them.
BEFORE = {"forward": dict(BLOCK_I=32, BLOCK_J=32, BLOCK_D=64, BLOCK_C=64),
          "column_sums": dict(BLOCK_I=32, BLOCK_J=32, BLOCK_D=64, BLOCK_C=64),
          "column": dict(BLOCK_I=32, BLOCK_J=32, BLOCK_D=64, BLOCK_C=64, OUT_D=64, OUT_C=64),
          "row": dict(BLOCK_I=32, BLOCK_J=32, BLOCK_D=64, BLOCK_C=64, OUT_D=64, OUT_C=64)}


def _calls(width, n=4096, m=1024):
    for kernel, normalize, update, symmetric, dtype in itertools.product(
            KERNELS, NORMALIZATIONS, UPDATES, (False, True), DTYPES):
        yield Call(1, n, n if symmetric else m, width, width, kernel, normalize, update, symmetric, dtype)


def ratio_table(widths=(64, 128, 256, 512, 1024)) -> str:
    lines = ["executed / needed tensor-core work (N = 4096, M = 1024; M = N with symmetric); issued: as the warps "
             "issue it on sm_90 (repeated instruction tiles included)",
             f"{'D = C':>6}  {'gaussian+row fwd':>16} {'bwd':>5}  {'before fwd':>10} {'bwd':>5}  "
             f"{'max over all variants fwd':>25} {'bwd':>5}  {'issued, g+r fp16 fwd':>20} {'bwd':>5}  "
             f"{'issued, max fwd':>15} {'bwd':>5}"]
    for width in widths:
        base = Call(1, 4096, 1024, width, width, "gaussian", "row", "aggregate", False, "fp16")
        passes = ("forward", "backward")
        works = [fused_work(base, p) for p in passes]
        every = [[fused_work(call, p) for call in _calls(width)] for p in passes]
        now = [w["ratio"] for w in works]
        issued = [w["issued_ratio"] for w in works]
        before = [fused_work(base, p, blocks=BEFORE)["ratio"] for p in passes]
        worst = [max(w["ratio"] for w in pass_works) for pass_works in every]
        worst_issued = [max(w["issued_ratio"] for w in pass_works) for pass_works in every]
        lines.append(f"{width:>6}  {now[0]:>16.2f} {now[1]:>5.2f}  {before[0]:>10.2f} {before[1]:>5.2f}  "
                     f"{worst[0]:>25.2f} {worst[1]:>5.2f}  {issued[0]:>20.2f} {issued[1]:>5.2f}  "
                     f"{worst_issued[0]:>15.2f} {worst_issued[1]:>5.2f}")
    return "\n".join(lines)


def _us(seconds):
    return "n/a" if seconds is None else f"{seconds * 1e6:.0f}"


def suite_table(kernel="gaussian", normalize="row", dtype="fp16") -> str:
    budget = cuda_choice.DENSE_BUDGET_FRACTION * H100_BYTES
    lines = [f"nonlocal-block suite, {kernel} + {normalize}, {dtype}, forward + backward, predicted H100 µs "
             f"(dense budget {budget / 1e9:.0f} GB)",
             f"{'shape':<13} {'B':>3} {'N':>5} {'M':>5} {'D=C':>5} {'fused':>7} {'ratio f/b':>10} {'issued f/b':>11} "
             f"{'dense':>7} {'dense GB':>8} {'sdpa':>6}  auto"]
    for name, call in work_model.suite_calls(kernel, normalize, dtype).items():
        times = work_model.predictions(call, training=True)
        works = [fused_work(call, p) for p in ("forward", "backward")]
        ratios = "/".join(f"{w['ratio']:.2f}" for w in works)
        issued = "/".join(f"{w['issued_ratio']:.2f}" for w in works)
        choice = cuda_choice.choose(call, True, budget)
        lines.append(f"{name:<13} {call.batch:>3} {call.n:>5} {call.m:>5} {call.d:>5} {_us(times['fused']):>7} "
                     f"{ratios:>10} {issued:>11} {_us(times['dense']):>7} {work_model.dense_bytes(call) / 1e9:>8.2f} "
                     f"{_us(times['sdpa']):>6}  {choice}")
    return "\n".join(lines)


def shape_table(call: Call) -> str:
    lines = [f"{call}",
             f"{'pass':<9} {'dot GFLOP':>9} {'issued':>8} {'tensor GFLOP':>12} {'needed':>8} {'ratio':>6} {'HBM MB':>8} "
             f"{'L2 MB':>8} {'fused us':>8} {'dense us':>8} {'sdpa us':>8}"]
    for p in ("forward", "backward"):
        w = fused_work(call, p)
        lines.append(f"{p:<9} {w['dot_flops'] / 1e9:>9.2f} {w['issued_flops'] / 1e9:>8.2f} {w['tensor_flops'] / 1e9:>12.2f} "
                     f"{w['needed_flops'] / 1e9:>8.2f} {w['ratio']:>6.2f} {w['hbm_bytes'] / 1e6:>8.1f} "
                     f"{w['loaded_bytes'] / 1e6:>8.1f} {_us(work_model.predict_fused(call, p)):>8} "
                     f"{_us(work_model.predict_dense(call, p)):>8} {_us(work_model.predict_sdpa(call, p)):>8}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", help="B,N,M,D,C: one call's table instead of the report")
    parser.add_argument("--kernel", default="gaussian", choices=KERNELS)
    parser.add_argument("--normalize", default="row", choices=NORMALIZATIONS)
    parser.add_argument("--update", default="aggregate", choices=UPDATES)
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--dtype", default="fp16", choices=DTYPES)
    args = parser.parse_args(argv)
    if args.shape:
        b, n, m, d, c = (int(x) for x in args.shape.split(","))
        print(shape_table(Call(b, n, m, d, c, args.kernel, args.normalize, args.update, args.symmetric, args.dtype)))
        return
    print(ratio_table())
    for kernel, normalize, dtype in (("gaussian", "row", "fp16"), ("fractional", "count", "fp16"),
                                     ("rbf", "row", "fp32")):
        print()
        print(suite_table(kernel, normalize, dtype))


if __name__ == "__main__":
    main()
