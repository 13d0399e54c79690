"""Every bad input raises a TypeError or ValueError that names the argument.

Run alone: .venv/bin/python -m pytest -q tests/test_validation.py
"""

from __future__ import annotations

import math

import pytest
import torch

from nonlocal_ext import nonlocal_aggregate
from nonlocal_ext.kernels import EULER_GAMMA


def good(n=4, m=4, d=3, c=2, dtype=torch.float32):
    return dict(query=torch.randn(2, n, d, dtype=dtype), key=torch.randn(2, m, d, dtype=dtype),
                value=torch.randn(2, m, c, dtype=dtype))


def call(**overrides):
    args = good()
    args.update(overrides)
    return nonlocal_aggregate(args.pop("query"), args.pop("key"), args.pop("value"), **args)


# (overrides, exception type, a phrase the message must contain)
BAD_INPUTS = {
    "query not a tensor": (dict(query=[[1.0]]), TypeError, "query must be a torch.Tensor"),
    "key not a tensor": (dict(key=3.0), TypeError, "key must be a torch.Tensor"),
    "value not a tensor": (dict(value=None), TypeError, "value must be a torch.Tensor"),
    "self_value not a tensor": (dict(self_value="u", update="diffusion"), TypeError, "self_value must be a torch.Tensor"),
    "integer query": (dict(query=torch.ones(2, 4, 3, dtype=torch.int64)), TypeError, "query must be a floating-point"),
    "complex key": (dict(key=torch.ones(2, 4, 3, dtype=torch.complex64)), TypeError, "key must be a floating-point"),
    "bool value": (dict(value=torch.ones(2, 4, 2, dtype=torch.bool)), TypeError, "value must be a floating-point"),
    "query rank 1": (dict(query=torch.randn(3)), ValueError, "query must have at least 2 dimensions"),
    "key rank 1": (dict(key=torch.randn(3)), ValueError, "key must have at least 2 dimensions"),
    "value rank 1": (dict(value=torch.randn(4)), ValueError, "value must have at least 2 dimensions"),
    "mixed dtypes": (dict(key=torch.randn(2, 4, 3, dtype=torch.float64)), TypeError, "key has dtype torch.float64"),
    "mixed dtypes self_value": (dict(self_value=torch.randn(2, 4, 2, dtype=torch.float64), update="diffusion"),
                                TypeError, "self_value has dtype"),
    "mixed devices": (dict(value=torch.randn(2, 4, 2, device="meta")), ValueError, "value is on meta"),
    "batch dims differ": (dict(key=torch.randn(3, 4, 3)), ValueError, "key has batch dims (3,)"),
    "batch rank differs": (dict(value=torch.randn(4, 2)), ValueError, "value has batch dims ()"),
    "feature dims differ": (dict(key=torch.randn(2, 4, 5)), ValueError, "key has 5 features but query has 3"),
    "value positions differ": (dict(value=torch.randn(2, 5, 2)), ValueError, "value has 5 positions but key has 4"),
    "self_value shape": (dict(self_value=torch.randn(2, 4, 3), update="diffusion"), ValueError,
                         "self_value must have shape (..., N=4, C=2)"),
    "self_value with aggregate": (dict(self_value=torch.randn(2, 4, 2)), ValueError,
                                  "self_value is only used by update='diffusion'"),
    "unknown kernel": (dict(kernel="cosine"), ValueError, "unknown kernel='cosine'"),
    "kernel not a string": (dict(kernel=1), TypeError, "kernel must be a string"),
    "unknown normalize": (dict(normalize="softmax"), ValueError, "unknown normalize='softmax'"),
    "unknown update": (dict(update="replace"), ValueError, "unknown update='replace'"),
    "unknown backend": (dict(backend="cuda"), ValueError, "unknown backend='cuda'"),
    "symmetric not bool": (dict(symmetric=1), TypeError, "symmetric must be a bool"),
    "symmetric with N != M": (dict(query=torch.randn(2, 3, 3), symmetric=True), ValueError,
                              "symmetric=True needs as many queries as keys"),
    "default diffusion with N != M": (dict(query=torch.randn(2, 3, 3), update="diffusion"), ValueError,
                                      "update='diffusion' without self_value"),
    "missing power": (dict(kernel="fractional"), ValueError, "kernel='fractional' needs power="),
    "non-finite power": (dict(kernel="fractional", power=math.inf), ValueError, "power must be finite"),
    "nan power": (dict(kernel="fractional", power=math.nan), ValueError, "power must be finite"),
    "power not a number": (dict(kernel="fractional", power="2"), TypeError, "power must be a real number"),
    "power for another kernel": (dict(kernel="rbf", power=2.0), ValueError, "power is only used by kernel='fractional'"),
    "non-finite scale": (dict(scale=math.nan), ValueError, "scale must be finite"),
    "infinite scale": (dict(scale=-math.inf), ValueError, "scale must be finite"),
    "scale not a number": (dict(scale=torch.tensor(1.0)), TypeError, "scale must be a real number"),
    "scale is a bool": (dict(scale=True), TypeError, "scale must be a real number"),
    "non-finite gamma": (dict(kernel="log", gamma=math.inf), ValueError, "gamma must be finite"),
    "gamma not a number": (dict(kernel="log", gamma="0.5"), TypeError, "gamma must be a real number"),
    "gamma for another kernel": (dict(kernel="rbf", gamma=0.5), ValueError, "gamma is only used by kernel='log', not "
                                                                           "kernel='rbf'"),
    "gamma for the default kernel": (dict(gamma=0.0), ValueError, "gamma is only used by kernel='log', not "
                                                                  "kernel='gaussian'"),
    "gamma for fractional": (dict(kernel="fractional", power=1.0, gamma=-3.0), ValueError,
                             "gamma is only used by kernel='log'"),
    "negative scale rbf": (dict(kernel="rbf", scale=-1.0), ValueError, "scale must be > 0 for kernel='rbf', got -1.0"),
    "zero scale rbf": (dict(kernel="rbf", scale=0), ValueError, "scale must be > 0 for kernel='rbf'"),
    "negative scale log": (dict(kernel="log", scale=-0.5), ValueError, "scale must be > 0 for kernel='log', got -0.5"),
    "sym with non-positive fractional": (dict(kernel="fractional", power=1.0, scale=-1.0, normalize="sym"), ValueError,
                                         "normalize='sym' with kernel='fractional' and scale=-1.0: every weight is <= 0"),
    "negative eps": (dict(kernel="log", eps=-1e-3), ValueError, "eps must be finite and >= 0"),
    "eps not a number": (dict(kernel="log", eps="small"), TypeError, "eps must be a real number or None"),
    "empty M with row": (dict(key=torch.randn(2, 0, 3), value=torch.randn(2, 0, 2)), ValueError,
                         "key has no positions (M = 0): normalize='row' is undefined"),
    "empty M with count": (dict(key=torch.randn(2, 0, 3), value=torch.randn(2, 0, 2), normalize="count"), ValueError,
                           "key has no positions (M = 0): normalize='count' is undefined"),
    "empty M with sym": (dict(key=torch.randn(2, 0, 3), value=torch.randn(2, 0, 2), normalize="sym"), ValueError,
                         "key has no positions (M = 0): normalize='sym' is undefined"),
    "self_value rank 1": (dict(self_value=torch.randn(2), update="diffusion"), ValueError,
                          "self_value must have at least 2 dimensions"),
    "self_value on another device": (dict(self_value=torch.randn(2, 4, 2, device="meta"), update="diffusion"),
                                     ValueError, "self_value is on meta"),
    "numpy bool symmetric": (dict(symmetric=__import__("numpy").bool_(True)), TypeError,
                             "symmetric must be a bool, got numpy.bool"),
    "linear for gaussian": (dict(backend="linear"), ValueError, "backend='linear' is the exact low-rank path"),
    "triton not available": (dict(backend="triton"), ValueError, "backend='triton'"),
    "cpu on a non-CPU device": (dict(backend="cpu", **{name: torch.empty(2, 4, 3, device="meta")
                                                       for name in ("query", "key", "value")}),
                                ValueError, "backend='cpu' runs on CPU tensors, got a tensor on meta"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(case):
    overrides, error, phrase = BAD_INPUTS[case]
    with pytest.raises(error) as info:
        call(**overrides)
    assert phrase in str(info.value)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_unavailable_backend_lists_what_is_available(backend):
    meta = {name: torch.empty(2, 4, 3, device="meta") for name in ("query", "key", "value")}
    with pytest.raises(ValueError, match="backends available for these inputs: reference, chunked$"):
        call(backend=backend, **meta)


def test_good_inputs_pass():
    assert call().shape == (2, 4, 2)


def test_numpy_scalars_are_numbers():
    import numpy as np
    assert call(kernel="fractional", scale=np.float32(0.5), power=np.int64(3), eps=np.float64(1e-3)).shape == (2, 4, 2)


def test_no_positions_at_all_is_an_empty_result():
    out = call(query=torch.randn(2, 0, 3), key=torch.randn(2, 0, 3), value=torch.randn(2, 0, 2))
    assert out.shape == (2, 0, 2)


def test_scale_sign_is_free_where_it_bounds_the_kernel():
    """A negative scale is refused only where the kernel would grow without bound (rbf, log):
    gaussian and dot just flip the sign of q·k, and fractional with scale < 0 and power < 0 is the
    Riesz potential with its negative constant (n < 2s), as long as it is not ``sym``-normalized."""
    for kwargs in (dict(kernel="gaussian", scale=-1.0), dict(kernel="dot", scale=-2.0, normalize="count"),
                   dict(kernel="fractional", power=-0.5, scale=-0.3, normalize="row")):
        assert torch.isfinite(call(**kwargs)).all(), kwargs


def test_rbf_with_a_negative_scale_used_to_overflow():
    """The problem the check prevents: exp(+ρ) overflows float32 at ρ > 88."""
    q = torch.full((1, 2, 1), 0.0)
    q[0, 1, 0] = 10.0  # ρ = 100
    with pytest.raises(ValueError, match="scale must be > 0 for kernel='rbf'"):
        nonlocal_aggregate(q, q, q, "rbf", scale=-1.0, normalize="none")
    assert torch.isfinite(nonlocal_aggregate(q, q, q, "rbf", scale=1.0, normalize="none")).all()


def test_log_default_gamma_is_euler():
    # the Euler–Mascheroni constant γ = −ψ(1), from torch's digamma (within one ulp)
    assert EULER_GAMMA == pytest.approx(-torch.special.digamma(torch.tensor(1.0, dtype=torch.float64)).item(),
                                        rel=1e-15, abs=0)
    args = good()
    out = nonlocal_aggregate(args["query"], args["key"], args["value"], "log", normalize="none")
    torch.testing.assert_close(out, nonlocal_aggregate(args["query"], args["key"], args["value"], "log",
                                                       gamma=EULER_GAMMA, normalize="none"), rtol=0, atol=0)


# --- normalize="sym" with kernels whose weights take either sign (dot, log) -------------------

SYM_BACKENDS = ["auto", "reference", "chunked", "cpu"]


def _available(backend, kernel):
    from nonlocal_ext import backends, spec as spec_module
    q = torch.randn(1, 2, 2)
    s = spec_module.validate(q, q, q, kernel, scale=1.0, power=None, gamma=None, eps=None, normalize="sym",
                             update="aggregate", symmetric=False, self_value=None, backend="auto")
    return backend == "auto" or backend in backends.available(s, q)


@pytest.mark.parametrize("backend", SYM_BACKENDS + ["linear"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dot_sym_with_negative_sums_is_a_value_error_on_every_backend(backend, symmetric):
    """``dot`` + ``sym`` on ordinary (signed) inputs used to be NaN silently on every backend."""
    if not _available(backend, "dot"):
        pytest.skip(f"backend {backend} not available here")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 4, generator=g) for _ in range(3))
    with pytest.raises(ValueError, match="normalize='sym' with kernel='dot': a row or column sum of the affinities "
                                         "is negative") as info:
        nonlocal_aggregate(q, k, v, "dot", normalize="sym", symmetric=symmetric, backend=backend)
    assert "ReLU" in str(info.value) and "normalize='row'" in str(info.value)
    # non-negative embeddings (ReLU, as in the spectral nonlocal authors' code) are what sym needs
    out = nonlocal_aggregate(q.relu(), k.relu(), v, "dot", normalize="sym", symmetric=symmetric, backend=backend)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", SYM_BACKENDS)
def test_log_sym_with_negative_sums_is_a_value_error_on_every_backend(backend):
    """``nonlocal_aggregate(q, q, v, "log", normalize="sym")`` used to be NaN on every backend: with the
    default gamma the log weights are negative for ρ > exp(−0.577) ≈ 0.56."""
    if not _available(backend, "log"):
        pytest.skip(f"backend {backend} not available here")
    g = torch.Generator().manual_seed(0)
    q, v = torch.randn(2, 16, 4, generator=g), torch.randn(2, 16, 3, generator=g)
    with pytest.raises(ValueError, match=r"normalize='sym' with kernel='log'.*exp\(−gamma/scale\)"):
        nonlocal_aggregate(q, q, v, "log", normalize="sym", backend=backend)
    # a gamma that keeps every weight positive on this data: defined, finite
    out = nonlocal_aggregate(q, q, v, "log", normalize="sym", gamma=-6.0, backend=backend)
    assert torch.isfinite(out).all()


def test_sym_check_lets_nan_inputs_propagate():
    """NaN inputs give NaN outputs by design (as the dense formula would): not the sums' error."""
    q, k, v = (torch.rand(1, 5, 3) for _ in range(3))
    q[0, 2, 1] = math.nan
    out = nonlocal_aggregate(q, k, v, "dot", normalize="sym")
    assert out.isnan().any()


def test_sym_check_is_skipped_where_values_cannot_be_read():
    """Under FakeTensorMode (and on meta tensors, and while torch.compile traces) no value exists:
    the call gives its shape, and a negative sum would give NaN at run time."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q, v = torch.randn(2, 16, 4), torch.randn(2, 16, 3)
        out = nonlocal_aggregate(q, q, v, "log", normalize="sym")
    assert out.shape == (2, 16, 3)
    q = torch.empty(2, 16, 4, device="meta")
    assert nonlocal_aggregate(q, q, q, "dot", normalize="sym").shape == (2, 16, 4)
    # under vmap a tensor's values cannot steer Python: the check steps aside, the call works
    q, v = torch.rand(3, 5, 4), torch.randn(3, 5, 2)
    out = torch.vmap(lambda a, b: nonlocal_aggregate(a, a, b, "dot", normalize="sym", backend="reference"))(q, v)
    torch.testing.assert_close(out, nonlocal_aggregate(q, q, v, "dot", normalize="sym", backend="reference"))
