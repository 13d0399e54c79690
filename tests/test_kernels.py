"""The kernel registry's own formulas: each derivative is the derivative of its weight.

Run alone: .venv/bin/python -m pytest -q tests/test_kernels.py
"""

from __future__ import annotations

import pytest
import torch

from nonlocal_ext import KERNELS
from nonlocal_ext.kernels import KernelParams

PARAMS = KernelParams(scale=0.7, power=1.5, gamma=-0.3, eps=0.0)


@pytest.mark.parametrize("name", list(KERNELS))
def test_derivative_is_the_derivative_of_the_weight(name):
    kernel = KERNELS[name]
    x = torch.linspace(0.05, 3.0, 50, dtype=torch.float64, requires_grad=True)
    w = kernel.weight(x, PARAMS)
    (expected,) = torch.autograd.grad(w.sum(), x)
    torch.testing.assert_close(kernel.derivative(x.detach(), w.detach(), PARAMS), expected, rtol=1e-12, atol=1e-12)
    if kernel.log_domain:
        torch.testing.assert_close(kernel.log_weight(x.detach(), PARAMS), torch.log(w.detach()), rtol=1e-12, atol=0)
        torch.testing.assert_close(torch.full_like(expected, kernel.log_derivative(PARAMS)), expected / w.detach(),
                                   rtol=1e-12, atol=0)
