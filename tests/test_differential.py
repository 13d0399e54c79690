"""Randomized differential test: every backend available on CPU against the float64 dense reference.

Each case draws a kernel, normalization, update, ``symmetric``, ``self_value``, batch dims, sizes
N, M ∈ [1, 300], D, C ∈ [1, 130], a memory layout per input (contiguous, transposed storage, a
strided slice of a larger tensor, or expanded along a batch dim) and a dtype (float32, float64),
from its own seeded generator, so that one case can be rerun alone: a failure prints the pytest
command that does it. Values and the gradients of every input are judged by the suite's rule
(flash-attention's): err ≤ 2·err(dense PyTorch in the same dtype) + TOLERANCE[dtype]·scale, errors
against float64, with scale = max(max|truth of that tensor|, max|true output|, 1) so that
entries that are ~0 by cancellation get an absolute floor.

Run alone: .venv/bin/python -m pytest -q tests/test_differential.py

``backend="triton"`` runs the same cases under the Triton interpreter, through :func:`check_case`:
tests/triton_suite.py::test_differential_random_case.
"""

from __future__ import annotations

import functools
import math
import random

import pytest
import torch

import nonlocal_ext
from common import assert_close_to_truth, kernel_kwargs, max_abs
from nonlocal_ext.backends import chunked
from nonlocal_ext.spec import NORMALIZATIONS, UPDATES
from nonlocal_ext.testing import make_inputs

CASES = 300
SEED = 20261129
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")


def log_uniform(rng, low, high):
    """An integer in [low, high], small sizes as likely as large ones (and cheaper)."""
    return min(high, int(math.exp(rng.uniform(math.log(low), math.log(high + 1)))))


def draw(index):
    """Case ``index``: a dict of everything the call needs, drawn from its own generator."""
    rng = random.Random(SEED * 1000 + index)
    kernel = rng.choice(list(nonlocal_ext.KERNELS))
    normalize = rng.choice(NORMALIZATIONS)
    update = rng.choice(UPDATES)
    symmetric = rng.random() < 0.3
    with_self_value = update == "diffusion" and rng.random() < 0.5
    batch = tuple(rng.randint(1, 3) for _ in range(rng.choice([0, 0, 1, 1, 2])))
    n = log_uniform(rng, 1, 300)
    m = n if symmetric or (update == "diffusion" and not with_self_value) else log_uniform(rng, 1, 300)
    d, c = log_uniform(rng, 1, 130), log_uniform(rng, 1, 130)
    layouts = [rng.choice(LAYOUTS if batch else LAYOUTS[:3]) for _ in range(4)]
    dtype = rng.choice(["float32", "float64"])
    block_elements = rng.choice([None, rng.randint(1, 4000)])  # chunked: several row blocks, or one
    return dict(index=index, kernel=kernel, normalize=normalize, update=update, symmetric=symmetric,
                with_self_value=with_self_value, batch=batch, n=n, m=m, d=d, c=c, layouts=layouts, dtype=dtype,
                block_elements=block_elements)


def backends_for(case):
    return ["chunked", "cpu"] + (["linear"] if case["kernel"] == "dot" else [])


def in_layout(leaf, layout):
    """A view of ``leaf`` with the same values and the given layout, built inside the graph so that the
    gradient reaches ``leaf``. ``expanded`` repeats the first batch element along the first batch dim
    (its leaf then has size 1 there)."""
    if layout == "transposed":
        return leaf.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":  # every other row and an inner block of columns of a larger tensor
        rows, cols = leaf.shape[-2:]
        big = leaf.new_zeros(leaf.shape[:-2] + (2 * rows, cols + 3))
        big[..., ::2, 1:cols + 1] = leaf
        return big[..., ::2, 1:cols + 1]
    return leaf


def leaves_for(case, dtype):
    """The float64 inputs of the case as leaves in ``dtype`` (expanded ones with batch size 1)."""
    tensors = make_inputs(case["kernel"], case["normalize"], case["batch"], case["n"], case["m"], case["d"], case["c"],
                          with_self_value=case["with_self_value"], seed=case["index"])
    leaves = []
    for t, layout in zip(tensors, case["layouts"]):
        if t is not None and layout == "expanded":
            t = t[:1]
        leaves.append(None if t is None else t.to(dtype).requires_grad_())
    return leaves


def evaluate(case, backend, dtype):
    """(output, gradients of the leaves) of one call in ``dtype``; the upstream gradient is fixed per case."""
    leaves = leaves_for(case, dtype)
    inputs = []
    for leaf, layout in zip(leaves, case["layouts"]):
        if leaf is None:
            inputs.append(None)
            continue
        view = in_layout(leaf, layout)
        if layout == "expanded":
            view = view.expand(case["batch"] + view.shape[len(case["batch"]):])
        inputs.append(view)
    if backend == "chunked" and case["block_elements"] is not None:
        chunked.BLOCK_ELEMENTS, saved = case["block_elements"], chunked.BLOCK_ELEMENTS
    else:
        saved = None
    try:
        out = nonlocal_ext.nonlocal_aggregate(
            inputs[0], inputs[1], inputs[2], case["kernel"], normalize=case["normalize"], update=case["update"],
            symmetric=case["symmetric"], self_value=inputs[3], backend=backend, **kernel_kwargs(case["kernel"]))
    finally:
        if saved is not None:
            chunked.BLOCK_ELEMENTS = saved
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(case["index"]))
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, present, grad_out.to(out.dtype), allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(present, grads)]


@functools.lru_cache(maxsize=4)
def truth_and_plain(index):
    """The float64 dense reference and the dense reference in the case's dtype (shared by its backends)."""
    case = draw(index)
    dtype = getattr(torch, case["dtype"])
    truth = evaluate(case, "reference", torch.float64)
    plain = truth if dtype == torch.float64 else evaluate(case, "reference", dtype)
    return truth, plain


def describe(case):
    keys = ("kernel", "normalize", "update", "symmetric", "with_self_value", "batch", "n", "m", "d", "c", "layouts",
            "dtype", "block_elements")
    return ", ".join(f"{k}={case[k]}" for k in keys)


PARAMS = [pytest.param(index, backend, id=f"{backend}-{index}")
          for index in range(CASES) for backend in backends_for(draw(index))]


@pytest.mark.parametrize("index,backend", PARAMS)
def test_random_case(index, backend):
    repro = f'.venv/bin/python -m pytest -q "tests/test_differential.py::test_random_case[{backend}-{index}]"'
    check_case(index, backend, repro)


def check_case(index, backend, repro):
    """Case ``index`` on ``backend`` against the float64 reference, the output and the gradient of every input
    by the suite's rule; a failure names the case and ends with ``rerun: {repro}``."""
    case = draw(index)
    dtype = getattr(torch, case["dtype"])
    (truth_out, truth_grads), (plain_out, plain_grads) = truth_and_plain(index)
    out, grads = evaluate(case, backend, dtype)
    assert out.dtype == dtype and out.shape == truth_out.shape, f"{describe(case)}\nrerun: {repro}"
    names = ["out", "grad query", "grad key", "grad value", "grad self_value"]
    floor = max(1.0, max_abs(truth_out))
    for name, o, p, t in zip(names, [out] + grads, [plain_out] + plain_grads, [truth_out] + truth_grads):
        try:
            assert_close_to_truth(o, p, t, dtype, name, floor=floor)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{backend}: {describe(case)}\nrerun: {repro}") from None
