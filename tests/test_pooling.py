"""The layers' key max-pool (nonlocal_ext.nn.pooling, csrc/pooling.cpp): bitwise torch's max-pooling.

Run alone: .venv/bin/python -m pytest -q tests/test_pooling.py
"""

import pytest
import torch
import torch.nn.functional as F

import nonlocal_ext
from nonlocal_ext.nn import pooling

OPS = torch.ops.nonlocal_ext
TORCH_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
OUR_POOL = {1: pooling.MaxPool1d, 2: pooling.MaxPool2d, 3: pooling.MaxPool3d}

# (input shape, window): the layers' windows (2, 2×2, 1×2×2, 2×2×2) and others, at sizes that leave a floored rest.
CASES = [((2, 3, 11), (2,)), ((2, 3, 7, 9), (2, 2)), ((2, 3, 5, 7, 9), (1, 2, 2)), ((2, 3, 6, 8, 9), (2, 2, 2)),
         ((2, 3, 7, 9), (3, 2)), ((1, 2, 4, 5, 7), (2, 1, 3)), ((3, 1, 2, 2), (2, 2))]


def special_values(shape, dtype):
    """Values with ties (small integers, ±0) and, in some windows, NaN and ±Inf."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, shape, generator=g).to(dtype)
    flat = x.view(-1)
    flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 20),), generator=g)] = -0.0
    flat[3] = float("nan")
    flat[7] = float("-inf")
    flat[-5] = float("inf")
    flat[-9] = float("nan")
    flat[-8] = float("nan")
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,window", CASES, ids=str)
@pytest.mark.parametrize("values", ["random", "special"])
def test_values_indices_and_gradients_are_torchs(shape, window, values, dtype):
    """The first maximum of each window, the last NaN, as ATen's max_pool*_with_indices; the gradient at it."""
    x = torch.randn(shape, dtype=dtype) if values == "random" else special_values(shape, dtype)
    dims = len(window)
    out, indices = OPS.max_pool_forward(x, list(window))
    want, want_indices = TORCH_POOL[dims](x, window, return_indices=True)
    assert torch.equal(indices, want_indices)
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.nan_to_num(), want.nan_to_num())
    assert torch.equal(out.nan_to_num().signbit(), want.nan_to_num().signbit())  # −0 stays −0
    leaf, leaf_torch = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(want.shape, dtype=dtype)
    (ours,) = torch.autograd.grad(OUR_POOL[dims](window)(leaf), leaf, grad)
    (theirs,) = torch.autograd.grad(TORCH_POOL[dims](leaf_torch, window), leaf_torch, grad)
    assert torch.equal(ours, theirs)


def test_the_modules_run_the_op_where_it_applies_and_torch_elsewhere():
    x = torch.randn(2, 3, 6, 8, requires_grad=True)
    runs_op = "GeneratedBackwardFor_nonlocal_ext_max_pool_forward"
    assert runs_op in type(pooling.MaxPool2d(2)(x).grad_fn).__name__
    others = [(pooling.MaxPool2d(2), x.transpose(2, 3)),                # not contiguous
              (pooling.MaxPool2d(2), x.bfloat16()),                     # another dtype
              (pooling.MaxPool2d(2, stride=1), x),                      # overlapping windows
              (pooling.MaxPool2d(2, padding=1), x),
              (pooling.MaxPool2d(2, ceil_mode=True), x),
              (pooling.MaxPool2d(2, dilation=2), x)]
    for module, t in others:
        out = module(t)
        assert runs_op not in type(out.grad_fn).__name__
        torch.testing.assert_close(out, F.max_pool2d(t, module.kernel_size, module.stride, module.padding,
                                                     module.dilation, module.ceil_mode), rtol=0, atol=0)
    with pytest.raises(RuntimeError):  # a window larger than the input: torch's own error
        pooling.MaxPool2d(4)(torch.randn(1, 1, 3, 3))


@pytest.mark.parametrize("shape,window", CASES[:4], ids=str)
def test_gradcheck_and_gradgradcheck(shape, window):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    module = OUR_POOL[len(window)](window)
    assert torch.autograd.gradcheck(module, (x,))
    assert torch.autograd.gradgradcheck(module, (x,))


@pytest.mark.parametrize("shape,window", CASES[:4], ids=str)
def test_opcheck(shape, window):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(OPS.max_pool_forward, (x, list(window)))
    out, indices = OPS.max_pool_forward(x.detach(), list(window))
    torch.library.opcheck(OPS.max_pool_backward, (torch.randn_like(out), indices, x.detach()))


def test_the_blocks_pool_their_keys_with_it_and_compile():
    layer = nonlocal_ext.nn.NonLocal3d(8, sub_sample=True)
    assert all(isinstance(m, pooling.MaxPool3d) for m in (layer.g[1], layer.phi[1]))
    x = torch.randn(2, 8, 3, 6, 6)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
