"""Peak RSS growth of one benchmark step, each in a fresh process (CPU).

Every case runs in a new process, forked from a multiprocessing *forkserver* that has imported
torch and nonlocal_ext but never run an op: the process starts with a fresh heap, no allocator
caches and no worker threads, without paying ~2 s to import torch again per case. The process
builds the case's inputs, warms up on a tiny case, resets the kernel's peak-RSS counter and runs
the step once (:func:`peak_rss_growth`). The server is started once, on first use;
it is a separate program, so nothing the sweep has done in this process is inherited.

The kernel's high-water mark ``VmHWM`` is reset through ``/proc/self/clear_refs`` just before the
step, so the allocator's cache and earlier cases cannot hide or inflate it (Linux only; elsewhere
:func:`peak_mb` gives nothing and the column is empty). The fresh process also has glibc map every
block of 64 KiB or more on its own and unmap it when freed (:func:`exact_rss`): with glibc's default,
adaptive threshold, freed tensors stay in the heap or not depending on the order of earlier
allocations, and the same step's peak varied by ±15 MB between runs (bench/NOTES.md, "Peak memory
of a layer step"). The step is :func:`.measure.make_step`'s:
this module imports :mod:`.measure`, which does not import it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing
import os
import time

import torch  # imported here so that the forkserver preloads it

from .cases import Case
from .measure import make_step
from .runners import Runner, all_runners

_context = None


def _forkserver():
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])  # torch, nonlocal_ext and this module; not __main__
        _context = context
    return _context


def _run(request: dict, connection) -> None:
    """In the fresh process: measure, send ``{"peak_mb": MB, "seconds": s}`` or ``{"error": message}``."""
    exact_rss()
    torch.set_num_threads(request["threads"])  # as in the sweep's process
    try:
        result = peak_rss_growth(request["case"], all_runners()[request["runner"]])
    except Exception as error:  # noqa: BLE001 - reported as the row's error
        result = {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
    connection.send(result)
    connection.close()


def measure(case: Case, runner_name: str, timeout: float = 1800) -> dict:
    """``{"peak_mb": MB, "seconds": s}`` of one step of the case in a fresh process, or ``{"error": message}``."""
    context = _forkserver()
    receive, send = context.Pipe(duplex=False)
    request = {"case": case, "runner": runner_name, "threads": torch.get_num_threads()}
    process = context.Process(target=_run, args=(request, send), daemon=True)
    process.start()
    send.close()
    try:
        if not receive.poll(timeout):
            process.kill()
            return {"error": f"peak-memory process timed out after {timeout:.0f} s"}
        result = receive.recv()
    except EOFError:  # the process died without an answer
        result = None
    finally:
        receive.close()
        process.join()
    if result is None:
        if process.exitcode == -9:
            return {"error": "out of memory (the peak-memory process was killed)"}
        return {"error": f"peak-memory process exited with {process.exitcode}"}
    return result


def peak_mb(case: Case, runner_name: str) -> tuple[float | None, str | None]:
    """(peak RSS growth in MB, None) of one step of the case in a fresh process, or (None, error message).

    (None, None) where the peak RSS cannot be reset (not Linux): the column stays empty.
    """
    if not os.path.exists("/proc/self/clear_refs"):
        return None, None
    result = measure(case, runner_name)  # starts the forkserver on first use
    return result.get("peak_mb"), result.get("error")


# ------------------------------------------------------------------ in the fresh process

def small_case(case: Case) -> Case:
    """A tiny case of the same kind, for warming up one-time allocations."""
    n = min(case.N, 64)
    return dataclasses.replace(case, N=n, M=n if case.M == case.N else min(case.M, 48))


#: glibc's mallopt parameter M_MMAP_THRESHOLD, and the threshold exact_rss sets.
_M_MMAP_THRESHOLD = -3
_MMAP_BYTES = 64 << 10


def exact_rss() -> None:
    """Make this process's RSS follow its live allocations: glibc serves every block of 64 KiB or more
    (every tensor of more than 16 Ki floats) by a mapping of its own, returned to the system when freed.
    Setting the threshold also turns off glibc's adaptive threshold. No-op without glibc."""
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, _MMAP_BYTES)
    except (OSError, AttributeError):
        pass


def rss_kib(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} is not in /proc/self/status")


def peak_rss_growth(case: Case, runner: Runner) -> dict:
    """``{"peak_mb": peak RSS growth of one step, "seconds": its time}``, in this (fresh) process."""
    warm = small_case(case)
    try:
        make_step(warm, runner.build(warm), warm.inputs())()
    except Exception:  # noqa: BLE001 - warming up is best effort; the real step reports errors
        pass
    step = make_step(case, runner.build(case), case.inputs())
    baseline = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return {"peak_mb": (rss_kib("VmHWM") - baseline) / 1024, "seconds": seconds}
