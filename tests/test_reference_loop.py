"""The dense reference backend against a naive per-element loop (tests/loop_reference.py).

Run alone: .venv/bin/python -m pytest -q tests/test_reference_loop.py

The first half checks the loop itself on cases computed by hand; the second half compares
``nonlocal_aggregate(..., backend="reference")`` with the loop in float64 for every
kernel × normalize × update × symmetric × self_value combination at tiny sizes.
"""

import itertools
import math

import pytest
import torch

import nonlocal_ext
from nonlocal_ext.spec import NORMALIZATIONS as NORMALIZES, UPDATES

from common import UPDATE_CASES, assert_close_to_truth
from loop_reference import EULER_GAMMA, loop_aggregate

KERNELS = list(nonlocal_ext.KERNELS)
POWER = {"fractional": dict(power=1.5), "log": {}}  # power is passed to fractional only
# gamma is passed to log only: −3 keeps its weights positive on these unit-scale points
PARAMS = {"fractional": dict(power=1.5), "log": dict(gamma=-3.0)}
f64 = torch.float64


def t(rows):
    return torch.tensor(rows, dtype=f64)


# --------------------------------------------------------------------------------------
# The loop against hand-computed values.
# --------------------------------------------------------------------------------------

def test_loop_single_pair_each_kernel():
    q, k, v = t([[1.0, 2.0]]), t([[3.0, -1.0]]), t([[2.0, -5.0]])
    x, rho, s = 1.0, 13.0, 0.7  # q·k = 3 − 2, ‖q−k‖² = 4 + 9
    expected = {
        "dot": s * x,
        "gaussian": math.exp(s * x),
        "rbf": math.exp(-s * rho),
        "fractional": s * rho ** (-1.5 / 2),
        "log": -2 * s * math.log(math.sqrt(rho)) - 0.25,
    }
    for kernel, w in expected.items():
        out = loop_aggregate(q, k, v, kernel, scale=s, power=1.5, gamma=0.25, normalize="none")
        torch.testing.assert_close(out, w * v, rtol=1e-14, atol=0)
        out = loop_aggregate(q, k, v, kernel, scale=s, power=1.5, gamma=0.25, normalize="count")
        torch.testing.assert_close(out, w * v, rtol=1e-14, atol=0)


def test_loop_log_default_gamma():
    q, k, v = t([[0.0, 0.0]]), t([[0.0, 2.0]]), t([[1.0]])
    out = loop_aggregate(q, k, v, "log", normalize="none")
    assert out.item() == pytest.approx(-math.log(4.0) - EULER_GAMMA, rel=1e-15)


def test_loop_two_point_fractional():
    # power = 2: w = 1/rho.  rho = [[1, 4], [2, 1]]  ->  W = [[1, 1/4], [1/2, 1]]
    q, k = t([[0.0, 0.0], [1.0, 0.0]]), t([[0.0, 1.0], [2.0, 0.0]])
    v = t([[1.0], [2.0]])
    out = loop_aggregate(q, k, v, "fractional", power=2.0, normalize="none")
    torch.testing.assert_close(out, t([[1.5], [2.5]]), rtol=1e-15, atol=0)
    out = loop_aggregate(q, k, v, "fractional", power=2.0, normalize="count")
    torch.testing.assert_close(out, t([[0.75], [1.25]]), rtol=1e-15, atol=0)
    out = loop_aggregate(q, k, v, "fractional", power=2.0, normalize="row")
    torch.testing.assert_close(out, t([[1.5 / 1.25], [2.5 / 1.5]]), rtol=1e-15, atol=0)
    # sym: r = [5/4, 3/2], c = [3/2, 5/4]
    r, c = [1.25, 1.5], [1.5, 1.25]
    W = [[1.0, 0.25], [0.5, 1.0]]
    expected = [[sum(W[i][j] / math.sqrt(r[i] * c[j]) * v[j, 0].item() for j in range(2))]
                for i in range(2)]
    out = loop_aggregate(q, k, v, "fractional", power=2.0, normalize="sym")
    torch.testing.assert_close(out, t(expected), rtol=1e-15, atol=0)
    # scale multiplies W; power = 4 squares 1/rho
    out = loop_aggregate(q, k, v, "fractional", power=4.0, scale=3.0, normalize="none")
    torch.testing.assert_close(out, t([[3 * (1 + 2 / 16)], [3 * (1 / 4 + 2)]]),
                               rtol=1e-15, atol=0)


