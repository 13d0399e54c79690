"""The fused C++ CPU kernels (backend="cpu"): custom-op registration, torch.compile, determinism.

Values and gradients against the reference are in test_backends.py and test_gradcheck.py with the
other backends. Run alone: .venv/bin/python -m pytest -q tests/test_cpu.py
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

import nonlocal_ext
from common import COMBOS, check_against_reference, combo_id, kernel_kwargs, run
from nonlocal_ext.backends import cpu, linear, reference
from nonlocal_ext.kernels import EULER_GAMMA, default_eps
from nonlocal_ext.testing import make_inputs

OPS = torch.ops.nonlocal_ext


def op_arguments(kernel, normalize, update, symmetric, dtype):
    kw = kernel_kwargs(kernel)
    return (kernel, kw.get("scale", 1.0), kw.get("power", 0.0), kw.get("gamma", EULER_GAMMA),
            default_eps(dtype), normalize, update, symmetric)


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


OPCHECK_CASES = [pytest.param(c, False, id=combo_id(c)) for c in COMBOS if c[0] in ("gaussian", "fractional")] + [
    pytest.param(c, True, id=combo_id(c) + "-transposed") for c in COMBOS
    if c[0] == "fractional" and c[1] in ("row", "sym") and c[4]]


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "kept-products"])
@pytest.mark.parametrize("combo,noncontiguous", OPCHECK_CASES)
def test_opcheck(combo, noncontiguous, keep):
    """torch.library.opcheck: schema, fake kernel, autograd registration agree with the kernels
    (strides included: the fake kernels must promise what the kernels return), with and without the
    forward's tile products kept for the backward."""
    kernel, normalize, update, symmetric, with_self_value = combo
    keep = keep and not symmetric
    q, k, v, u = make_inputs(kernel, normalize, (2,), 7, 7, 3, 2, with_self_value=with_self_value,
                             noncontiguous=noncontiguous)
    args = op_arguments(kernel, normalize, update, symmetric, torch.float64)
    leaves = [None if t is None else t.requires_grad_() for t in (q, k, v, u)]
    torch.library.opcheck(OPS.aggregate_forward, (*leaves, *args, keep))
    out, row_stats, col_stats, products = OPS.aggregate_forward(q, k, v, u, *args, keep)
    assert products.shape == ((2, 7, 7) if keep else (2, 0, 0))
    grad_out = torch.randn_like(out)
    torch.library.opcheck(OPS.aggregate_backward,
                          (grad_out, q.detach(), k.detach(), v.detach(), None if u is None else u.detach(),
                           out.detach(), row_stats, col_stats, *args, products if keep else None))


@pytest.mark.parametrize("combo", [c for c in COMBOS if not c[3]], ids=combo_id)
def test_the_backward_reads_the_kept_products(combo):
    """With ``keep_products`` the forward returns its tile products (q kᵀ of the translated points, or ρ under
    direct differences) and the backward reads them: the same gradients as recomputing, and other
    gradients when the products are changed."""
    kernel, normalize, update, _, with_self_value = combo
    q, k, v, u = make_inputs(kernel, normalize, (2,), 11, 11, 5, 3, with_self_value=with_self_value)
    args = op_arguments(kernel, normalize, update, False, torch.float64)
    out, row_stats, col_stats, products = OPS.aggregate_forward(q, k, v, u, *args, True)
    torch.testing.assert_close(out, OPS.aggregate_forward(q, k, v, u, *args)[0], rtol=0, atol=0)
    if kernel in ("dot", "gaussian"):
        torch.testing.assert_close(products, q @ k.transpose(-1, -2))
    grad_out = torch.randn_like(out)
    backward = functools.partial(OPS.aggregate_backward, grad_out, q, k, v, u, out, row_stats, col_stats, *args)
    recomputed, read = backward(None), backward(products)
    for a, b in zip(recomputed, read):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    changed = backward(products * 1.01)
    assert any(a is not None and not torch.equal(a, b) for a, b in zip(changed, recomputed))


