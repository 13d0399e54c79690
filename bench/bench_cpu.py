"""The figures of the fused CPU kernels (backend="cpu"), each ratio measured in this one run.

    .venv/bin/python bench/bench_cpu.py                 # all four figures (about 3 minutes)
    .venv/bin/python bench/bench_cpu.py --skip-memory    # without the N = 32768 memory run

float32, N = M, D = 64, C = 128, batch 1, the machine's threads. Times are the best of
``--repeat`` runs after a warm-up; "x" columns are (peer time) / (cpu time).

1. N = 4096: forward and forward+backward of gaussian+row and fractional+row, cpu vs the dense
   reference; forward of gaussian+row vs torch's scaled_dot_product_attention.
2. N = 16384 forward: GFLOP/s counting 2·N·M·(D+C) FLOPs, as a fraction of the SGEMM rate
   (torch.mm of two 4096² float32 matrices) measured at the start of this run.
3. N = 32768 forward+backward: peak RSS growth in a fresh process (nonlocal-bench's measurement).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import nonlocal_ext
from nonlocal_ext.benchmark import fresh_process
from nonlocal_ext.benchmark.cases import Case
from nonlocal_ext.benchmark.measure import time_step

CASES = {  # kernel -> keyword arguments (gaussian: 1/√D, the attention scale)
    "gaussian": {"scale": 0.125},
    "fractional": {"power": 2.5},
}


def best_time(fn, repeat):
    """Seconds of the fastest of ``repeat`` calls after one warm-up (nonlocal-bench's timer)."""
    return min(time_step(fn, "cpu", repeat, warmup=1))


def sgemm_rate(repeat):
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    return 2 * 4096**3 / best_time(lambda: torch.mm(a, b), repeat)


def inputs(n, d, c, requires_grad):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, size, generator=g).requires_grad_(requires_grad) for size in (d, d, c)]


def runner(backend, kernel, n, d, c, with_backward):
    q, k, v = inputs(n, d, c, with_backward)
    grad = torch.ones(n, c)

    def run():
        if backend == "sdpa":  # softmax(scale·q kᵀ) v: gaussian + row
            out = F.scaled_dot_product_attention(q[None], k[None], v[None], scale=CASES["gaussian"]["scale"])[0]
        else:
            out = nonlocal_ext.nonlocal_aggregate(q, k, v, kernel, normalize="row", backend=backend, **CASES[kernel])
        if with_backward:
            out.backward(grad)
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--c", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)
    d, c, repeat = args.d, args.c, args.repeat
    rate = sgemm_rate(repeat)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, D={d}, C={c}, batch 1, "
          f"best of {repeat}; SGEMM {rate / 1e9:.0f} GFLOP/s")

    print("\n1. N = 4096")
    print(f"{'kernel':<11} {'pass':<8} {'cpu ms':>8} {'dense ms':>9} {'x dense':>8} {'sdpa ms':>8} {'x sdpa':>7}")
    for kernel in CASES:
        for pass_name, with_backward in (("fwd", False), ("fwd+bwd", True)):
            ours = best_time(runner("cpu", kernel, 4096, d, c, with_backward), repeat)
            dense = best_time(runner("reference", kernel, 4096, d, c, with_backward), repeat)
            line = f"{kernel:<11} {pass_name:<8} {ours * 1e3:8.1f} {dense * 1e3:9.1f} {dense / ours:7.2f}x"
            if kernel == "gaussian" and not with_backward:
                sdpa = best_time(runner("sdpa", kernel, 4096, d, c, False), repeat)
                line += f" {sdpa * 1e3:8.1f} {sdpa / ours:6.2f}x"
            print(line)

    print("\n2. N = 16384 forward, 2·N²·(D+C) FLOPs")
    print(f"{'kernel':<11} {'cpu ms':>8} {'GFLOP/s':>8} {'of SGEMM':>9}")
    flops = 2.0 * 16384 * 16384 * (d + c)
    for kernel in CASES:
        seconds = best_time(runner("cpu", kernel, 16384, d, c, False), max(2, repeat // 2))
        print(f"{kernel:<11} {seconds * 1e3:8.0f} {flops / seconds / 1e9:8.1f} {flops / seconds / rate:8.0%}")

    if not args.skip_memory:
        print("\n3. N = 32768 forward+backward, fresh process: peak RSS growth")
        for kernel in CASES:  # the kernel's parameters are nonlocal-bench's; they do not change the memory
            case = Case(kernel, "row", "aggregate", 32768, 32768, d, c, 1, "float32", "cpu", "fwd+bwd")
            result = fresh_process.measure(case, "cpu")
            if "error" in result:
                print(f"{kernel:<11} {result['error']}")
            else:
                print(f"{kernel:<11} {result['peak_mb']:8.1f} MB in {result['seconds']:.1f} s")


if __name__ == "__main__":
    main()
