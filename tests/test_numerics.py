"""Numerics a user relies on: NaN/Inf propagation, translation invariance of the distance kernels,
and special inputs (empty sizes, no_grad, partial gradients, threads, repeated calls).

Run alone: .venv/bin/python -m pytest -q tests/test_numerics.py
"""

from __future__ import annotations

import gc
import math
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

import nonlocal_ext
from nonlocal_ext.spec import NORMALIZATIONS, UPDATES
from nonlocal_ext.testing import make_inputs
from common import (COMBOS, COORDINATE_SET_IDS, COORDINATE_SETS, DISTANCE_KERNELS, assert_close_to_truth,
                    coordinate_misses, kernel_kwargs, max_abs, run)

CPU_BACKENDS = ("reference", "chunked", "linear", "cpu")


def backends_for(kernel):
    return [b for b in CPU_BACKENDS if b != "linear" or kernel == "dot"]


def kernel_backend_params():
    return [pytest.param(kernel, backend, id=f"{backend}-{kernel}")
            for kernel in nonlocal_ext.KERNELS for backend in backends_for(kernel)]


# ------------------------------------------------------------------------- NaN / Inf propagation

# One non-finite entry in one row of one input, in batch element 1 of 2 (batch element 0 must stay
# untouched). Row and column of the poisoned entry per input.
POISONED = {"query": (2, 1), "key": (4, 0), "value": (3, 1), "self_value": (0, 0)}
BAD_VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def poisoned_calls(kernel, normalize, combos=COMBOS):
    """(update, symmetric, with_self_value, poisoned input, bad value) for one kernel × normalization
    (its combinations in ``combos``: by default every valid one)."""
    for _, _, update, symmetric, with_self_value in (c for c in combos if c[:2] == (kernel, normalize)):
        inputs = ["query", "key", "value"] + (["self_value"] if with_self_value else [])
        for name in inputs:
            for bad in BAD_VALUES:
                yield update, symmetric, with_self_value, name, bad


