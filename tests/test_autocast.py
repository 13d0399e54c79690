"""``nonlocal_aggregate`` under ``torch.autocast``: PyTorch's convention for ops that run in the
autocast dtype (``torch.library.register_autocast``, ``scaled_dot_product_attention``).

Inside ``torch.autocast(device_type, dtype)``, floating inputs on that device other than float64 are
cast to the autocast dtype and the result comes back in it; so the bfloat16 output of a layer can
meet float32 tensors. Before, that raised ``TypeError: key has dtype torch.float32 but query has
torch.bfloat16``, and float32 inputs gave a float32 result.

Run alone: .venv/bin/python -m pytest -q tests/test_autocast.py
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nonlocal_ext import nn as nl
from nonlocal_ext import nonlocal_aggregate
from nonlocal_ext.testing import KERNEL_PARAMS
from nonlocal_ext.nn._common import positions

KERNELS = list(KERNEL_PARAMS)
CPU_BACKENDS = ["auto", "reference", "chunked", "cpu"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOW = [torch.bfloat16, torch.float16]


def inputs(n=12, m=9, d=4, c=3, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, size, width, generator=g) / 2 for size, width in ((n, d), (m, d), (m, c)))
    return q.to(device), k.to(device), v.to(device)


# every backend that runs on CPU tensors, with every kernel it takes (linear: dot only)
KERNEL_BACKENDS = [(kernel, backend) for kernel in KERNELS for backend in CPU_BACKENDS] + [("dot", "linear")]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("kernel,backend", KERNEL_BACKENDS)
def test_mixed_inputs_are_cast_to_the_autocast_dtype(kernel, backend, dtype):
    """A low-precision query with float32 key and value: accepted, computed on the inputs cast to the
    autocast dtype (exactly what the op gives for those inputs outside autocast), result in that dtype."""
    q, k, v = inputs()
    kwargs = dict(KERNEL_PARAMS[kernel], backend=backend)
    with torch.autocast("cpu", dtype=dtype):
        out = nonlocal_aggregate(q.to(dtype), k, v, kernel, **kwargs)
    assert out.dtype == dtype
    expected = nonlocal_aggregate(q.to(dtype), k.to(dtype), v.to(dtype), kernel, **kwargs)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_inputs_give_the_autocast_dtype_like_sdpa(device):
    q, k, v = inputs(n=8, m=8, d=4, c=4, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        ours = nonlocal_aggregate(q, k, v, "gaussian", scale=0.5)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.5)
    assert ours.dtype == sdpa.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), sdpa.float(), rtol=2e-2, atol=2e-2)


def test_float64_is_not_cast_and_mixed_float64_is_still_refused():
    """As in torch.library.register_autocast: float64 is not an autocast candidate."""
    q, k, v = (t.double() for t in inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert nonlocal_aggregate(q, k, v, "rbf", scale=0.5).dtype == torch.float64
        with pytest.raises(TypeError, match="key has dtype torch.float64 but query has torch.bfloat16"):
            nonlocal_aggregate(q.float(), k, v, "rbf", scale=0.5)


def test_autocast_for_another_device_type_changes_nothing():
    q, k, v = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert nonlocal_aggregate(q, k, v).dtype == torch.float32
    with pytest.raises(TypeError, match="key has dtype torch.float32 but query has torch.bfloat16"):
        nonlocal_aggregate(q.bfloat16(), k, v)  # outside autocast, mixed dtypes remain an error


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradients_reach_each_input_in_its_own_dtype(kernel):
    q, k, v = (t.requires_grad_() for t in inputs())
    u = torch.randn(2, 12, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nonlocal_aggregate(q.bfloat16(), k, v, kernel, update="diffusion", self_value=u,
                                 **KERNEL_PARAMS[kernel])
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    for name, t in (("query", q), ("key", k), ("value", v), ("self_value", u)):
        assert t.grad is not None and t.grad.dtype == torch.float32, name
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
def test_outputs_of_real_layers_meet_float32_tensors(device, dtype):
    """The situation of the report: inside autocast a layer's embeddings come out in low precision
    (here a NonLocal2d's θ and g convolutions and a Linear) while other tensors stay float32
    (the block input x, as in the ``gaussian`` mode, or a float32 buffer)."""
    torch.manual_seed(0)
    block = nl.NonLocal2d(8, sub_sample=False).to(device)
    linear = nn.Linear(4, 4).to(device)
    x = torch.randn(2, 8, 5, 6, device=device)
    keys = torch.randn(2, 30, 4, device=device)                        # float32, e.g. a buffer
    with torch.autocast(device, dtype=dtype):
        theta, g = positions(block.theta(x)), positions(block.g(x))     # (2, 30, 4), low precision
        query = linear(theta.float())                                   # low precision again
        assert theta.dtype == g.dtype == query.dtype == dtype
        out = nonlocal_aggregate(query, keys, g, "gaussian", scale=0.5)
        mixed = nonlocal_aggregate(query, positions(x)[..., :4], g, "rbf", scale=0.5)
    assert out.dtype == mixed.dtype == dtype
    assert out.shape == mixed.shape == (2, 30, 4)
    # the same inputs cast by hand; the query requires grad as inside, so that `auto` prices the same passes
    expected = nonlocal_aggregate(query.detach().requires_grad_(), keys.to(dtype), g.detach(), "gaussian", scale=0.5)
    torch.testing.assert_close(out.detach(), expected.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: nl.NonLocal2d(8), lambda: nl.NonLocalStage(8),
                                  lambda: nl.SpectralNonLocal(8), lambda: nl.PIDENonLocal(8, pool=2)],
                         ids=["NonLocal2d", "NonLocalStage", "SpectralNonLocal", "PIDENonLocal"])
def test_layers_run_under_autocast(make):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(2, 8, 6, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
