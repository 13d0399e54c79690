"""Cost of direct differences against the GEMM form of ρ, per feature count D (reference and chunked).

Times forward+backward of ``kernel="fractional"``, ``normalize="row"``, N = M (default 512), C = 16,
float32, with ``DIRECT_DIFFERENCES_MAX_FEATURES`` set to send every D through one form or the other;
prints the best of ``--repeat`` runs and the ratio direct/GEMM. One thread, timed in process CPU
time, so that other load on the machine changes the numbers little.

    .venv/bin/python bench/direct_differences.py [--n 512] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time

import torch

import nonlocal_ext
from nonlocal_ext import kernels


def best_seconds(backend, q, k, v, repeat):
    times = []
    for _ in range(repeat + 1):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        start = time.process_time()
        out = nonlocal_ext.nonlocal_aggregate(*leaves, "fractional", power=3.0, backend=backend)
        torch.autograd.grad(out, leaves, torch.ones_like(out))
        times.append(time.process_time() - start)
    return min(times[1:])


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--features", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    saved = kernels.DIRECT_DIFFERENCES_MAX_FEATURES
    print(f"{'backend':>9} {'D':>3} {'GEMM ms':>9} {'direct ms':>10} {'ratio':>6}")
    try:
        for backend in ("reference", "chunked"):
            for d in args.features:
                g = torch.Generator().manual_seed(d)
                q, k = torch.rand(args.n, d, generator=g), torch.rand(args.n, d, generator=g)
                v = torch.randn(args.n, 16, generator=g)
                kernels.DIRECT_DIFFERENCES_MAX_FEATURES = 0
                gemm = best_seconds(backend, q, k, v, args.repeat)
                kernels.DIRECT_DIFFERENCES_MAX_FEATURES = 1 << 30
                direct = best_seconds(backend, q, k, v, args.repeat)
                print(f"{backend:>9} {d:3d} {1e3 * gemm:9.1f} {1e3 * direct:10.1f} {direct / gemm:6.2f}")
    finally:
        kernels.DIRECT_DIFFERENCES_MAX_FEATURES = saved


if __name__ == "__main__":
    main()
