"""The op and the layers on tensors without data: ``meta`` tensors (also under ``torch.device("meta")``,
how deferred initialization builds a model) and ``FakeTensorMode`` (shape inference, as FSDP,
``torch.export`` and large-model tooling use it).

Run alone: .venv/bin/python -m pytest -q tests/test_meta.py
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from nonlocal_ext import nn as nl
from nonlocal_ext import nonlocal_aggregate
from nonlocal_ext.spec import NORMALIZATIONS
from nonlocal_ext.testing import KERNEL_PARAMS

KERNELS = list(KERNEL_PARAMS)
# the backends that take meta tensors (cpu and triton need real CPU/CUDA data), with the kernels they run
META_BACKENDS = [(kernel, backend) for kernel in KERNELS for backend in ("auto", "reference", "chunked")]
META_BACKENDS += [("dot", "linear")]
# under FakeTensorMode the fake tensors are CPU tensors: the fused cpu backend's custom ops have fake kernels
FAKE_BACKENDS = META_BACKENDS + [(kernel, "cpu") for kernel in KERNELS]

B, N, M, D, C = 2, 13, 7, 5, 3


def call(q, k, v, u, kernel, backend, normalize="row", update="aggregate"):
    return nonlocal_aggregate(q, k, v, kernel, normalize=normalize, update=update, self_value=u, backend=backend,
                              **KERNEL_PARAMS[kernel])


def make(requires_grad=False, dtype=torch.float32):
    """q, k, v, u from the current device context / fake mode."""
    shapes = ((B, N, D), (B, M, D), (B, M, C), (B, N, C))
    return [torch.randn(*s, dtype=dtype, requires_grad=requires_grad) for s in shapes]


def check_forward_and_backward(q, k, v, u, kernel, backend, normalize, kind):
    out = call(q, k, v, u, kernel, backend, normalize, update="diffusion")
    assert isinstance(out, kind) and out.shape == (B, N, C) and out.dtype == q.dtype
    grads = torch.autograd.grad(out.sum(), (q, k, v, u))
    assert [g.shape for g in grads] == [t.shape for t in (q, k, v, u)]
    assert all(isinstance(g, kind) for g in grads)
    return out


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("kernel,backend", META_BACKENDS)
def test_op_on_meta_tensors_under_the_meta_device(kernel, backend, normalize):
    with torch.device("meta"):
        q, k, v, u = make(requires_grad=True)
        out = check_forward_and_backward(q, k, v, u, kernel, backend, normalize, torch.Tensor)
    assert out.is_meta and q.is_meta


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kernel", KERNELS)
def test_op_on_meta_tensors_keeps_batch_dims_and_dtype(kernel, dtype):
    q = torch.empty(3, 2, N, D, device="meta", dtype=dtype)
    k = torch.empty(3, 2, M, D, device="meta", dtype=dtype)
    v = torch.empty(3, 2, M, C, device="meta", dtype=dtype)
    out = call(q, k, v, None, kernel, "auto")
    assert out.is_meta and out.shape == (3, 2, N, C) and out.dtype == dtype


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("kernel,backend", FAKE_BACKENDS)
def test_op_under_fake_tensor_mode(kernel, backend, normalize):
    with FakeTensorMode():
        q, k, v, u = make(requires_grad=True)
        check_forward_and_backward(q, k, v, u, kernel, backend, normalize, FakeTensor)


def test_fake_tensors_from_real_ones_keep_their_device_and_strides():
    q = torch.randn(B, D, N).transpose(1, 2)  # non-contiguous
    k, v = torch.randn(B, M, D), torch.randn(B, M, C)
    mode = FakeTensorMode()
    fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
    with mode:
        out = nonlocal_aggregate(fq, fk, fv, "rbf", scale=0.5)
    assert isinstance(out, FakeTensor) and out.device == q.device and out.shape == (B, N, C)


# --- every layer of nonlocal_ext.nn ---------------------------------------------------------

def layers():
    c = 8
    made = [(f"NonLocal{d}d-{mode}-sub{int(sub)}", d, lambda d=d, mode=mode, sub=sub: getattr(nl, f"NonLocal{d}d")(
        c, mode=mode, sub_sample=sub)) for d in (1, 2, 3) for mode in nl.MODES for sub in (False, True)]
    made += [("NonLocalStage", 2, lambda: nl.NonLocalStage(c)),
             ("NonLocalStage-3d", 3, lambda: nl.NonLocalStage(c)),
             ("SpectralNonLocal", 2, lambda: nl.SpectralNonLocal(c)),
             ("SpectralNonLocal-generalized-row", 1, lambda: nl.SpectralNonLocal(c, generalized=True, normalize="row"))]
    made += [(f"PIDENonLocal-{op}-s{s}-pool{pool}", 2, lambda op=op, s=s, pool=pool: nl.PIDENonLocal(
        c, op, s=s, pool=pool)) for op, s in (("diffusion", 0.5), ("fractional_laplacian", 0.5),
                                              ("inverse_fractional_laplacian", 0.5),
                                              ("inverse_fractional_laplacian", 1.0)) for pool in (None, 2)]
    return made


LAYERS = layers()
SPATIAL = {1: (9,), 2: (6, 7), 3: (3, 4, 5)}


@pytest.mark.parametrize("name,dim,build", LAYERS, ids=[name for name, _, _ in LAYERS])
def test_layer_built_and_run_on_the_meta_device(name, dim, build):
    """Deferred initialization: the layer is created under torch.device("meta") (no memory, no
    initialization work) and its forward and backward infer the shapes."""
    with torch.device("meta"):
        layer = build()
        assert all(p.is_meta for p in layer.parameters())
        x = torch.randn(2, 8, *SPATIAL[dim], requires_grad=True)
        out = layer(x)
        out.sum().backward()
    assert out.is_meta and out.shape == x.shape and x.grad.shape == x.shape


@pytest.mark.parametrize("name,dim,build", LAYERS, ids=[name for name, _, _ in LAYERS])
def test_layer_under_fake_tensor_mode(name, dim, build):
    with FakeTensorMode():
        layer = build()
        x = torch.randn(2, 8, *SPATIAL[dim])
        out = layer(x)
    assert isinstance(out, FakeTensor) and out.shape == x.shape