def poisoned_inputs(kernel, normalize, with_self_value, name, bad, n, m, d):
    """Float64 inputs ``[query, key, value, self_value or None]`` (batch 2, C = 2) with ``bad`` at the
    POISONED entry of input ``name`` in batch element 1, and an upstream gradient ``(2, n, 2)``."""
    inputs = make_inputs(kernel, normalize, (2,), n, m, d, 2, with_self_value=with_self_value, seed=5)
    index = ["query", "key", "value", "self_value"].index(name)
    row, col = POISONED[name]
    inputs[index] = inputs[index].clone()
    inputs[index][1, row, col] = BAD_VALUES[bad]
    grad_out = torch.randn(2, n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return inputs, grad_out


def propagation_mismatches(kernel, backend, normalize, dtypes=(torch.float64, torch.float32), combos=COMBOS):
    """Every poisoned call of this kernel × normalization (each update, ``symmetric``, ``self_value`` of
    ``combos``, poisoned input, bad value, each of ``dtypes``) on ``backend``, against the float64 dense
    reference: a list of ``(call, tensor, message)`` where the non-finite entries differ or the finite
    ones disagree by more than the suite's rule allows."""
    n = m = 7
    names = ["out", "grad query", "grad key", "grad value", "grad self_value"]
    mismatches = []
    for update, symmetric, with_self_value, name, bad in poisoned_calls(kernel, normalize, combos):
        inputs, grad_out = poisoned_inputs(kernel, normalize, with_self_value, name, bad, n, m, 3)
        args = (kernel, normalize, update, symmetric, grad_out)
        truth = run("reference", *inputs, *args, **kernel_kwargs(kernel))
        for dtype in dtypes:
            low = [None if t is None else t.to(dtype) for t in inputs]
            ours = run(backend, *low, *args, **kernel_kwargs(kernel))
            plain = run("reference", *low, *args, **kernel_kwargs(kernel))
            where = (f"{name}={bad} {update}{' symmetric' if symmetric else ''}{' self_value' if with_self_value else ''}"
                     f" {str(dtype).removeprefix('torch.')}")
            for what, o, p, t in zip(names, [ours[0]] + ours[1], [plain[0]] + plain[1], [truth[0]] + truth[1]):
                expected, got = ~torch.isfinite(t), ~torch.isfinite(o)
                if not torch.equal(expected, got):
                    mismatches.append((where, what, f"non-finite at {(got & ~expected).sum()} entries the reference "
                                                    f"has finite, finite at {(expected & ~got).sum()} it has not"))
                    continue
                try:
                    assert_close_to_truth(o[~expected], p[~expected], t[~expected], dtype, what,
                                          floor=max(1.0, max_abs(truth[0][torch.isfinite(truth[0])])))
                except AssertionError as error:
                    mismatches.append((where, what, str(error)))
    return mismatches


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("kernel,backend", kernel_backend_params())
def test_nonfinite_inputs_propagate_as_in_the_dense_formula(kernel, backend, normalize):
    """Exactly the outputs and gradients that are non-finite in the float64 dense reference are
    non-finite here (float32 and float64), and the finite ones agree with it."""
    mismatches = propagation_mismatches(kernel, backend, normalize)
    assert not mismatches, f"{len(mismatches)} mismatches:\n" + "\n".join(": ".join(m) for m in mismatches[:20])


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("kernel", ["dot", "gaussian"])
def test_reference_screen_of_products_gives_what_the_screen_of_rows_gives(kernel, normalize, monkeypatch):
    """Where N·M < (N + M)·D the dense reference screens q kᵀ for NaN/Inf instead of the op screening q
    and k (``reference.screens_products``): every poisoned call (query/key/value/self_value rows, NaN and
    ±Inf, every update and ``symmetric``) gives bit for bit the outputs and gradients of the op's own
    screen, in float64, float32 and bfloat16 (whose products run in half where the CPU has them)."""
    from nonlocal_ext.backends import reference
    screen_of_rows = lambda spec, query, key: False  # noqa: E731 - the op's screen, as before the change
    calls = 0
    for update, symmetric, with_self_value, name, bad in poisoned_calls(kernel, normalize):
        inputs, grad_out = poisoned_inputs(kernel, normalize, with_self_value, name, bad, 7, 7, 9)
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            low = [None if t is None else t.to(dtype) for t in inputs]
            spec = nonlocal_ext.spec.validate(*low[:3], kernel, scale=1.0, power=None, gamma=None, eps=None,
                                              normalize=normalize, update=update, symmetric=symmetric,
                                              self_value=low[3], backend="reference")
            assert reference.screens_products(spec, low[0], low[1])
            args = (kernel, normalize, update, symmetric, grad_out)
            ours = run("reference", *low, *args)
            with monkeypatch.context() as patch:
                patch.setattr(reference, "screens_products", screen_of_rows)
                rows = run("reference", *low, *args)
            for o, r in zip([ours[0]] + ours[1], [rows[0]] + rows[1]):
                torch.testing.assert_close(o, r, rtol=0, atol=0, equal_nan=True)
            calls += 1
    assert calls >= 3 * 4 * 3


# ------------------------------------------------------------------------------------ special inputs


def some_combos(kernel):
    """Per kernel: one call of each normalization and of each update (symmetric and self_value too)."""
    return [(kernel, "none", "aggregate", False, False), (kernel, "count", "diffusion", False, True),
            (kernel, "row", "diffusion", True, False), (kernel, "sym", "aggregate", True, False)]


def call(backend, q, k, v, u, combo, **kwargs):
    kernel, normalize, update, symmetric, _ = combo
    return nonlocal_ext.nonlocal_aggregate(q, k, v, kernel, normalize=normalize, update=update, symmetric=symmetric,
                                           self_value=u, backend=backend, **kernel_kwargs(kernel), **kwargs)


def check_empty(kernel, backend, batch, n, m):
    """Every call of :func:`some_combos` on inputs of these sizes: the result has shape (..., N, C) and
    every gradient is zero (empty when its input is)."""
    for combo in some_combos(kernel):
        square = combo[3] or (combo[2] == "diffusion" and not combo[4])
        q, k, v, u = (None if t is None else t.requires_grad_() for t in make_inputs(
            kernel, combo[1], batch, n, n if square else m, 3, 2, with_self_value=combo[4]))
        out = call(backend, q, k, v, u, combo)
        assert out.shape == batch + (n, 2) and out.dtype == q.dtype
        inputs = [t for t in (q, k, v, u) if t is not None]
        for t, g in zip(inputs, torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)):
            assert g is None or (g.shape == t.shape and (g == 0).all())