def test_loop_sym_normalization_dot():
    # W = q kᵀ = [[1, 1], [1, 2]], r = c = [2, 3]
    q = k = t([[1.0, 0.0], [1.0, 1.0]])
    v = t([[1.0], [0.0]])
    out = loop_aggregate(q, k, v, "dot", normalize="sym")
    torch.testing.assert_close(out, t([[0.5], [1 / math.sqrt(6)]]), rtol=1e-15, atol=0)


def test_loop_sym_negative_sum_is_nan():
    q, k, v = t([[1.0]]), t([[-1.0]]), t([[1.0]])
    assert math.isnan(loop_aggregate(q, k, v, "dot", normalize="sym").item())


def test_loop_row_rows_sum_to_one_and_diffusion():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(4, 3, generator=g, dtype=f64), torch.randn(4, 3, generator=g, dtype=f64)
    v, u = torch.randn(4, 2, generator=g, dtype=f64), torch.randn(4, 2, generator=g, dtype=f64)
    for kernel in ["gaussian", "rbf", "fractional"]:
        ones = torch.ones(4, 1, dtype=f64)
        out = loop_aggregate(q, k, ones, kernel, power=1.5, normalize="row")
        torch.testing.assert_close(out, ones, rtol=1e-14, atol=0)
        # with row, diffusion is Σ_j a_ij (v_j − u_i) = aggregate − u_i
        agg = loop_aggregate(q, k, v, kernel, power=1.5, normalize="row")
        dif = loop_aggregate(q, k, v, kernel, power=1.5, normalize="row", update="diffusion",
                             self_value=u)
        torch.testing.assert_close(dif, agg - u, rtol=1e-13, atol=1e-14)
        # default self_value is value
        dif = loop_aggregate(q, k, v, kernel, power=1.5, normalize="row", update="diffusion")
        torch.testing.assert_close(dif, agg - v, rtol=1e-13, atol=1e-14)


def test_loop_diffusion_none():
    # out_i = Σ_j w_ij v_j − (Σ_j w_ij) u_i with W = [[1, 1/4], [1/2, 1]]
    q, k = t([[0.0, 0.0], [1.0, 0.0]]), t([[0.0, 1.0], [2.0, 0.0]])
    v, u = t([[1.0], [2.0]]), t([[10.0], [20.0]])
    out = loop_aggregate(q, k, v, "fractional", power=2.0, normalize="none",
                         update="diffusion", self_value=u)
    torch.testing.assert_close(out, t([[1.5 - 1.25 * 10], [2.5 - 1.5 * 20]]),
                               rtol=1e-15, atol=0)


def test_loop_symmetric_is_mean_of_both_orders():
    # With none/aggregate: Σ_j ½[f(q_i,k_j) + f(k_i,q_j)] v_j = ½[loop(q,k,v) + loop(k,q,v)]
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(4, 3, generator=g, dtype=f64), torch.randn(4, 3, generator=g, dtype=f64)
    v = torch.randn(4, 2, generator=g, dtype=f64)
    for kernel in KERNELS:
        kw = dict(power=1.5, normalize="none")
        sym = loop_aggregate(q, k, v, kernel, symmetric=True, **kw)
        both = 0.5 * (loop_aggregate(q, k, v, kernel, **kw) + loop_aggregate(k, q, v, kernel, **kw))
        torch.testing.assert_close(sym, both, rtol=1e-13, atol=1e-14)


def test_loop_coincident_pairs_get_zero_weight():
    q = t([[1.0, 2.0], [0.0, 1.0]])
    k = t([[1.0, 2.0], [3.0, 1.0]])  # k_0 = q_0
    v = t([[100.0], [1.0]])
    for kernel in ["fractional", "log"]:
        out = loop_aggregate(q, k, v, kernel, power=1.5, gamma=-3.0, normalize="none")
        w01 = loop_aggregate(q[:1], k[1:], v[1:], kernel, power=1.5, gamma=-3.0,
                             normalize="none")
        assert out[0, 0].item() == w01.item()  # the coincident pair adds nothing
        # a whole coincident row: sum 0, row/sym normalization give 0 (safe divide)
        for normalize in NORMALIZES:
            out = loop_aggregate(q[:1], k[:1], v[:1], kernel, power=1.5, normalize=normalize)
            assert out.item() == 0.0
        # the origin with itself: rho = 0 <= eps * 0
        z = t([[0.0, 0.0]])
        assert loop_aggregate(z, z, v[:1], kernel, power=1.5, normalize="row").item() == 0.0


