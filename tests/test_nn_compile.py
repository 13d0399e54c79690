"""``torch.compile(fullgraph=True)`` of a small model holding every layer of ``nonlocal_ext.nn``.

One model (one compilation, a few minutes on 2 shared cores) with each layer on a 2-D input:
outputs and gradients agree with eager mode. The layers use ``backend="auto"``; the op's reference, chunked and
linear backends and the concatenation path all trace without graph breaks.

Run alone: .venv/bin/python -m pytest -q tests/test_nn_compile.py
"""

from __future__ import annotations

import torch
from torch import nn

from nonlocal_ext import nn as nl


def small_model(c=8):
    return nn.Sequential(
        nl.NonLocal2d(c),                                   # embedded Gaussian, sub-sampled: reference backend
        nl.NonLocal2d(c, mode="dot_product"),               # linear backend
        nl.NonLocal2d(c, mode="concatenation"),             # sort + suffix sums
        nl.NonLocalStage(c),
        nl.SpectralNonLocal(c, generalized=True),
        nl.PIDENonLocal(c, "fractional_laplacian", pool=2),  # diffusion with full-resolution self_value
        nl.PIDENonLocal(c, "inverse_fractional_laplacian", s=1.0, backend="chunked"),  # log kernel, chunked backend
    )


def loss_and_grads(model, run, x):
    xi = x.clone().requires_grad_()
    out = run(xi)
    out.square().mean().backward()
    grads = [xi.grad] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return [out.detach()] + grads


def test_compile_fullgraph_model_with_every_layer_matches_eager():
    """In float64, so that the comparison sees what the compiled graph computes rather than
    float32 reassociation by inductor's fused kernels (seen: 2·10⁻⁵ relative through the 7
    BatchNorm-ed blocks in float32)."""
    torch.manual_seed(0)
    model = small_model().double()
    with torch.no_grad():  # leave the identity at init, so every branch contributes
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.0)
                module.bias.uniform_(-0.1, 0.1)
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    eager = loss_and_grads(model, model, x)
    compiled = loss_and_grads(model, torch.compile(model, fullgraph=True), x)
    assert len(compiled) == len(eager) == 2 + len(list(model.parameters()))
    for what, group in (("output", slice(0, 1)), ("gradients", slice(1, None))):
        scale = max(t.abs().max().item() for t in eager[group])
        for c, e in zip(compiled[group], eager[group]):
            torch.testing.assert_close(c, e, rtol=1e-9, atol=1e-9 * scale, msg=lambda m: f"{what}: {m}")