def saved_tensors(run):
    """(the tensors autograd saves while ``run()`` builds the graph, in order; what it returned)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    return saved, result


def test_the_autograd_node_saves_row_major_inputs_and_only_the_shape_of_out():
    """The C++ backward reads out's shape only (it sums S_i from the tiles), so the node saves a one-element stand-in
    and out is freed with the caller's last reference; transposed inputs (the layers' views of convolution outputs)
    are made row-major once, before the op, so that the backward does not copy them again."""
    q, k = (torch.randn(2, 6, n, dtype=torch.float64).transpose(1, 2).requires_grad_() for n in (12, 9))
    v = torch.randn(2, 4, 9, dtype=torch.float64).transpose(1, 2).requires_grad_()
    saved, out = saved_tensors(lambda: nonlocal_ext.nonlocal_aggregate(q, k, v, "gaussian", backend="cpu"))
    # the op's node (csrc/autograd.cpp): query, key, value, out, statistics (self_value and products are None)
    assert [t.shape for t in saved[:4]] == [q.shape, k.shape, v.shape, out.shape]
    assert not q.is_contiguous() and all(t.is_contiguous() for t in saved[:3])
    assert saved[3].untyped_storage().nbytes() == out.element_size()
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(nonlocal_ext.nonlocal_aggregate(q, k, v, "gaussian", backend="reference"), (q, k, v),
                               grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_the_forward_keeps_products_only_for_a_backward_where_they_are_small():
    """``cpu.keeps_products``: a backward will run, not ``symmetric``, and M ≤ D (the products take no more memory
    than q); the autograd formula then hands them to the backward."""
    def keeps(m=8, d=8, c=4, grad=True, symmetric=False, no_grad=False):
        q, k, v = torch.randn(2, m if symmetric else 12, d), torch.randn(2, m, d), torch.randn(2, m, c, requires_grad=grad)
        spec = nonlocal_ext.spec.validate(q, k, v, "gaussian", scale=1.0, power=None, gamma=None, eps=None,
                                          normalize="row", update="aggregate", symmetric=symmetric,
                                          self_value=None, backend="cpu")
        with torch.set_grad_enabled(not no_grad):
            return cpu.keeps_products(spec, q, k, v, None)
    assert keeps() and keeps(m=3)
    assert not keeps(m=9) and not keeps(m=12, d=8, c=4)  # M ≤ D + C is not enough
    assert not keeps(grad=False) and not keeps(no_grad=True) and not keeps(symmetric=True)
    kept = []
    q, v = torch.randn(2, 12, 8, requires_grad=True), torch.randn(2, 1, 4)
    for m in (8, 9):
        k = torch.randn(2, m, 8)
        spec = nonlocal_ext.spec.validate(q, k, v.expand(2, m, 4), "gaussian", scale=1.0, power=None, gamma=None,
                                          eps=None, normalize="row", update="aggregate", symmetric=False,
                                          self_value=None, backend="cpu")
        saved, _ = saved_tensors(lambda: cpu.aggregate(q, k, v.expand(2, m, 4), None, spec))
        kept.append(saved[-1].shape == (2, 12, m))  # the products, saved last (else the column statistics)
    assert kept == [True, False]


@pytest.mark.parametrize("kernel,normalize", [("gaussian", "row"), ("fractional", "sym"), ("log", "row")])
def test_torch_compile_fullgraph(kernel, normalize):
    """A function calling nonlocal_aggregate (auto picks cpu) compiles without graph breaks."""
    q, k, v, u = make_inputs(kernel, normalize, (2,), 9, 9, 4, 3, with_self_value=True, dtype=torch.float32)

    def block(q, k, v, u):
        out = nonlocal_ext.nonlocal_aggregate(q, k, v, kernel, normalize=normalize, update="diffusion",
                                              self_value=u, **kernel_kwargs(kernel))
        return (out * 2).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (q, k, v, u)]
    expected = block(*leaves)
    expected_grads = torch.autograd.grad(expected, leaves)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, u)]
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    torch.testing.assert_close(got, expected)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("combo", [("gaussian", "row", "aggregate", False, False),
                                   ("fractional", "sym", "diffusion", True, False),
                                   ("rbf", "count", "diffusion", False, True),
                                   ("log", "row", "diffusion", True, False)], ids=combo_id)
@pytest.mark.parametrize("batch", [(), (3,)], ids=["b1", "b3"])
def test_one_and_two_threads_give_bitwise_equal_results(threads, combo, batch):
    """Work is split by the shapes only and partials are summed in a fixed order."""
    kernel, normalize, update, symmetric, with_self_value = combo
    q, k, v, u = make_inputs(kernel, normalize, batch, 1000, 1000, 64, 33, with_self_value=with_self_value,
                             dtype=torch.float32)
    grad_out = torch.randn(*batch, 1000, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results = []
    for count in (1, 2):
        torch.set_num_threads(count)
        results.append(run("cpu", q, k, v, u, kernel, normalize, update, symmetric, grad_out,
                           **kernel_kwargs(kernel)))
    (out1, grads1), (out2, grads2) = results
    assert torch.equal(out1, out2)
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads2))


@pytest.mark.parametrize("combo", [c for c in COMBOS if c[0] != "dot"], ids=combo_id)
def test_every_output_element_is_written(combo):
    """Under the suite (NONLOCAL_EXT_POISON_OUTPUTS=1, tests/conftest.py) the op allocates its outputs
    filled with NaN; at sizes that leave partial tiles on every side, none may survive (inputs are
    finite and no row sum vanishes)."""
    assert os.environ.get("NONLOCAL_EXT_POISON_OUTPUTS") == "1"
    kernel, normalize, update, symmetric, with_self_value = combo
    q, k, v, u = make_inputs(kernel, normalize, (2,), 67, 67, 5, 7, with_self_value=with_self_value,
                             coincident=False)
    out, row_stats, col_stats, _ = OPS.aggregate_forward(q, k, v, u, *op_arguments(kernel, normalize, update,
                                                                               symmetric, torch.float64))
    assert torch.isfinite(out).all() and torch.isfinite(row_stats).all() and torch.isfinite(col_stats).all()
    assert col_stats.shape == ((2, 67) if normalize == "sym" else (2, 0))


@pytest.mark.parametrize("combo", [("rbf", "count", "aggregate", True, False),
                                   ("fractional", "sym", "diffusion", False, True),
                                   ("gaussian", "row", "aggregate", True, False)], ids=combo_id)
def test_every_gradient_element_is_written(combo):
    """The backward's accumulators are not zero-filled: each task's first tile GEMM into a line writes it. At
    N = M = 2100 the column schedule (9 column blocks) takes 4 groups of 3 blocks, so one group owns none and its
    partial must be zeroed; the row schedule (row) splits 33 row blocks over 4 groups. Under the suite's NaN
    poisoning an element that nothing writes shows, and every gradient must match the float64 reference."""
    assert os.environ.get("NONLOCAL_EXT_POISON_OUTPUTS") == "1"
    check_against_reference("cpu", combo, ((), 2100, 2100, 3, 2), torch.float64)


def test_half_inputs_give_half_outputs():
    q, k, v, _ = make_inputs("rbf", "row", (), 20, 20, 4, 3, with_self_value=False, dtype=torch.bfloat16)
    out = nonlocal_ext.nonlocal_aggregate(q, k, v, "rbf", backend="cpu")
    assert out.dtype == torch.bfloat16


def auto_choice(kernel, batch, n, m, d, c, backward, normalize="row"):
    """What auto picks for CPU tensors of these shapes (expanded views: no memory)."""
    q, k, v = (torch.empty(1, rows, cols).expand(batch, rows, cols) for rows, cols in ((n, d), (m, d), (m, c)))
    spec = nonlocal_ext.spec.validate(q, k, v, kernel, scale=1.0, power=1.0 if kernel == "fractional" else None,
                                      gamma=None, eps=None, normalize=normalize, update="aggregate", symmetric=False,
                                      self_value=None, backend="auto")
    return nonlocal_ext.backends.select("auto", spec, q, k, v, backward=backward)


@pytest.mark.parametrize("kernel,batch,n,m,d,c,backward,expected", [
    ("gaussian", 1, 4096, 4096, 64, 128, False, cpu),      # attention shape: fused
    ("gaussian", 1, 4096, 4096, 64, 128, True, cpu),
    ("fractional", 2, 3400, 850, 512, 512, True, cpu),     # costly dense elementwise passes
    ("gaussian", 16, 196, 49, 512, 512, True, cpu),        # res4: the backward reads the kept tile products
    ("gaussian", 8, 784, 784, 256, 256, True, reference),  # N = M: the fused backward recomputes q kᵀ
    ("gaussian", 1, 256, 256, 64, 128, True, cpu),         # small: fused since its autograd is in C++
    ("gaussian", 1, 256, 256, 64, 128, False, cpu),
    ("gaussian", 2, 4096, 4096, 128, 128, True, cpu),      # dense temporaries over the memory budget
    ("gaussian", 4000, 196, 49, 512, 512, True, cpu),      # dense over the memory budget: fused, products kept
    ("dot", 1, 4096, 4096, 64, 128, True, linear),         # attention shape: rank 64 against N = M = 4096
    ("dot", 2, 3400, 850, 512, 512, True, reference),      # detection: dense, fused and the rank-512 linear path level
    ("dot", 16, 196, 49, 512, 512, True, cpu),             # res4
])
def test_auto_follows_the_cost_model_within_the_memory_budget(kernel, batch, n, m, d, c, backward, expected,
                                                            monkeypatch):
    monkeypatch.setattr(nonlocal_ext.backends.cost, "fused_speed_scale", lambda: 1.0)  # as on the fitted machine
    assert auto_choice(kernel, batch, n, m, d, c, backward) is expected


def test_auto_asks_the_cost_model_whether_a_backward_runs(monkeypatch):
    """The op tells select whether gradients are needed; the model then prices forward+backward."""
    seen = []
    monkeypatch.setattr(nonlocal_ext.backends.cost, "fused_work",
                        lambda pairs, m, d, c, normalize, backward, half, scale, symmetric, half_ratio: seen.append(backward) or 0.0)
    q = torch.randn(2, 30, 5)
    nonlocal_ext.nonlocal_aggregate(q, q, q, "rbf")
    nonlocal_ext.nonlocal_aggregate(q, q, q.clone().requires_grad_(), "rbf")
    with torch.no_grad():
        nonlocal_ext.nonlocal_aggregate(q, q, q.clone().requires_grad_(), "rbf")
    assert seen == [False, True, False]


def test_op_rejects_bad_arguments_by_name():
    q = torch.randn(1, 4, 3)
    args = ("rbf", 1.0, 0.0, 0.5, 1e-4, "row", "aggregate", False)
    with pytest.raises(RuntimeError, match="unknown kernel 'nope'"):
        OPS.aggregate_forward(q, q, q, None, "nope", *args[1:])
    with pytest.raises(RuntimeError, match="unknown normalize 'nope'"):
        OPS.aggregate_forward(q, q, q, None, *args[:5], "nope", *args[6:])
    with pytest.raises(RuntimeError, match="float32, float64, bfloat16 or float16"):
        OPS.aggregate_forward(q.int(), q.int(), q.int(), None, *args)
    with pytest.raises(RuntimeError, match="self_value needs update='diffusion'"):
        OPS.aggregate_forward(q, q, q, q, *args)


def test_direct_differences_start_where_the_python_backends_start():
    """csrc/tile_math.h mirrors kernels.DIRECT_DIFFERENCES_MAX_FEATURES (ρ from Σ_d (q_d − k_d)² up to it)."""
    import pathlib
    import re

    header = (pathlib.Path(__file__).resolve().parent.parent / "csrc" / "tile_math.h").read_text()
    mirrored = re.search(r"constexpr int64_t kDirectMaxFeatures = (\d+);", header)
    assert mirrored and int(mirrored.group(1)) == nonlocal_ext.kernels.DIRECT_DIFFERENCES_MAX_FEATURES
