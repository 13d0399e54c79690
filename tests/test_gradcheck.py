"""torch.autograd.gradcheck in float64 for reference, chunked, linear and cpu, every combination.

Run alone: .venv/bin/python -m pytest -q tests/test_gradcheck.py
"""

from __future__ import annotations

import pytest
import torch

import nonlocal_ext
from common import COMBOS, combo_id, kernel_kwargs
from nonlocal_ext.backends import chunked
from nonlocal_ext.testing import make_inputs


def cases():
    for combo in COMBOS:
        for backend in ("reference", "chunked", "cpu") + (("linear",) if combo[0] == "dot" else ()):
            yield pytest.param(backend, combo, id=f"{backend}-{combo_id(combo)}")


@pytest.mark.parametrize("backend,combo", list(cases()))
def test_gradcheck(monkeypatch, backend, combo):
    kernel, normalize, update, symmetric, with_self_value = combo
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 2 * 5 * 2)  # 2 rows per block: several blocks
    square = symmetric or (update == "diffusion" and not with_self_value)
    n, m = (5, 5) if square else (4, 6)
    # no coincident pairs: the weights are discontinuous there, finite differences are not
    inputs = make_inputs(kernel, normalize, (2,), n, m, 3, 2, with_self_value=with_self_value, coincident=False)
    inputs = [t.requires_grad_() for t in inputs if t is not None]

    def f(q, k, v, u=None):
        return nonlocal_ext.nonlocal_aggregate(q, k, v, kernel, normalize=normalize, update=update,
                                               symmetric=symmetric, self_value=u, backend=backend,
                                               **kernel_kwargs(kernel))

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
