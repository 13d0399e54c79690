"""Peak RSS growth of one forward+backward in a fresh process — now measured by ``nonlocal-bench``.

Kept for scripts that import it (``bench/bench_cpu.py``); the measurement itself lives in
``nonlocal_ext.benchmark`` (one fresh process per case, forked from a forkserver, peak RSS reset
through /proc/self/clear_refs). From the command line use the CLI instead, e.g.

    .venv/bin/nonlocal-bench --kernel fractional --n 16384 --pass fwd+bwd --backends reference,chunked --repeat 1
"""

from __future__ import annotations

from nonlocal_ext.benchmark import fresh_process
from nonlocal_ext.benchmark.cases import Case


def measure(backend, kernel, normalize, n, d, c, power=None):
    """``{"backend", "N", "peak_growth_mb", "seconds"}`` of one forward+backward (float32, N = M,
    batch 1), or ``{"backend", "N", "error"}``. The kernel's parameters are nonlocal-bench's
    (``power`` is accepted for compatibility; it does not change the memory)."""
    case = Case(kernel, normalize, "aggregate", n, n, d, c, 1, "float32", "cpu", "fwd+bwd")
    result = fresh_process.measure(case, backend)
    if "error" in result:
        return {"backend": backend, "N": n, "error": result["error"]}
    return {"backend": backend, "N": n, "peak_growth_mb": result["peak_mb"], "seconds": result["seconds"]}
