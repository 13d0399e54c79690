"""The sweep: every case × every runner → one row.

For each case the inputs are built once and shared by its runners, the reference first (its
time is the ``vs ref`` of the others). Per runner, in this order:

1. ``reason``: a runner that cannot express the case is absent, or — when it was named in
   ``--backends`` — an error row with the reason;
2. a runner that materializes N×M temporaries is not started when they cannot fit in memory;
3. ``--check``: a mismatch against the float64 reference is an error row, and no timing;
4. on CPU, peak memory in a fresh process, *before* timing here: a case that runs out of
   memory kills that process, not the sweep;
5. timing (and peak memory on CUDA); an exception such as out-of-memory is an error row.

Every row also records where it was measured (:func:`environment`: torch and triton versions,
threads, CPUs and the load average at that moment) and, in ``warning``, why its time may not be
trusted: the load average above the CPUs, or repeats that disagree by more than
``Options.spread_limit`` ((max − min)/median).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import statistics
from dataclasses import dataclass

import torch

from . import fresh_process, measure
from .cases import Case
from .report import ROW_KEYS
from .runners import Runner


@dataclass
class Options:
    repeat: int = 5
    warmup: int = 1
    check: bool = False
    memory: bool = True  # CPU: a fresh process per case
    spread_limit: float = measure.SPREAD_LIMIT  # warn when (max − min)/median of the repeats exceeds it
    min_sample_seconds: float = 0.0  # a sample of a shorter call is the mean of calls lasting this long


@functools.lru_cache(maxsize=None)
def _versions() -> dict:
    def version(*distributions):
        for name in distributions:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                pass
        return None
    return {"torch_version": torch.__version__, "triton_version": version("triton", "pytorch-triton")}


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average, None where the system has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def load_warning(load: float | None, cpus: int) -> str | None:
    """A warning when more runnable processes than CPUs compete with the timings."""
    if load is not None and load > cpus:
        return f"load average {load:.1f} > {cpus} CPUs"
    return None


def environment() -> dict:
    """Where a row was measured: versions, torch's CPU threads, CPUs and the load average now."""
    return {**_versions(), "threads": torch.get_num_threads(), "cpus": cpu_count(), "load_avg": load_average()}


def empty_row(case: Case, runner: Runner) -> dict:
    row = dict.fromkeys(ROW_KEYS)
    row.update(backend=runner.name, **case.describe())
    row.update(min_ms=None, max_ms=None, repeat=None, flops=None, bytes=case.bytes(), gemm_gflops=None,
               pct_gemm=None, vs_reference=None, check=None, **environment(), warning=None)
    return row


def spread_warning(samples, limit: float) -> str | None:
    """A warning when the repeats disagree: (max − min)/median above ``limit``."""
    median = statistics.median(samples)
    spread = (max(samples) - min(samples)) / median if median > 0 else 0.0
    if len(samples) > 1 and spread > limit:
        return (f"repeats disagree: {min(samples) * 1e3:.3g}–{max(samples) * 1e3:.3g} ms, (max−min)/median "
                f"{spread:.0%} > {limit:.0%}")
    return None


def _error_text(error: BaseException) -> str:
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(error).lower():
        return "out of memory: " + (str(error).splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def measure_one(case: Case, runner: Runner, inputs, options: Options, gemm_gflops: float | None) -> dict:
    """The row of one runner on one case (its ``reason`` already said it can run)."""
    row = empty_row(case, runner)
    row["gemm_gflops"] = gemm_gflops
    guard = measure.memory_guard(case, runner)
    if guard is not None:
        row["error"] = guard
        return row
    if options.check:
        try:
            mismatch, row["check"] = measure.check(case, runner, inputs)
        except Exception as error:  # noqa: BLE001 - any failure of the runner is the row's error
            mismatch, row["check"] = "check: " + _error_text(error), "failed"
        if mismatch is not None:
            row["error"] = mismatch
            return row
    on_cuda = case.device.startswith("cuda")
    if options.memory and not on_cuda:
        row["peak_mem_mb"], error = fresh_process.peak_mb(case, runner.name)
        if error is not None:
            row["error"] = error
            return row
    try:
        step = measure.make_step(case, runner.build(case), inputs)
        samples = measure.time_step(step, case.device, options.repeat, max(options.warmup, runner.warmup),
                                    options.min_sample_seconds)
        if options.memory and on_cuda:
            row["peak_mem_mb"] = measure.cuda_peak_mb(step, case.device)
        del step
    except Exception as error:  # noqa: BLE001 - out of memory or a runner failure: a row, not a crash
        row["error"] = _error_text(error)
        if on_cuda:
            torch.cuda.empty_cache()
        return row
    seconds = statistics.median(samples)
    forward = runner.forward_flops(case) if runner.forward_flops else None
    row.update(median_ms=seconds * 1e3, min_ms=min(samples) * 1e3, max_ms=max(samples) * 1e3,
               repeat=len(samples), flops=case.flops(forward))
    row["gflops"] = row["flops"] / seconds / 1e9
    if gemm_gflops:
        row["pct_gemm"] = 100.0 * row["gflops"] / gemm_gflops
    row.update(environment())  # the load while it was timed
    warnings = [w for w in (load_warning(row["load_avg"], row["cpus"]), spread_warning(samples, options.spread_limit))
                if w is not None]
    row["warning"] = "; ".join(warnings) or None
    return row


def run_sweep(cases, runners: dict[str, Runner], explicit: bool, options: Options, gemm: dict,
              table=None, progress=None, absent: dict | None = None) -> list[dict]:
    """All rows, printed to ``table`` as they come. ``gemm[(device, dtype)]`` is the GEMM rate.

    ``explicit``: the runners were named by the user, so those that cannot run a case get an
    error row instead of being left out. ``absent`` collects, per runner left out of a case,
    the first reason given.
    """
    rows, done = [], 0
    for case in cases:
        inputs = case.inputs()
        reference_ms = None
        for runner in runners.values():
            if progress is not None:
                progress.update(done, f"{case.label()} · {runner.name}")
            done += 1
            try:
                reason = runner.reason(case, inputs)
            except Exception as error:  # noqa: BLE001 - a broken runner is reported, not fatal
                reason = _error_text(error)
            if reason is not None:
                if not explicit:
                    if absent is not None:
                        absent.setdefault(runner.name, reason)
                    continue
                row = empty_row(case, runner)
                row["error"] = "unsupported: " + reason
            else:
                row = measure_one(case, runner, inputs, options, gemm.get((case.device, case.dtype)))
            if runner.name == "reference":
                reference_ms = row["median_ms"]
            if reference_ms and row["median_ms"]:
                row["vs_reference"] = reference_ms / row["median_ms"]
            rows.append(row)
            if table is not None:
                table.row(row)
        del inputs
    if progress is not None:
        progress.update(done)
        progress.finish()
    return rows
