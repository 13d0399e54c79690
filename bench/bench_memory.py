"""Peak memory of one forward+backward, per backend, each case in a fresh process.

    .venv/bin/python bench/bench_memory.py                       # N = 16384, reference vs chunked
    .venv/bin/python bench/bench_memory.py --n 32768 --backends chunked

The child process builds the inputs (float32, N = M, D = 64, C = 128, batch 1), reads its
resident set size, resets the kernel's peak counter (``/proc/self/clear_refs``), runs
forward+backward once and reports the peak RSS growth. Linux only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(backend, kernel, normalize, n, d, c, power):
    import torch

    import nonlocal_ext

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(n, d, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(n, c, generator=g).requires_grad_()
    kwargs = {"power": power} if kernel == "fractional" else {}
    # warm up on a small problem so one-time allocations (thread pools, kernels) are not counted
    small = [t.detach()[:64].clone().requires_grad_() for t in (q, k, v)]
    nonlocal_ext.nonlocal_aggregate(*small, kernel, normalize=normalize, backend=backend, **kwargs).sum().backward()
    baseline = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    start = time.perf_counter()
    out = nonlocal_ext.nonlocal_aggregate(q, k, v, kernel, normalize=normalize, backend=backend, **kwargs)
    out.backward(torch.ones_like(out))
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    print(json.dumps({"backend": backend, "kernel": kernel, "normalize": normalize, "N": n, "D": d, "C": c,
                      "seconds": seconds, "baseline_mb": baseline / 1024, "peak_growth_mb": (peak - baseline) / 1024}))


def measure(backend, kernel, normalize, n, d, c, power):
    cmd = [sys.executable, __file__, "--child", backend, "--kernel", kernel, "--normalize", normalize,
           "--n", str(n), "--d", str(d), "--c", str(c), "--power", str(power)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"backend": backend, "N": n, "error": done.stderr.strip().splitlines()[-1] if done.stderr else
                f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="16384", help="comma list of N (= M)")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--c", type=int, default=128)
    parser.add_argument("--kernel", default="fractional")
    parser.add_argument("--normalize", default="row")
    parser.add_argument("--power", type=float, default=2.5)
    parser.add_argument("--backends", default="reference,chunked")
    parser.add_argument("--child", metavar="BACKEND", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.kernel, args.normalize, int(args.n), args.d, args.c, args.power)
    print(f"forward+backward, float32, {args.kernel}+{args.normalize}, D={args.d}, C={args.c}, batch 1, "
          "one fresh process per row")
    header = f"{'backend':<10} {'N':>6} {'peak RSS growth MB':>19} {'time s':>7}"
    print(header)
    print("-" * len(header))
    for n in (int(x) for x in args.n.split(",")):
        for backend in args.backends.split(","):
            r = measure(backend, args.kernel, args.normalize, n, args.d, args.c, args.power)
            if "error" in r:
                print(f"{backend:<10} {n:>6} {'error: ' + r['error']}")
            else:
                print(f"{backend:<10} {n:>6} {r['peak_growth_mb']:>19.1f} {r['seconds']:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
