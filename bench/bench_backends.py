"""CPU benchmark of the PyTorch backends: reference (dense) vs chunked vs linear.

    .venv/bin/python bench/bench_backends.py            # the table `make bench` prints
    .venv/bin/python bench/bench_backends.py --n 1024,4096 --repeat 5

Times are the best of ``--repeat`` runs after one warm-up, all measured in this one process;
the ratio column is reference time / backend time for the same case, so it does not depend on
how loaded the machine is as much as absolute times do. GFLOP/s counts the forward's
2·N·M·(D+C) FLOPs of the dense computation (forward+backward counts three times that); it is
left out for the linear path, which does not do that work.
"""

from __future__ import annotations

import argparse
import time

import torch

import nonlocal_ext

CASES = [  # (kernel, normalize, kernel kwargs, backends)
    ("gaussian", "row", {"scale": 0.125}, ("reference", "chunked")),
    ("fractional", "row", {"power": 2.5}, ("reference", "chunked")),
    ("dot", "row", {}, ("reference", "chunked", "linear")),
]


def time_call(fn, repeat):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def make_case(n, d, c, backend, kernel, normalize, kwargs, with_backward):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, d, generator=g).requires_grad_(with_backward)
    k = torch.randn(n, d, generator=g).requires_grad_(with_backward)
    v = torch.randn(n, c, generator=g).requires_grad_(with_backward)
    if kernel == "dot":
        q, k = (t.detach().abs().requires_grad_(with_backward) for t in (q, k))

    def run():
        out = nonlocal_ext.nonlocal_aggregate(q, k, v, kernel, normalize=normalize, backend=backend, **kwargs)
        if with_backward:
            out.backward(torch.ones_like(out))
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="1024,4096,16384", help="comma list of N (= M)")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--c", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-dense-n", type=int, default=16384,
                        help="skip the dense reference above this N (its N×N matrices stop fitting)")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.n.split(",")]
    d, c = args.d, args.c
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, D={d}, C={c}, batch 1, "
          f"best of {args.repeat} ({max(1, args.repeat - 1)} at N >= 16384)")
    header = f"{'kernel':<10} {'normalize':<9} {'N':>6} {'pass':<8} {'backend':<9} {'time ms':>9} " \
             f"{'vs ref':>7} {'GFLOP/s':>8}"
    print(header)
    print("-" * len(header))
    for kernel, normalize, kwargs, names in CASES:
        for n in sizes:
            for pass_name, with_backward in (("fwd", False), ("fwd+bwd", True)):
                flops = 2.0 * n * n * (d + c) * (3 if with_backward else 1)
                ref_time = None
                for backend in names:
                    if backend == "reference" and n > args.max_dense_n:
                        continue
                    seconds = time_call(make_case(n, d, c, backend, kernel, normalize, kwargs, with_backward),
                                        args.repeat if n < 16384 else max(1, args.repeat - 1))
                    if backend == "reference":
                        ref_time = seconds
                    ratio = f"{ref_time / seconds:6.2f}x" if ref_time else "-"
                    # the linear path does not do the dense FLOPs: a rate would mislead
                    rate = "-" if backend == "linear" else f"{flops / seconds / 1e9:.1f}"
                    print(f"{kernel:<10} {normalize:<9} {n:>6} {pass_name:<8} {backend:<9} {seconds * 1e3:>9.1f} "
                          f"{ratio:>7} {rate:>8}", flush=True)


if __name__ == "__main__":
    main()
