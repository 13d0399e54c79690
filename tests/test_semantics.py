"""Behaviour beyond value agreement: dispatch, large softmax scores, empty inputs, no mutation,
and the memory bound of the chunked backend.

Run alone: .venv/bin/python -m pytest -q tests/test_semantics.py
"""

from __future__ import annotations

import pytest
import torch

import nonlocal_ext
from common import COMBOS, LargestTensor, assert_close_to_truth, combo_id, kernel_kwargs, max_abs, run
from nonlocal_ext import backends
from nonlocal_ext.backends import chunked, linear, reference
from nonlocal_ext.spec import validate
from nonlocal_ext.testing import make_inputs


def spec_of(kernel, **kwargs):
    q = torch.randn(3, 2)
    return validate(q, q, q, kernel, scale=1.0, power=kwargs.pop("power", None), gamma=None, eps=None,
                    normalize="row", update="aggregate", symmetric=False, self_value=None, backend="auto")


@pytest.mark.parametrize("kernel", list(nonlocal_ext.KERNELS))
def test_auto_takes_linear_for_dot_else_dense_when_small_and_chunked_when_large(kernel):
    spec = spec_of(kernel, power=1.0 if kernel == "fractional" else None)
    limit = backends.DENSE_MAX_ELEMENTS

    def chosen(b, n, m):  # meta tensors: shapes without memory
        return backends.select("auto", spec, torch.empty(b, n, 8, device="meta"), torch.empty(b, m, 8, device="meta"))

    small, large = chosen(2, limit // 2 // 1024, 1024), chosen(2, limit // 2 // 1024 + 1, 1024)
    assert (small, large) == ((linear, linear) if kernel == "dot" else (reference, chunked))


@pytest.mark.parametrize("normalize", ["row", "sym"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gaussian_large_scores_stay_finite_in_float32(normalize, symmetric):
    """Scores scale·q·k up to ±80: exp overflows float32 sums unless normalized in the log domain."""
    g = torch.Generator().manual_seed(0)
    n, d, c = 300, 16, 8
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    k = torch.randn(n, d, generator=g, dtype=torch.float64)
    scale = 80.0 / (q @ k.T).abs().max().item()
    v = torch.randn(n, c, generator=g, dtype=torch.float64)
    grad_out = torch.randn(n, c, generator=g, dtype=torch.float64)
    args = dict(kernel="gaussian", normalize=normalize, update="aggregate", symmetric=symmetric, scale=scale)
    truth = run("reference", q, k, v, None, grad_out=grad_out, **args)
    low = [t.float() for t in (q, k, v)]
    plain = run("reference", *low, None, grad_out=grad_out, **args)
    for backend in ("reference", "chunked", "cpu"):
        ours = run(backend, *low, None, grad_out=grad_out, **args)
        for o, p, t in zip([ours[0]] + ours[1], [plain[0]] + plain[1], [truth[0]] + truth[1]):
            assert torch.isfinite(o).all()
            assert_close_to_truth(o, p, t, torch.float32, backend, floor=max(1.0, max_abs(truth[0])))


@pytest.mark.parametrize("backend", ["reference", "chunked", "linear", "cpu"])
def test_empty_queries_give_an_empty_result(backend):
    q, k, v = torch.randn(2, 0, 3), torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    kernel = "dot" if backend == "linear" else "rbf"
    out = nonlocal_ext.nonlocal_aggregate(q.requires_grad_(), k.requires_grad_(), v, kernel, backend=backend)
    assert out.shape == (2, 0, 4)
    out.sum().backward()
    assert q.grad.shape == q.shape and (k.grad == 0).all()


@pytest.mark.parametrize("backend", ["reference", "chunked", "linear", "cpu"])
def test_empty_keys_with_no_normalization_give_zeros(backend):
    q, k, v = torch.randn(3, 3), torch.randn(0, 3), torch.randn(0, 4)
    kernel = "dot" if backend == "linear" else "gaussian"
    out = nonlocal_ext.nonlocal_aggregate(q, k, v, kernel, normalize="none", backend=backend)
    assert out.shape == (3, 4) and (out == 0).all()


def test_empty_batch():
    q = torch.randn(0, 4, 3)
    out = nonlocal_ext.nonlocal_aggregate(q, q, torch.randn(0, 4, 2), "rbf", backend="chunked")
    assert out.shape == (0, 4, 2)


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu"])
@pytest.mark.parametrize("kernel", ["fractional", "log"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coincident_points_with_default_eps(backend, kernel, dtype):
    """q = k: every diagonal pair is coincident under the default eps, in every dtype; with N = M = 1
    the row sums are 0 and the safe divide gives 0, values and gradients."""
    q = torch.randn(5, 64, dtype=dtype)
    out, grads = run(backend, q, q, torch.ones(5, 1, dtype=dtype), None, kernel, "none", "aggregate", False,
                     grad_out=torch.ones(5, 1, dtype=torch.float64), **kernel_kwargs(kernel))
    expected = run("reference", q.double(), q.double(), torch.ones(5, 1, dtype=torch.float64), None, kernel, "none",
                   "aggregate", False, eps=nonlocal_ext.kernels.default_eps(dtype), **kernel_kwargs(kernel))[0]
    assert all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    one = q[:1]
    out, grads = run(backend, one, one, torch.ones(1, 1, dtype=dtype), None, kernel, "row", "aggregate", False,
                     grad_out=torch.ones(1, 1, dtype=torch.float64), **kernel_kwargs(kernel))
    assert out.item() == 0 and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", ["reference", "chunked", "linear", "cpu"])
def test_inputs_are_not_mutated(backend):
    kernel = "dot" if backend == "linear" else "fractional"
    q, k, v, u = make_inputs(kernel, "sym", (2,), 6, 6, 3, 2, with_self_value=True)
    before = [t.clone() for t in (q, k, v, u)]
    versions = [t._version for t in (q, k, v, u)]
    run(backend, q, k, v, u, kernel, "sym", "diffusion", True, grad_out=torch.ones(2, 6, 2, dtype=torch.float64),
        **kernel_kwargs(kernel))
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v, u)))
    assert versions == [t._version for t in (q, k, v, u)]


def test_two_batch_dims_match_a_loop_over_them():
    q, k, v, u = make_inputs("rbf", "sym", (2, 3), 7, 7, 4, 2, with_self_value=True)
    out = nonlocal_ext.nonlocal_aggregate(q, k, v, "rbf", normalize="sym", update="diffusion", self_value=u)
    for i in range(2):
        for j in range(3):
            one = nonlocal_ext.nonlocal_aggregate(q[i, j], k[i, j], v[i, j], "rbf", normalize="sym",
                                                  update="diffusion", self_value=u[i, j])
            torch.testing.assert_close(out[i, j], one, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("combo", [c for c in COMBOS if c[0] != "dot" and c[3]], ids=combo_id)
def test_chunked_never_allocates_n_by_m(monkeypatch, combo):
    """Forward and backward at N = M = 256 with 32-row blocks: no tensor reaches N·M elements."""
    kernel, normalize, update, symmetric, with_self_value = combo
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 32 * 256)
    n = 256
    q, k, v, u = make_inputs(kernel, normalize, (), n, n, 8, 4, with_self_value=with_self_value)
    leaves = [None if t is None else t.requires_grad_() for t in (q, k, v, u)]
    with LargestTensor() as probe:
        out = nonlocal_ext.nonlocal_aggregate(leaves[0], leaves[1], leaves[2], kernel, normalize=normalize,
                                              update=update, symmetric=symmetric, self_value=leaves[3],
                                              backend="chunked", **kernel_kwargs(kernel))
        out.sum().backward()
    assert 32 * n <= probe.largest < n * n / 4
    # the probe itself would catch a dense computation:
    with LargestTensor() as dense:
        reference.aggregate(q.detach(), k.detach(), v.detach(), None if u is None else u.detach(),
                            validate(q, k, v, kernel, scale=1.0, power=kernel_kwargs(kernel).get("power"),
                                     gamma=kernel_kwargs(kernel).get("gamma"), eps=None, normalize=normalize,
                                     update=update, symmetric=symmetric, self_value=u, backend="reference"))
    assert dense.largest >= n * n


@pytest.mark.parametrize("backend,kernel", [("reference", "log"), ("chunked", "fractional"), ("chunked", "gaussian"),
                                            ("linear", "dot")])
@pytest.mark.parametrize("normalize", ["row", "sym"])
def test_backends_are_device_agnostic(backend, kernel, normalize):
    """On 'meta' tensors (shapes only, no data) forward and backward stay on the inputs' device:
    no op pins a tensor to the CPU, so the same code serves CUDA tensors (no GPU here)."""
    q, k, v = (torch.randn(2, 7, d, device="meta", requires_grad=True) for d in (3, 3, 5))
    out = nonlocal_ext.nonlocal_aggregate(q, k, v, kernel, normalize=normalize, update="diffusion", symmetric=True,
                                          backend=backend, **kernel_kwargs(kernel))
    out.sum().backward()
    assert out.device.type == "meta" and out.shape == (2, 7, 5)
    assert all(t.grad.device.type == "meta" and t.grad.shape == t.shape for t in (q, k, v))


def test_chunked_splits_a_batch_too_large_for_one_block(monkeypatch):
    """B·M above the block budget: the batch is processed in groups, values and gradients unchanged."""
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 2 * 50)
    q, k, v, u = make_inputs("rbf", "sym", (7,), 30, 50, 4, 3, with_self_value=True)
    grad_out = torch.randn(7, 30, 3, dtype=torch.float64)
    args = ("rbf", "sym", "diffusion", False, grad_out)
    truth = run("reference", q, k, v, u, *args, **kernel_kwargs("rbf"))
    ours = run("chunked", q, k, v, u, *args, **kernel_kwargs("rbf"))  # groups of 2 batch elements
    for o, t in zip([ours[0]] + ours[1], [truth[0]] + truth[1]):
        torch.testing.assert_close(o, t, rtol=1e-12, atol=1e-12)