@pytest.mark.parametrize("kernel,backend", kernel_backend_params())
def test_empty_queries(kernel, backend):
    """N = 0: a (..., 0, C) result, zero gradients for key and value."""
    check_empty(kernel, backend, (2,), 0, 5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    """An empty batch (batch dims (0,) and (3, 0)): an empty result and empty gradients, for every kernel.

    Run in a child process: a crash (the cpu backward once divided by the batch size) must fail this
    test, not end the test session."""
    kernels = ["dot"] if backend == "linear" else list(nonlocal_ext.KERNELS)
    script = (f"from test_numerics import check_empty\n"
              f"for kernel in {kernels!r}:\n"
              f"    for batch in [(0,), (3, 0)]:\n"
              f"        check_empty(kernel, {backend!r}, batch, 4, 4)\n")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", script], cwd=tests_dir, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    how = f"killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0 else f"exit code {done.returncode}"
    assert done.returncode == 0, f"{how}\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("kernel,backend", kernel_backend_params())
def test_no_keys(kernel, backend, normalize):
    """M = 0: ``none`` sums nothing, zeros (and zero gradients); the other normalizations are undefined."""
    q = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(2, 0, 4, dtype=torch.float64), torch.randn(2, 0, 5, dtype=torch.float64)
    u = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    for update, self_value in [("aggregate", None), ("diffusion", u)]:
        args = dict(normalize=normalize, update=update, self_value=self_value, backend=backend, **kernel_kwargs(kernel))
        if normalize != "none":
            with pytest.raises(ValueError, match=rf"key has no positions \(M = 0\): normalize='{normalize}' is undefined"):
                nonlocal_ext.nonlocal_aggregate(q, k, v, kernel, **args)
            continue
        out = nonlocal_ext.nonlocal_aggregate(q, k, v, kernel, **args)
        assert out.shape == (2, 3, 5) and (out == 0).all()
        inputs = [q] + ([u] if self_value is not None else [])
        for g in torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True):
            assert g is None or (g == 0).all()


