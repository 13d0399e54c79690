"""How time, peak memory and correctness are measured.

**Time.** :func:`make_step` turns a runner and a case into the one step that is timed (see
:mod:`.cases` for the three passes). :func:`time_step` calls it ``warmup`` times, then
``repeat`` times, each timed alone — with ``time.perf_counter`` on CPU (the CPU ops are
synchronous), with CUDA events around the step on GPU — and the row reports the median.

**GEMM rate.** :func:`gemm_gflops` times ``torch.mm`` of two square matrices in the case's
dtype and device the same way: the machine's practical peak, against which a row's GFLOP/s is
given as a percentage.

**Peak memory**, as growth over what existed before the step (the inputs, and for ``bwd`` the
graph the forward left): on CUDA ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, in this process (:func:`cuda_peak_mb`); on CPU the peak resident set
size of a fresh process per case, measured by :mod:`.fresh_process` around the step of
:func:`make_step` (that module uses this one, not the other way round).

**Check.** :func:`check` compares a runner's output (and, when its pass has a backward, the
gradients of every input for a random upstream G) with the dense reference evaluated in
float64, by the test suite's rule (:mod:`nonlocal_ext.testing`): ``err ≤ 2·err(reference in the same
dtype) + TOLERANCE[dtype]·max(max|truth|, 1)``.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from nonlocal_ext.testing import error_and_bound

from .cases import Case
from .runners import Runner, our_runners

#: Repeats of one timing disagree when (max − min)/median exceeds this fraction: the row gets a
#: warning (``nonlocal-bench --spread-limit`` changes it). On a quiet machine CPU repeats of a
#: millisecond-scale step agree within a few percent; time slices taken by other processes add
#: whole scheduler quanta (several ms) to some repeats only.
SPREAD_LIMIT = 0.25

#: ``--check`` runs the float64 dense reference on at most this many affinities B·N·M (a few
#: hundred MB); larger row-local cases are checked on their first rows, forward only.
CHECK_MAX_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------- time

def make_step(case: Case, fn, inputs, seed: int = 1):
    """The callable that one timing sample runs, for the case's pass (``bwd`` runs its forward here)."""
    q, k, v, u = inputs
    if case.pass_ == "fwd":
        def forward():
            with torch.no_grad():
                return fn(q, k, v, u)
        return forward

    leaves = [t.detach().requires_grad_() for t in (q, k, v, u) if t is not None]
    args = leaves if u is not None else leaves + [None]
    grad_out = torch.randn(case.batch, case.N, case.C, generator=torch.Generator().manual_seed(seed))
    grad_out = grad_out.to(device=case.device, dtype=case.torch_dtype)
    if case.pass_ == "bwd":
        out = fn(*args)

        def backward():
            return torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
        return backward

    def forward_backward():
        return torch.autograd.grad(fn(*args), leaves, grad_out)
    return forward_backward


def _synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_step(step, device: str, repeat: int, warmup: int = 1, min_seconds: float = 0.0) -> list[float]:
    """Seconds per call of ``repeat`` samples, after ``warmup`` untimed calls. A sample times one call, or, where
    one call takes less than ``min_seconds``, enough calls back to back to last that long and gives their mean (as
    ``timeit`` does): a sub-millisecond call timed alone reads the timer's and the scheduler's noise as much as its
    own time."""
    for _ in range(warmup):
        step()
    _synchronize(device)
    calls = 1
    if min_seconds > 0:
        once = _timed(step, device, 1)
        calls = max(1, math.ceil(min_seconds / max(once, 1e-9)))
    return [_timed(step, device, calls) / calls for _ in range(repeat)]


def _timed(step, device: str, calls: int) -> float:
    """Seconds of ``calls`` calls of ``step`` back to back (CUDA events on GPU)."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return time.perf_counter() - start


def gemm_gflops(device: str, dtype: torch.dtype, size: int = 2048, repeat: int = 5) -> float:
    """GFLOP/s of ``torch.mm`` on two size×size matrices (2·size³ FLOPs), median of ``repeat``."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    seconds = statistics.median(time_step(lambda: torch.mm(a, b), device, repeat, warmup=2))
    return 2.0 * size ** 3 / seconds / 1e9


# --------------------------------------------------------------------------------- memory

def available_bytes(device: str) -> float:
    """Memory a case may still use: MemAvailable on CPU, free device memory on CUDA."""
    if device.startswith("cuda"):
        return float(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def memory_guard(case: Case, runner: Runner) -> str | None:
    """Why a runner that materializes N×M temporaries should not be started (None: it fits)."""
    if not runner.dense_temporaries:
        return None
    element = max(torch.empty((), dtype=case.torch_dtype).element_size(), 4)
    need = runner.dense_temporaries * case.batch * case.N * case.M * element
    have = available_bytes(case.device)
    if need > 0.8 * have:
        return (f"not run: its N×M temporaries need ~{need / 2**30:.1f} GiB, "
                f"{have / 2**30:.1f} GiB available")
    return None


def cuda_peak_mb(step, device: str) -> float:
    """Peak allocator growth of one step, in MB (CUDA)."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ---------------------------------------------------------------------------------- check

def _outputs(fn, inputs, grad_out):
    """The output, and the gradients of every input tensor when ``grad_out`` is given."""
    if grad_out is None:
        with torch.no_grad():
            return [fn(*inputs)]
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, present, grad_out.to(out.dtype), allow_unused=True)
    return [out.detach()] + [torch.zeros_like(t) if g is None else g for t, g in zip(present, grads)]


def check(case: Case, runner: Runner, inputs) -> tuple[str | None, str]:
    """(mismatch message or None, what was checked) for one runner on one case."""
    if runner.name == "reference":
        return None, "reference"
    q, k, v, u = inputs
    affinities = case.batch * case.N * case.M
    rows = None
    if affinities > CHECK_MAX_ELEMENTS:
        if case.normalize not in ("none", "count", "row"):
            return None, "skipped (too large for the float64 reference)"
        rows = max(1, CHECK_MAX_ELEMENTS // (case.batch * case.M))
        if case.update == "diffusion" and u is None:
            u = v[:, :rows]
        q, u = q[:, :rows], None if u is None else u[:, :rows]
    with_grads = case.needs_backward and rows is None
    grad_out = None
    if with_grads:
        grad_out = torch.randn(case.batch, case.N, case.C, generator=torch.Generator().manual_seed(2))
        grad_out = grad_out.to(device=case.device, dtype=torch.float64)

    reference = our_runners()["reference"].build(case)
    ours = _outputs(runner.build(case), (q, k, v, u), grad_out)
    plain = _outputs(reference, (q, k, v, u), grad_out)
    truth = _outputs(reference, tuple(None if t is None else t.double() for t in (q, k, v, u)), grad_out)
    names = ["output", "d query", "d key", "d value", "d self_value"]
    for name, a, p, t in zip(names, ours, plain, truth):
        if a.shape != t.shape:
            return f"check: {name} has shape {tuple(a.shape)}, expected {tuple(t.shape)}", "failed"
        err, bound, err_plain, _ = error_and_bound(a, p, t, case.torch_dtype, floor=1.0)
        if not err <= bound:
            return (f"check: {name} differs from the float64 reference by {err:.2e} "
                    f"(bound {bound:.2e}, reference in {case.dtype} {err_plain:.2e})"), "failed"
    what = "output and gradients" if with_grads else "output"
    return None, what + ("" if rows is None else f" (first {rows} rows)")