def test_loop_default_eps_depends_on_dtype():
    # rho_00 = 1e-6 <= 1e-4·(‖q̄‖² + ‖k̄‖²) but > 1e-12·(‖q̄‖² + ‖k̄‖²); the keys' mean is 0, so q̄ = q,
    # k̄ = k; the second key has value 0
    q, k, v = t([[1.0, 0.0]]), t([[1.0 + 1e-3, 0.0], [-1.0 - 1e-3, 0.0]]), t([[1.0], [0.0]])
    for kernel in ["fractional", "log"]:
        kw = dict(power=1.5, normalize="none")
        assert loop_aggregate(q.float(), k.float(), v.float(), kernel, **kw).item() == 0.0
        assert loop_aggregate(q, k, v, kernel, **kw).item() != 0.0
        assert loop_aggregate(q, k, v, kernel, eps=1e-4, **kw).item() == 0.0


def test_loop_batch_dims_are_independent():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 4, 3, generator=g, dtype=f64)
    k = torch.randn(2, 3, 5, 3, generator=g, dtype=f64)
    v = torch.randn(2, 3, 5, 2, generator=g, dtype=f64)
    out = loop_aggregate(q, k, v, "rbf")
    assert out.shape == (2, 3, 4, 2) and out.dtype == f64
    for a, b in itertools.product(range(2), range(3)):
        torch.testing.assert_close(out[a, b], loop_aggregate(q[a, b], k[a, b], v[a, b], "rbf"),
                                   rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# The reference backend against the loop.
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    def run(*args, **kwargs):
        return nonlocal_ext.nonlocal_aggregate(*args, backend="reference", **kwargs)
    return run


def kernel_params(kernel):
    """scale/power/gamma per kernel; log uses gamma = −3 so that its weights are positive."""
    return {
        "dot": dict(scale=0.7),
        "gaussian": dict(scale=0.5),
        "rbf": dict(scale=0.3),
        "fractional": dict(scale=1.3, power=1.5),
        "log": dict(scale=0.5, gamma=-3.0),
    }[kernel]


def loop_inputs(kernel, normalize, batch, N, M, with_self, seed):
    """q, k, v, self_value; coincident pairs for fractional/log, positive dot data for row/sym."""
    g = torch.Generator().manual_seed(seed)
    if kernel == "dot" and normalize in ("row", "sym"):
        # positive entries keep row and column sums away from 0
        q = 0.5 + torch.rand(*batch, N, 3, generator=g, dtype=f64)
        k = 0.5 + torch.rand(*batch, M, 3, generator=g, dtype=f64)
    else:
        q = torch.randn(*batch, N, 3, generator=g, dtype=f64)
        k = torch.randn(*batch, M, 3, generator=g, dtype=f64)
    if kernel in ("fractional", "log"):
        k[..., 1, :] = q[..., 0, :]
        k[..., 2, :] = q[..., 2, :]
    v = torch.randn(*batch, M, 2, generator=g, dtype=f64)
    u = torch.randn(*batch, N, 2, generator=g, dtype=f64) if with_self else None
    return q, k, v, u


def compare(reference, q, k, v, kernel, expect_finite=True, **kw):
    expected = loop_aggregate(q, k, v, kernel, **kw)
    got = reference(q, k, v, kernel, **kw)
    assert got.dtype == f64 and got.shape == expected.shape
    if expect_finite:
        assert torch.isfinite(expected).all()
        assert torch.isfinite(got).all()
    assert_close_to_truth(got, expected, expected, f64, "reference vs loop", floor=1.0)
    return got


def _square_cases():
    # self_value is only accepted with update="diffusion" (test_validation covers the error).
    for kernel, normalize, (update, with_self), symmetric, batch in itertools.product(
            KERNELS, NORMALIZES, UPDATE_CASES, [False, True], [(), (2,)]):
        yield kernel, normalize, update, symmetric, with_self, batch, 4, 4


def _rectangular_cases():
    # N ≠ M: symmetric is not allowed, diffusion needs self_value.
    for kernel, normalize, (update, with_self) in itertools.product(
            KERNELS, NORMALIZES,
            [("aggregate", False), ("diffusion", True)]):
        yield kernel, normalize, update, False, with_self, (2,), 3, 5


def _case_id(case):
    kernel, normalize, update, symmetric, with_self, batch, N, M = case
    batch_id = "B" + "x".join(map(str, batch)) if batch else "B-"
    return "-".join([kernel, normalize, update, "symm" if symmetric else "nosymm",
                     "u" if with_self else "nou", batch_id, f"N{N}M{M}"])


ALL_CASES = list(_square_cases()) + list(_rectangular_cases())


@pytest.mark.parametrize("case", ALL_CASES, ids=[_case_id(c) for c in ALL_CASES])
def test_reference_matches_loop(reference, case):
    kernel, normalize, update, symmetric, with_self, batch, N, M = case
    seed = ALL_CASES.index(case)
    q, k, v, u = loop_inputs(kernel, normalize, batch, N, M, with_self, seed)
    compare(reference, q, k, v, kernel, normalize=normalize, update=update,
            symmetric=symmetric, self_value=u, **kernel_params(kernel))


@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_reference_log_default_gamma(reference, update, symmetric):
    q, k, v, _ = loop_inputs("log", "none", (2,), 4, 4, False, seed=1000)
    compare(reference, q, k, v, "log", scale=0.5, normalize="none", update=update,
            symmetric=symmetric)


@pytest.mark.parametrize("normalize", NORMALIZES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_reference_fractional_power_3(reference, normalize, symmetric):
    q, k, v, u = loop_inputs("fractional", normalize, (), 4, 4, True, seed=1001)
    compare(reference, q, k, v, "fractional", scale=0.8, power=3.0, normalize=normalize,
            update="diffusion", symmetric=symmetric, self_value=u)


@pytest.mark.parametrize("kernel", ["fractional", "log"])
@pytest.mark.parametrize("normalize", NORMALIZES)
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_reference_whole_row_coincident(reference, kernel, normalize, update, symmetric):
    """N = M = 1 with q = k: the only weight is 0, so row/sym sums are 0 and the output is 0."""
    q = t([[0.3, -1.2, 0.7]])
    k = q.clone()
    v, u = t([[1.5, -2.0]]), t([[0.25, 4.0]])
    got = compare(reference, q, k, v, kernel, normalize=normalize, update=update,
                  symmetric=symmetric, self_value=u if update == "diffusion" else None,
                  **POWER[kernel])
    assert (got == 0).all()


@pytest.mark.parametrize("kernel", ["fractional", "log"])
@pytest.mark.parametrize("normalize", NORMALIZES)
def test_reference_one_zero_row_among_others(reference, kernel, normalize):
    """Row 0 is all coincident (sum 0, output 0); row 1 is normalized as usual."""
    q = t([[0.3, -1.2, 0.7], [1.0, 0.5, -0.4]])
    k = q[:1].clone()
    v, u = t([[1.5, -2.0]]), t([[0.25, 4.0], [-1.0, 2.0]])
    for update in UPDATES:
        got = compare(reference, q, k, v, kernel, normalize=normalize,
                      update=update, self_value=u if update == "diffusion" else None,
                      **PARAMS[kernel])
        assert (got[0] == 0).all()


@pytest.mark.parametrize("kernel", ["fractional", "log"])
def test_reference_explicit_eps(reference, kernel):
    """A near-coincident pair (rho = 1e-4·‖q‖²) is dropped with eps=1e-2, kept with eps=0."""
    g = torch.Generator().manual_seed(1002)
    q = torch.randn(2, 4, 3, generator=g, dtype=f64)
    k = torch.randn(2, 4, 3, generator=g, dtype=f64)
    k[:, 1] = q[:, 0] * (1 + 1e-2)
    v = torch.randn(2, 4, 2, generator=g, dtype=f64)
    dropped, kept = [compare(reference, q, k, v, kernel, eps=eps, normalize="none",
                             **PARAMS[kernel]) for eps in [1e-2, 0.0]]
    assert not torch.equal(dropped[:, 0], kept[:, 0])
    torch.testing.assert_close(dropped[:, 1:], kept[:, 1:], rtol=0, atol=0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_reference_two_batch_dims(reference, kernel):
    q, k, v, u = loop_inputs(kernel, "sym", (2, 3), 3, 5, True, seed=1003)
    compare(reference, q, k, v, kernel, normalize="sym", update="diffusion", self_value=u,
            **kernel_params(kernel))