@pytest.mark.parametrize("kernel,backend", kernel_backend_params())
def test_no_grad_and_inference_mode_give_the_grad_mode_result(kernel, backend):
    for combo in some_combos(kernel):
        q, k, v, u = make_inputs(kernel, combo[1], (2,), 9, 9, 3, 2, with_self_value=combo[4], dtype=torch.float32)
        leaves = [None if t is None else t.clone().requires_grad_() for t in (q, k, v, u)]
        expected = call(backend, *leaves, combo)
        assert expected.requires_grad
        with torch.no_grad():
            out = call(backend, *leaves, combo)
        assert not out.requires_grad
        torch.testing.assert_close(out, expected.detach(), rtol=0, atol=0)
        with torch.inference_mode():
            inside = [None if t is None else t.clone() for t in (q, k, v, u)]  # inference tensors
            out = call(backend, *inside, combo)
            assert out.is_inference()
            out_of_grad_leaves = call(backend, *leaves, combo)
        torch.testing.assert_close(out, expected.detach(), rtol=0, atol=0)
        torch.testing.assert_close(out_of_grad_leaves, expected.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("kernel,backend", kernel_backend_params())
def test_gradients_for_only_some_inputs(kernel, backend):
    """Asking for the gradient of a subset of the inputs gives the same gradients as asking for all."""
    for combo in some_combos(kernel):
        tensors = make_inputs(kernel, combo[1], (2,), 9, 9, 3, 2, with_self_value=combo[4])
        present = [i for i, t in enumerate(tensors) if t is not None]
        grad_out = torch.randn(2, 9, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        full = [t.clone().requires_grad_() if t is not None else None for t in tensors]
        all_grads = torch.autograd.grad(call(backend, *full, combo), [full[i] for i in present], grad_out)
        expected = dict(zip(present, all_grads))
        for wanted in [[0], [2], [0, 1]] + ([[3], [1, 3]] if combo[4] else []):
            leaves = [None if t is None else (t.clone().requires_grad_() if i in wanted else t.clone())
                      for i, t in enumerate(tensors)]
            grads = torch.autograd.grad(call(backend, *leaves, combo), [leaves[i] for i in wanted], grad_out)
            for i, g in zip(wanted, grads):
                torch.testing.assert_close(g, expected[i], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel,backend", kernel_backend_params())
def test_four_threads_at_once_equal_serial_calls(kernel, backend):
    """Four Python threads each run a forward and backward on their own inputs at the same time; each
    result equals the same call made alone."""
    combo = (kernel, "sym" if kernel != "dot" else "row", "diffusion", True, False)
    jobs = [make_inputs(kernel, combo[1], (2,), 150, 150, 5, 3, with_self_value=False, seed=s) for s in range(4)]
    grad_out = torch.randn(2, 150, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def work(inputs):
        leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
        out = call(backend, *leaves, combo)
        present = [t for t in leaves if t is not None]
        return [out.detach()] + list(torch.autograd.grad(out, present, grad_out))

    serial = [work(inputs) for inputs in jobs]
    results = [None] * 4
    barrier = threading.Barrier(4)

    def thread(i):
        barrier.wait()
        results[i] = work(jobs[i])

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, expected in zip(results, serial):
        assert got is not None, "a thread failed"
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-13, atol=1e-13)


def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") / 2**20)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set size from /proc (Linux)")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_repeated_calls_do_not_grow_memory(backend):
    """200 forward+backward calls grow the resident set by less than 50 MB (after 20 warm-up calls)."""
    kernel = "dot" if backend == "linear" else "fractional"
    combo = (kernel, "sym", "diffusion", True, True)
    q, k, v, u = (t.float().requires_grad_() for t in make_inputs(kernel, "sym", (2,), 64, 64, 8, 16,
                                                                  with_self_value=True))
    grad_out = torch.randn(2, 64, 16)

    def step():
        torch.autograd.grad(call(backend, q, k, v, u, combo), (q, k, v, u), grad_out)

    for _ in range(20):
        step()
    gc.collect()
    before = resident_mb()
    for _ in range(200):
        step()
    gc.collect()
    assert resident_mb() - before < 50


# ------------------------------------------------------------------------- translation invariance

@pytest.mark.parametrize("kind,dim,side", COORDINATE_SETS, ids=COORDINATE_SET_IDS)
@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu"])
def test_coordinates_far_from_the_origin(backend, kind, dim, side):
    """Points of the unit square/cube moved by 0, 10, 1e3, 1e4 grid spacings: ``fractional`` (power 1, 3,
    4) and ``log``, ``count``/``row``, ``aggregate``/``diffusion`` in float32 stay within 2e-4 (values) and
    2e-3 (gradients) of float64, relative to the largest true entry. (Before the op translated its
    inputs, a 32×32 grid moved by 10 lost its neighbour pairs to the coincidence rule.)"""
    misses = coordinate_misses(backend, kind, dim, side)
    assert not misses, f"{len(misses)} calls miss the targets:\n" + "\n".join(misses)


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu", "auto"])
def test_moving_all_points_changes_nothing_in_float64(backend):
    """The coincidence rule and the distances see the translated inputs: a random cloud with coincident
    pairs gives the same values and gradients wherever it is moved (float64, default eps)."""
    for kernel in DISTANCE_KERNELS:
        q, k, v, u = make_inputs(kernel, "row", (2,), 40, 30, 3, 2, with_self_value=True, seed=7)
        grad_out = torch.randn(2, 40, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
        args = (kernel, "row", "diffusion", False, grad_out)
        expected = run(backend, q, k, v, u, *args, **kernel_kwargs(kernel))
        for shift in (10.0, -1e3):
            moved = run(backend, q + shift, k + shift, v, u, *args, **kernel_kwargs(kernel))
            for o, e in zip([moved[0]] + moved[1], [expected[0]] + expected[1]):
                torch.testing.assert_close(o, e, rtol=1e-9, atol=1e-9 * max(1.0, max_abs(e)))
