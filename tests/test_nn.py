"""The layers of ``nonlocal_ext.nn``: drop-in compatibility, dense formulas, shapes, gradients,
identity at init, shared affinities, memory, backends, autocast.

Each layer is checked against a direct dense computation of its published formula, written
here independently of the layer (float64, small inputs). ``NonLocal1d/2d/3d`` are checked against
a module built by hand with the layout of the widely used PyTorch implementation of Wang et al.
2018, whose state dict must load unchanged.

Run alone: .venv/bin/python -m pytest -q tests/test_nn.py
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import nonlocal_ext
from nonlocal_ext import nn as nl
from nonlocal_ext.kernels import EULER_GAMMA
from nonlocal_ext.nn import _common
from nonlocal_ext.testing import error_and_bound

from common import LargestTensor

SHAPES = {1: (2, 6, 9), 2: (2, 6, 5, 7), 3: (2, 6, 3, 5, 7)}  # odd spatial sizes
WANG = {1: nl.NonLocal1d, 2: nl.NonLocal2d, 3: nl.NonLocal3d}


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def randomize(module, seed=0):
    """Random values in every parameter and buffer (BN affine and running stats too), so the
    residual branches are not zero and a wrong key or a wrong path shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) / math.sqrt(max(t[0].numel(), 1)))
    return module


def all_layers(dim):
    c = SHAPES[dim][1]
    layers = [(f"NonLocal{dim}d-{mode}-sub{int(sub)}", lambda mode=mode, sub=sub: WANG[dim](c, mode=mode, sub_sample=sub))
              for mode in nl.MODES for sub in (False, True)]
    layers += [
        ("NonLocalStage", lambda: nl.NonLocalStage(c, units=2)),
        ("SNL", lambda: nl.SpectralNonLocal(c)),
        ("gSNL", lambda: nl.SpectralNonLocal(c, generalized=True)),
    ]
    layers += [(f"PIDE-{op}-s{s}-pool{pool}", lambda op=op, s=s, pool=pool: nl.PIDENonLocal(c, op, s=s, pool=pool))
               for op, s in (("diffusion", 0.5), ("fractional_laplacian", 0.5), ("inverse_fractional_laplacian", 0.5),
                             ("inverse_fractional_laplacian", 1.0))
               for pool in (None, 2)]
    return layers


# ---------------------------------------------------------------- NonLocal1d/2d/3d vs the common implementation

class HandBuiltNonLocal(nn.Module):
    """Wang et al. 2018 written out densely, with the module layout of the widely used PyTorch
    implementation (``g``, ``theta``, ``phi``, ``W``, ``concat_project``; pools inside g and phi)."""

    def __init__(self, dim, in_channels, mode, sub_sample, bn_layer, use_scale=False):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
        pool = {1: nn.MaxPool1d(2), 2: nn.MaxPool2d((2, 2)), 3: nn.MaxPool3d((1, 2, 2))}[dim]
        self.mode, self.use_scale, self.ci = mode, use_scale, max(in_channels // 2, 1)
        self.g = conv(in_channels, self.ci, 1)
        self.W = nn.Sequential(conv(self.ci, in_channels, 1), bn(in_channels)) if bn_layer else conv(self.ci, in_channels, 1)
        if mode == "gaussian":
            self.phi = pool if sub_sample else None
        else:
            self.theta = conv(in_channels, self.ci, 1)
            self.phi = conv(in_channels, self.ci, 1)
        if mode == "concatenation":
            self.concat_project = nn.Sequential(nn.Conv2d(2 * self.ci, 1, 1, bias=False), nn.ReLU())
        if sub_sample:
            self.g = nn.Sequential(self.g, pool)
            if mode != "gaussian":
                self.phi = nn.Sequential(self.phi, pool)

    def forward(self, x):
        b, c = x.shape[:2]
        g_x = self.g(x).view(b, self.ci, -1).permute(0, 2, 1)
        if self.mode == "concatenation":
            theta_x = self.theta(x).view(b, self.ci, -1, 1)
            phi_x = self.phi(x).view(b, self.ci, 1, -1)
            n, m = theta_x.shape[2], phi_x.shape[3]
            pairs = torch.cat([theta_x.repeat(1, 1, 1, m), phi_x.repeat(1, 1, n, 1)], dim=1)
            f = self.concat_project(pairs).view(b, n, m) / m
        else:
            if self.mode == "gaussian":
                theta_x = x.view(b, c, -1).permute(0, 2, 1)
                phi_x = (x if self.phi is None else self.phi(x)).view(b, c, -1)
            else:
                theta_x = self.theta(x).view(b, self.ci, -1).permute(0, 2, 1)
                phi_x = self.phi(x).view(b, self.ci, -1)
            f = theta_x @ phi_x
            if self.mode == "dot_product":
                f = f / f.shape[-1]
            else:
                if self.use_scale:
                    f = f / theta_x.shape[-1] ** 0.5
                f = F.softmax(f, dim=-1)
        y = (f @ g_x).permute(0, 2, 1).contiguous().view(b, self.ci, *x.shape[2:])
        return self.W(y) + x


@pytest.mark.parametrize("bn_layer", [True, False])
@pytest.mark.parametrize("sub_sample", [True, False])
@pytest.mark.parametrize("mode", nl.MODES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_wang_state_dict_loads_unchanged_and_gives_the_same_outputs(dim, mode, sub_sample, bn_layer):
    shape = SHAPES[dim]
    theirs = randomize(HandBuiltNonLocal(dim, shape[1], mode, sub_sample, bn_layer).double())
    ours = WANG[dim](shape[1], mode=mode, sub_sample=sub_sample, bn_layer=bn_layer).double()
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = randn(*shape, seed=1)
    for train in (True, False):
        ours.train(train), theirs.train(train)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["gaussian", "embedded_gaussian"])
def test_wang_use_scale_divides_the_exponent_by_root_channels(mode):
    theirs = randomize(HandBuiltNonLocal(2, 6, mode, True, True, use_scale=True).double())
    ours = nl.NonLocal2d(6, mode=mode, use_scale=True).double()
    ours.load_state_dict(theirs.state_dict())
    x = randn(*SHAPES[2], seed=2)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)


def test_wang_defaults_match_the_common_implementation():
    m = nl.NonLocal2d(64)
    assert (m.mode, m.inter_channels, m.sub_sample, m.use_scale) == ("embedded_gaussian", 32, True, False)
    assert isinstance(m.g, nn.Sequential) and isinstance(m.g[1], nn.MaxPool2d)
    assert isinstance(m.W[1], nn.BatchNorm2d) and not m.W[1].weight.any() and not m.W[1].bias.any()
    assert nl.NonLocal1d(1).inter_channels == 1
    assert isinstance(nl.NonLocal3d(4).phi[1], nn.MaxPool3d) and nl.NonLocal3d(4).phi[1].kernel_size == (1, 2, 2)
    assert nl.NonLocal2d(4, mode="embedded").mode == "embedded_gaussian"  # other implementations' spelling
    with pytest.raises(ValueError, match="mode"):
        nl.NonLocal2d(4, mode="softmax")
    with pytest.raises(ValueError, match="spatial dims"):
        nl.NonLocal2d(4)(torch.randn(2, 4, 5))


# ---------------------------------------------------------------- concatenation without an N×M tensor

def dense_concat(a, b, v):
    return (F.relu(a[:, :, None] + b[:, None, :]) @ v) / b.shape[-1]


@pytest.mark.parametrize("ties", [False, True])
def test_concat_relu_aggregate_equals_the_dense_formula_with_gradients(ties):
    a, b, v = randn(3, 11, seed=3), randn(3, 7, seed=4), randn(3, 7, 5, seed=5)
    if ties:  # integer scores: many a_i + b_j are exactly 0 (the ReLU kink) and many b_j are equal
        a, b = a.mul(2).round(), b.mul(2).round()
    leaves = [t.clone().requires_grad_() for t in (a, b, v)]
    out = nl.concat_relu_aggregate(*leaves)
    truth = [t.clone().requires_grad_() for t in (a, b, v)]
    dense = dense_concat(*truth)
    torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-12)
    grad = randn(*out.shape, seed=6)
    ours = torch.autograd.grad(out, leaves, grad)
    theirs = torch.autograd.grad(dense, truth, grad)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, rtol=1e-12, atol=1e-12)
    if not ties:
        assert torch.autograd.gradcheck(nl.concat_relu_aggregate, leaves)


@pytest.mark.parametrize("make", [
    lambda: nl.NonLocal2d(4, mode="concatenation", sub_sample=False),
    lambda: nl.NonLocal2d(4, mode="dot_product", sub_sample=False),
    lambda: nl.PIDENonLocal(4, "diffusion"),
], ids=["concatenation", "dot_product", "pide-diffusion"])
def test_layers_without_a_dense_path_never_form_an_n_by_m_tensor(make):
    layer = make()
    x = torch.randn(1, 4, 48, 48, requires_grad=True)  # N = M = 2304: N·M = 5.3M, the largest map is N·C
    with LargestTensor() as mode:
        layer(x).sum().backward()
    assert mode.largest < 48 * 48 * 48


# ---------------------------------------------------------------- the other layers vs their dense formulas

def dense_affinity(kernel, q, k, scale):
    if kernel == "gaussian":
        return torch.exp(scale * q @ k.transpose(-1, -2))
    assert kernel == "dot"
    return scale * q @ k.transpose(-1, -2)


def dense_stage(m, x):
    """Seed 000 Eq. 3, units sharing A: z ← z + BN(W (A − D_A) g(z)), A = softmax rows."""
    flat = x.flatten(2)
    q, k = m.theta(flat).transpose(1, 2), m.phi(flat).transpose(1, 2)
    w = dense_affinity("gaussian", q, k, m.scale)
    a = w / w.sum(-1, keepdim=True)
    degree = torch.diag_embed(a.sum(-1))
    z = flat
    for unit in m.units:
        v = unit["g"](z).transpose(1, 2)
        z = z + unit["bn"](unit["W"](((a - degree) @ v).transpose(1, 2)))
    return z.reshape(x.shape)


def dense_spectral(m, x):
    """Seed 000 Eq. 9 / 11 literally: X + BN(Z W1 + A Z W2 [+ (2A − I) Z W3])."""
    flat = x.flatten(2)
    q, k = m.theta(flat).transpose(1, 2), m.phi(flat).transpose(1, 2)
    if m.kernel == "dot":  # the authors' code: ReLU on θ and φ
        q, k = F.relu(q), F.relu(k)
    w = dense_affinity(m.kernel, q, k, m.scale)
    w = 0.5 * (w + w.transpose(1, 2))
    r, c = w.sum(-1, keepdim=True), w.sum(-2, keepdim=True)
    degree = r.sqrt() * c.sqrt() if m.normalize == "sym" else r
    # a zero degree (θ_i = 0 after the ReLU of "dot") normalizes to 0: the op's safe divide
    a = torch.where(degree > 0, w / torch.where(degree > 0, degree, 1), 0)
    z = m.g(flat)                               # (B, Ci, N)
    az = (a @ z.transpose(1, 2)).transpose(1, 2)
    out = m.w1(z) + m.w2(az)
    if m.generalized:
        eye = torch.eye(a.shape[-1], dtype=a.dtype)
        out = out + m.w3(((2 * a - eye) @ z.transpose(1, 2)).transpose(1, 2))
    return x + m.bn(out).reshape(x.shape)


def dense_pide(m, x):
    """Seed 003 Eq. 4.1, 4.6 (sign of §4.2.2), 4.7, 4.8 written out with the N×M kernel matrix."""
    lam, s, n = m.scale, m.s, m.n
    pool = (lambda t: t) if m.pool is None else (lambda t: _common.max_pool(t, m.pool))
    flat = x.flatten(2)
    q = m.theta(flat).transpose(1, 2)
    k = m.phi(pool(x).flatten(2)).transpose(1, 2)
    rho = torch.cdist(q, k)
    inf = torch.full_like(rho, math.inf)
    count = k.shape[1]
    b = x
    for k_t in m.K:
        u, v = b.flatten(2).transpose(1, 2), pool(b).flatten(2).transpose(1, 2)
        if m.operator == "diffusion":
            w = lam * q @ k.transpose(1, 2)
            p = (w @ v - w.sum(-1, keepdim=True) * u) / count                      # Σ w (v_j − u_i) / N
        elif m.operator == "fractional_laplacian":
            w = lam / torch.where(rho > 0, rho, inf) ** (n + 2 * s)
            p = nl.c_ns(n, s) * (w.sum(-1, keepdim=True) * u - w @ v) / count      # c Σ w (u_i − v_j) / N
        elif math.isclose(s, n / 2):
            w = torch.where(rho > 0, -2 * lam * torch.log(rho) - EULER_GAMMA, torch.zeros_like(rho))
            p = nl.c_n(n) * (w @ v) / count
        else:
            w = lam / torch.where(rho > 0, rho, inf) ** (n - 2 * s)
            p = nl.c_n_minus_s(n, s) * (w @ v) / count
        b = (flat + m.h * k_t(p.transpose(1, 2))).reshape(x.shape)
    return b


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("units", [1, 3])
def test_nonlocal_stage_equals_dense_formula(dim, units):
    m = randomize(nl.NonLocalStage(6, units=units).double())
    x = randn(*SHAPES[dim], seed=7)
    torch.testing.assert_close(m(x), dense_stage(m, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("kernel", ["gaussian", "dot"])
@pytest.mark.parametrize("normalize", ["sym", "row"])
@pytest.mark.parametrize("generalized", [False, True])
def test_spectral_nonlocal_equals_dense_formula(dim, kernel, normalize, generalized):
    m = randomize(nl.SpectralNonLocal(6, generalized=generalized, kernel=kernel, normalize=normalize).double())
    x = randn(*SHAPES[dim], seed=8)
    torch.testing.assert_close(m(x), dense_spectral(m, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("pool", [None, 2])
@pytest.mark.parametrize("operator,s", [("diffusion", 0.5), ("fractional_laplacian", 0.5),
                                        ("fractional_laplacian", 0.8), ("inverse_fractional_laplacian", 0.5),
                                        ("inverse_fractional_laplacian", 0.25), ("inverse_fractional_laplacian", 1.0)])
def test_pide_equals_dense_formula(dim, pool, operator, s):
    m = randomize(nl.PIDENonLocal(6, operator, s=s, pool=pool, h=0.5).double())
    x = randn(*SHAPES[dim], seed=9)
    torch.testing.assert_close(m(x), dense_pide(m, x), rtol=1e-10, atol=1e-10)


def test_pide_constants_from_the_gamma_function():
    assert nl.c_ns(2, 0.5) == pytest.approx(1 / (2 * math.pi), rel=1e-14)
    assert nl.c_n_minus_s(2, 0.5) == pytest.approx(1 / (2 * math.pi), rel=1e-14)
    assert nl.c_n(2) == pytest.approx(1 / (4 * math.pi), rel=1e-14)
    for n in (1, 2, 3):
        for s in (0.1, 0.25, 0.75, 0.9):  # |Γ(−s)| = Γ(1 − s)/s
            assert nl.c_ns(n, s) == pytest.approx(s * 4 ** s * math.gamma(n / 2 + s) / (math.pi ** (n / 2) * math.gamma(1 - s)))
    # c_{1,½} = 1/π: the Hilbert-transform constant of (−Δ)^½ on the line
    assert nl.c_ns(1, 0.5) == pytest.approx(1 / math.pi, rel=1e-14)


def test_pide_picks_the_kernel_and_sign_of_each_operator():
    frac = nl.PIDENonLocal(4, "fractional_laplacian", s=0.5)
    assert frac.op_kwargs == {"kernel": "fractional", "scale": 0.1, "power": 3.0, "update": "diffusion"}
    assert frac.constant == pytest.approx(-1 / (2 * math.pi))  # Σ w (u_i − v_j) = −(Σ w v_j − rowsum·u_i)
    riesz = nl.PIDENonLocal(4, "inverse_fractional_laplacian", s=0.5)
    assert riesz.op_kwargs["kernel"] == "fractional" and riesz.op_kwargs["power"] == 1.0
    log = nl.PIDENonLocal(4, "inverse_fractional_laplacian", s=1.0, n=2)
    assert log.op_kwargs["kernel"] == "log" and log.constant == pytest.approx(1 / (4 * math.pi))
    assert nl.PIDENonLocal(4, "diffusion").op_kwargs["kernel"] == "dot"
    for bad in [dict(operator="fractional_laplacian", s=1.0), dict(operator="inverse_fractional_laplacian", s=1.5),
                dict(operator="laplace"), dict(stages=0)]:
        with pytest.raises(ValueError):
            nl.PIDENonLocal(4, **bad)


def test_pide_pool_uses_subsampled_keys_and_full_resolution_self_value(monkeypatch):
    calls = []
    real = _common.nonlocal_aggregate

    def spy(query, key, value, kernel, **kwargs):
        calls.append((query.shape, key.shape, value.shape, None if kwargs["self_value"] is None
                      else kwargs["self_value"].shape, kwargs["update"]))
        return real(query, key, value, kernel, **kwargs)

    monkeypatch.setattr(_common, "nonlocal_aggregate", spy)
    nl.PIDENonLocal(6, "fractional_laplacian", pool=2)(torch.randn(2, 6, 5, 7))
    # N = 35 queries; keys pooled with ceil_mode: 3·4 = 12; self_value at full resolution
    assert calls == [((2, 35, 3), (2, 12, 3), (2, 12, 6), (2, 35, 6), "diffusion")] * 2


# ---------------------------------------------------------------- shared affinity: S stages = S op calls

@pytest.mark.parametrize("make,calls", [
    (lambda: nl.NonLocalStage(6, units=3), 3),
    (lambda: nl.PIDENonLocal(6, "fractional_laplacian", stages=3, pool=2), 3),
    (lambda: nl.SpectralNonLocal(6, generalized=True), 1),
    (lambda: nl.SpectralNonLocal(6), 1),
    (lambda: nl.NonLocal2d(6), 1),
], ids=["stage-3-units", "pide-3-stages", "gSNL", "SNL", "NonLocal2d"])
def test_blocks_share_one_affinity_one_op_call_per_stage(monkeypatch, make, calls):
    seen = []
    real = _common.nonlocal_aggregate

    def spy(query, key, value, kernel, **kwargs):
        seen.append((query, key))
        return real(query, key, value, kernel, **kwargs)

    monkeypatch.setattr(_common, "nonlocal_aggregate", spy)
    make()(torch.randn(2, 6, 5, 7))
    assert len(seen) == calls
    assert all(q is seen[0][0] and k is seen[0][1] for q, k in seen)  # the same embeddings every time


# ---------------------------------------------------------------- every layer: shapes, gradients, identity

@pytest.mark.parametrize("dim", [1, 2, 3])
def test_every_layer_forward_backward_keeps_shape_with_finite_gradients(dim):
    for name, make in all_layers(dim):
        layer = randomize(make(), seed=10)
        x = torch.randn(*SHAPES[dim], requires_grad=True)
        y = layer(x)
        assert y.shape == x.shape and y.dtype == x.dtype, name
        y.square().sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), name
        for pname, p in layer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (name, pname)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_layers_start_as_the_identity_and_can_leave_it(dim):
    for name, make in all_layers(dim):
        if name.startswith("PIDE"):
            continue  # the thesis' block starts with default-initialized K_t, not as the identity
        layer = make()
        x = torch.randn(*SHAPES[dim], requires_grad=True)
        y = layer(x)
        assert torch.equal(y, x), name
        y.square().sum().backward()  # trainable from the start: the zero-initialized end receives a gradient
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters()), name


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_wang_without_bn_layer_starts_as_the_identity_with_a_zero_conv(dim):
    layer = WANG[dim](6, bn_layer=False)
    x = torch.randn(*SHAPES[dim], requires_grad=True)
    y = layer(x)
    assert torch.equal(y, x) and isinstance(layer.W, nn.Module) and not layer.W.weight.any()
    y.square().sum().backward()
    assert layer.W.weight.grad.abs().sum() > 0


def test_backends_agree_through_the_layers():
    x = randn(2, 6, 9, 11, seed=11)
    for make in (lambda b: nl.NonLocal2d(6, backend=b), lambda b: nl.NonLocalStage(6, backend=b),
                 lambda b: nl.SpectralNonLocal(6, generalized=True, backend=b),
                 lambda b: nl.PIDENonLocal(6, "fractional_laplacian", pool=2, backend=b),
                 lambda b: nl.PIDENonLocal(6, "inverse_fractional_laplacian", s=1.0, backend=b)):
        ref = randomize(make("reference").double())
        chunk = make("chunked").double()
        chunk.load_state_dict(ref.state_dict())
        torch.testing.assert_close(chunk(x), ref(x), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- autocast

def dense_block(layer, x):
    """The layer as a plain PyTorch block (its dense formula above, convs, BN and matmuls, on the
    layer's own sub-modules and parameters): what torch's autocast does to such a block is the standard."""
    if isinstance(layer, nl.NonLocalStage):
        return dense_stage(layer, x)
    if isinstance(layer, nl.SpectralNonLocal):
        return dense_spectral(layer, x)
    if isinstance(layer, nl.PIDENonLocal):
        return dense_pide(layer, x)
    hand = HandBuiltNonLocal(layer.dimension, layer.in_channels, layer.mode, layer.sub_sample, True)
    hand = hand.to(layer.W[0].weight.dtype).train(layer.training)
    hand.load_state_dict(layer.state_dict())
    return hand(x)


class ConvolutionDtypes(TorchDispatchMode):
    """The dtypes of the results of every convolution run inside (seen after autocast's casts)."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.convolution:
            self.dtypes.append(out.dtype)
        return out


def op_result_dtypes(monkeypatch):
    """Patch the layers' op call to record the dtype of each result."""
    seen, real = [], _common.nonlocal_aggregate

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(_common, "nonlocal_aggregate", spy)
    return seen


ALL_LAYERS = [(dim, name, make) for dim in (1, 2, 3) for name, make in all_layers(dim)]


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x-float32", "x-bfloat16"])
@pytest.mark.parametrize("dim,name,make", ALL_LAYERS, ids=[f"{d}d-{name}" for d, name, _ in ALL_LAYERS])
def test_layers_under_autocast_compute_like_the_dense_pytorch_block(dim, name, make, x_dtype, monkeypatch):
    """Under CPU bfloat16 autocast, a float32 layer on a float32 or bfloat16 input: every convolution
    and every op call gives bfloat16 (where autocast puts convs and matmuls), the output has the dtype
    of the same layer written as a dense PyTorch block under the same autocast (the residual sum with x
    promotes, as in torch), and its error against the float64 evaluation of the layer obeys the
    repository's rule (bfloat16 row, the dense block under autocast as the plain computation).
    Eval mode: train-mode BatchNorm over B·N samples can amplify rounding without bound."""
    ref = randomize(make().double(), seed=12).eval()
    x = randn(*SHAPES[dim], seed=13).to(x_dtype)
    truth = ref(x.double())
    layer, dense = make().eval(), make().eval()
    layer.load_state_dict(ref.state_dict())
    dense.load_state_dict(ref.state_dict())
    op_dtypes = op_result_dtypes(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with ConvolutionDtypes() as convs:
            out = layer(x)
        expected = dense_block(dense, x)
    assert out.shape == x.shape and out.dtype == expected.dtype == x_dtype
    assert convs.dtypes and set(convs.dtypes) == {torch.bfloat16}
    assert set(op_dtypes) == ({torch.bfloat16} if "concatenation" not in name else set())  # concatenation: no op call
    err, bound, err_dense, _ = error_and_bound(out, expected, truth, torch.bfloat16)
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (dense block under autocast: {err_dense:.3e})"


MIXED = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("param_dtype,x_dtype", MIXED, ids=["params32-x32", "params32-x16", "params16-x32"])
@pytest.mark.parametrize("name,make", all_layers(2), ids=[name for name, _ in all_layers(2)])
def test_autocast_training_step_gives_gradients_in_the_parameter_dtype(name, make, param_dtype, x_dtype):
    """Training mode under CPU bfloat16 autocast with mixed parameter and input dtypes: the output dtype
    is the dense block's, the error against the float64 evaluation of the same layer obeys the
    repository's rule (bfloat16 row, the whole layer run in bfloat16 as the plain computation), and
    backward gives finite gradients in each parameter's dtype and in the input's dtype."""
    layer = randomize(make().to(param_dtype), seed=12)
    x = randn(*SHAPES[2], seed=13).to(x_dtype)
    truth = copy.deepcopy(layer).double()(x.double())
    plain = copy.deepcopy(layer).bfloat16()(x.bfloat16())
    dense = copy.deepcopy(layer)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        expected_dtype = dense_block(dense, x.detach()).dtype
    assert out.shape == x.shape and out.dtype == expected_dtype
    err, bound, err_plain, _ = error_and_bound(out, plain, truth, torch.bfloat16)
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (plain bfloat16: {err_plain:.3e})"
    out.float().square().sum().backward()
    assert x.grad.dtype == x_dtype and torch.isfinite(x.grad).all()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == param_dtype == p.dtype, pname
        assert torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in layer.parameters())


@pytest.mark.parametrize("name,make", [(n, m) for n, m in all_layers(2) if n in (
    "NonLocal2d-gaussian-sub1", "NonLocal2d-concatenation-sub0", "gSNL", "PIDE-diffusion-s0.5-pool2")])
def test_float64_layers_ignore_autocast(name, make):
    """float64 is not an autocast candidate: the same outputs and gradients, bit for bit, as outside autocast."""
    layer = randomize(make().double(), seed=12)
    x = randn(*SHAPES[2], seed=13)
    results = []
    for enabled in (False, True):
        m, leaf = copy.deepcopy(layer), x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = m(leaf)
        grads = torch.autograd.grad(out.square().sum(), [leaf, *m.parameters()])
        results.append((out, *grads))
    assert results[1][0].dtype == torch.float64
    for a, b in zip(*results):
        assert torch.equal(a, b), name


def test_layers_are_exported_from_the_package():
    assert nonlocal_ext.nn.NonLocal2d is nl.NonLocal2d


# ---------------------------------------------------------------- the Q-tips example

def _examples():
    import pathlib
    import sys
    path = str(pathlib.Path(__file__).resolve().parents[1] / "examples")
    if path not in sys.path:
        sys.path.insert(0, path)
    import hamiltonian
    import qtips
    return qtips, hamiltonian


def test_qtips_generator_is_deterministic_with_15_classes_and_long_sticks():
    qtips, _ = _examples()
    images, labels = qtips.make_qtips(300, seed=5)
    again, labels_again = qtips.make_qtips(300, seed=5)
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    assert not torch.equal(images, qtips.make_qtips(300, seed=6)[0])
    assert images.shape == (300, 3, 64, 64) and images.dtype == torch.float32 and labels.dtype == torch.long
    assert qtips.NUM_CLASSES == 15 == len(set(qtips.CLASSES)) and set(labels.tolist()) == set(range(15))
    clean, clean_labels = qtips.make_qtips(300, seed=5, noise=0.0)
    assert torch.equal(clean_labels, labels)
    assert clean.min() >= 0 and clean.max() <= 1
    noise = images - clean
    assert abs(noise.std().item() - 0.3) < 0.01 and abs(noise.mean().item()) < 0.01
    dark = (clean.max(dim=1).values < 0.5).flatten(1).sum(1).float()   # stick pixels between the markers
    assert dark.min() > 0
    # both markers are in the image: each image shows the colours of its class and nothing else
    palette = torch.tensor(list(qtips.COLOURS.values()))
    for img, lab in zip(clean[:40], clean_labels[:40]):
        pixels = img.flatten(1).T
        present = {i for i, col in enumerate(palette) if (pixels - col).abs().max(1).values.eq(0).any()}
        assert present == set(qtips.CLASSES[lab])


def test_hamiltonian_network_with_and_without_nonlocal_blocks():
    _, hamiltonian = _examples()
    x = torch.randn(2, 3, 32, 32)
    plain = hamiltonian.HamiltonianNet(15, channels=(4, 8), blocks=3)
    with_nl = hamiltonian.HamiltonianNet(15, channels=(4, 8), blocks=3, nonlocal_operator="fractional_laplacian",
                                            nonlocal_kwargs={"pool": 2})
    for net in (plain, with_nl):
        out = net(x)
        assert out.shape == (2, 15)
        out.sum().backward()
    # the nonlocal block sits after the second Hamiltonian block of each Unit
    for unit in with_nl.units:
        kinds = [type(m).__name__ for m in unit]
        assert kinds == ["HamiltonianBlock", "HamiltonianBlock", "PIDENonLocal", "HamiltonianBlock"]
    # a Verlet step (Eq. 2.17) is reversible: undo the Z update with Y_{j+1}, then the Y update with Z_j
    block = hamiltonian.HamiltonianBlock(4, h=0.3).double()
    x = randn(1, 4, 5, 5, seed=14)
    y1, z1 = block(x).chunk(2, 1)
    z = z1 + 0.3 * F.conv_transpose2d(F.relu(F.conv2d(y1, block.k2, block.b2, padding=1)), block.k2, padding=1)
    y = y1 - 0.3 * F.conv_transpose2d(F.relu(F.conv2d(z, block.k1, block.b1, padding=1)), block.k1, padding=1)
    torch.testing.assert_close(torch.cat([y, z], 1), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer", ["NonLocal2d", "NonLocalStage", "SpectralNonLocal", "PIDENonLocal"])
@pytest.mark.parametrize("argument,value", [("in_channels", 0), ("in_channels", 2.0), ("in_channels", True),
                                            ("inter_channels", 0), ("inter_channels", "4")])
def test_bad_channel_counts_name_the_argument(layer, argument, value):
    kwargs = {"in_channels": 4, argument: value}
    with pytest.raises(ValueError, match=argument):
        getattr(nl, layer)(**kwargs)


@pytest.mark.parametrize("layer,argument", [("NonLocalStage", "units"), ("PIDENonLocal", "stages")])
@pytest.mark.parametrize("value", [0, 1.5, False])
def test_bad_repeat_counts_name_the_argument(layer, argument, value):
    with pytest.raises(ValueError, match=argument):
        getattr(nl, layer)(4, **{argument: value})


# ---------------------------------------------------------------- NonLocal1d/2d/3d options, affinity, checks

POOLINGS = {  # name -> keyword arguments of the key pooling
    "none": dict(sub_sample=False),
    "keys": dict(sub_sample=True),
    "keys-3": dict(sub_sample=True, pool_size=3),
    "input": dict(sub_sample=True, pool_input=True),
    "input-2": dict(sub_sample=True, pool_input=True, pool_size=2),
}


@pytest.mark.parametrize("pooling", list(POOLINGS))
@pytest.mark.parametrize("mode", nl.MODES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_affinity_times_values_is_the_layers_aggregate(dim, mode, pooling):
    """``affinity(x) @ value`` through W plus x is the layer's output; rows of the Gaussian modes sum to 1."""
    layer = randomize(WANG[dim](6, mode=mode, use_scale="in" if "gaussian" in mode else False,
                                **POOLINGS[pooling]).double(), seed=15)
    x = randn(*SHAPES[dim], seed=16)
    a = layer.affinity(x)
    query, key, value = layer.embed(x)
    assert a.shape == (x.shape[0], query.shape[1], key.shape[1])
    expected_m = math.prod(s // k for s, k in zip(x.shape[2:], layer.pool_size)) if layer.sub_sample else query.shape[1]
    assert key.shape[1] == expected_m  # floor pooling, as the peers' nn.MaxPool
    if "gaussian" in mode:
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)), rtol=1e-12, atol=1e-12)
    y = _common.channels_first(a @ value, x.shape[2:])
    torch.testing.assert_close(layer.W(y) + x, layer(x), rtol=1e-10, atol=1e-10)


def test_pooling_x_before_the_projections_differs_from_pooling_after():
    """A max-pool does not commute with a biased 1×1 conv: ``pool_input`` is a different block."""
    keys = randomize(nl.NonLocal2d(6, pool_size=2).double(), seed=17)
    before = nl.NonLocal2d(6, pool_size=2, pool_input=True).double()
    before.load_state_dict({k.replace(".0.", "."): v for k, v in keys.state_dict().items()
                            if not k.startswith("W")} | {k: v for k, v in keys.state_dict().items() if k.startswith("W")})
    x = randn(*SHAPES[2], seed=18)
    assert not torch.allclose(keys(x), before(x))
    assert isinstance(before.pool, nn.MaxPool2d) and isinstance(before.g, nn.Conv2d)


@pytest.mark.parametrize("use_scale,expected", [(False, 1.0), (True, 1 / math.sqrt(3)), ("inter", 1 / math.sqrt(3)),
                                                ("in", 1 / math.sqrt(6)), (0.25, 0.25)])
def test_softmax_scale_options(use_scale, expected):
    layer = nl.NonLocal2d(6, use_scale=use_scale)
    assert layer.scale == pytest.approx(expected)
    assert nl.NonLocal2d(6, mode="gaussian", use_scale=True).scale == pytest.approx(1 / math.sqrt(6))


@pytest.mark.parametrize("norm,out_bias", [("batch", True), ("group", False), ("none", True), ("none", False)])
def test_norm_and_bias_options_start_as_the_identity(norm, out_bias):
    layer = nl.NonLocal3d(6, norm=norm, norm_groups=3, out_bias=out_bias, bias=False)
    out_conv = layer.W if norm == "none" else layer.W[0]
    assert (out_conv.bias is not None) == out_bias and layer.theta.bias is None and layer.g[0].bias is None
    if norm != "none":
        assert isinstance(layer.W[1], nn.BatchNorm3d if norm == "batch" else nn.GroupNorm)
    x = torch.randn(*SHAPES[3], requires_grad=True)
    y = layer(x)
    assert torch.equal(y, x)
    y.square().sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_factory_kwargs_device_and_dtype():
    layer = nl.NonLocal2d(8, mode="concatenation", dtype=torch.float64)
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    assert {b.dtype for b in layer.buffers() if b.is_floating_point()} == {torch.float64}
    meta = nl.NonLocal3d(8, norm="group", norm_groups=2, device="meta")
    assert {p.device.type for p in meta.parameters()} == {"meta"}


@pytest.mark.parametrize("kwargs,argument", [
    (dict(mode="softmax"), "mode"), (dict(mode=3), "mode"),
    (dict(pool_size=0), "pool_size"), (dict(pool_size=(2, 2, 2)), "pool_size"), (dict(pool_size="2"), "pool_size"),
    (dict(pool_size=(2, True)), "pool_size"),
    (dict(sub_sample=False, pool_size=2), "sub_sample"), (dict(sub_sample=False, pool_input=True), "sub_sample"),
    (dict(norm="layer"), "norm"), (dict(bn_layer=False, norm="group"), "bn_layer"),
    (dict(norm="group", norm_groups=3), "norm_groups"), (dict(norm="group", norm_groups=0), "norm_groups"),
    (dict(use_scale="yes"), "use_scale"), (dict(use_scale=-1.0), "use_scale"), (dict(use_scale=math.nan), "use_scale"),
    (dict(use_scale=math.inf), "use_scale"), (dict(use_scale=1), "use_scale"), (dict(mode="dot_product", use_scale=True), "use_scale"),
    (dict(backend="gpu"), "backend"), (dict(backend=None), "backend"),
])
def test_bad_nonlocal_block_arguments_raise_value_error_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        nl.NonLocal2d(8, **kwargs)


@pytest.mark.parametrize("flag", ["sub_sample", "bn_layer", "pool_input", "bias", "out_bias"])
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_flags_must_be_bools(flag, value):
    with pytest.raises(TypeError, match=flag):
        nl.NonLocal2d(8, **{flag: value})


@pytest.mark.parametrize("make,x,words", [
    (lambda: nl.NonLocal2d(8), torch.randn(2, 6, 5, 5), ["NonLocal2d", "(B, 8, H, W)", "in_channels"]),
    (lambda: nl.NonLocal2d(8), torch.randn(2, 8, 1, 5), ["NonLocal2d", "(2, 2)", "sub_sample"]),
    (lambda: nl.NonLocal3d(8, pool_size=(2, 2, 2), pool_input=True), torch.randn(1, 8, 1, 4, 4),
     ["NonLocal3d", "(2, 2, 2)", "pool_size"]),
    (lambda: nl.NonLocal1d(8), torch.randn(2, 8, 5, 5), ["NonLocal1d", "spatial dims"]),
])
def test_bad_inputs_name_the_layer_the_expected_shape_and_the_argument(make, x, words):
    layer = make()
    for call in (layer, layer.affinity):
        with pytest.raises(ValueError) as info:
            call(x)
        for word in words:
            assert word in str(info.value)


# ---------------------------------------------------------------- the other layers: no NaN by construction, checks

@pytest.mark.parametrize("make", [
    lambda: nl.SpectralNonLocal(16, kernel="dot"),
    lambda: nl.SpectralNonLocal(16, kernel="dot", generalized=True, normalize="row"),
    lambda: nl.NonLocalStage(16, kernel="dot"),
], ids=["SNL-dot-sym", "gSNL-dot-row", "stage-dot"])
def test_dot_kernel_layers_are_finite_with_relu_embeddings(make):
    """Without the ReLU on θ and φ, SNL with kernel="dot" was NaN on every seed (a negative degree under
    the square root); with it, outputs and gradients are finite in train and eval mode."""
    for seed in range(5):
        layer = randomize(make(), seed=seed)
        for train in (True, False):
            layer.train(train)
            x = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(seed), requires_grad=True)
            y = layer(x)
            y.square().sum().backward()
            assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
            assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def dense_stage_kernel(m, x):
    """Eq. 3 with any kernel: A = D⁻¹W, W from θ, φ (ReLU'd for dot)."""
    flat = x.flatten(2)
    q, k = m.theta(flat).transpose(1, 2), m.phi(flat).transpose(1, 2)
    if m.kernel == "dot":
        q, k = F.relu(q), F.relu(k)
    p = m.kernel_params
    if m.kernel in ("gaussian", "dot"):
        w = dense_affinity(m.kernel, q, k, p["scale"])
    elif m.kernel == "rbf":
        w = torch.exp(-p["scale"] * torch.cdist(q, k) ** 2)
    else:
        rho = torch.cdist(q, k)
        w = p["scale"] * torch.where(rho > 0, rho, torch.full_like(rho, math.inf)) ** -p["power"]
    r = w.sum(-1, keepdim=True)
    a = torch.where(r > 0, w / torch.where(r > 0, r, 1), 0)  # the op's safe divide: a zero row stays 0
    z = flat
    for unit in m.units:
        v = unit["g"](z).transpose(1, 2)
        z = z + unit["bn"](unit["W"]((a @ v - a.sum(-1, keepdim=True) * v).transpose(1, 2)))
    return z.reshape(x.shape)


@pytest.mark.parametrize("kernel,params", [("dot", {}), ("rbf", {"scale": 0.3}), ("fractional", {"power": 1.5})])
def test_stage_kernel_parameters_pass_through(kernel, params):
    m = randomize(nl.NonLocalStage(6, kernel=kernel, **params).double(), seed=19)
    x = randn(*SHAPES[2], seed=20)
    torch.testing.assert_close(m(x), dense_stage_kernel(m, x), rtol=1e-10, atol=1e-10)


def test_spectral_fractional_kernel_takes_power():
    m = nl.SpectralNonLocal(6, kernel="fractional", power=2.5, eps=1e-9)
    assert m.kernel_params == {"scale": m.scale, "power": 2.5, "gamma": None, "eps": 1e-9}
    assert torch.isfinite(m(torch.randn(*SHAPES[2]))).all()


@pytest.mark.parametrize("layer", ["NonLocalStage", "SpectralNonLocal", "PIDENonLocal", "NonLocal2d"])
def test_every_layer_takes_device_and_dtype(layer):
    m = getattr(nl, layer)(8, dtype=torch.float64)
    assert {t.dtype for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()} == {torch.float64}
    meta = getattr(nl, layer)(8, device="meta")
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    assert m(randn(2, 8, 5, 6)).dtype == torch.float64


@pytest.mark.parametrize("layer,kwargs,error,argument", [
    ("NonLocalStage", dict(backend="gpu"), ValueError, "backend"),
    ("NonLocalStage", dict(kernel="softmax"), ValueError, "kernel"),
    ("NonLocalStage", dict(kernel="fractional"), ValueError, "power"),
    ("NonLocalStage", dict(kernel="gaussian", power=2.0), ValueError, "power"),
    ("NonLocalStage", dict(kernel="log"), ValueError, "log"),
    ("NonLocalStage", dict(scale="big"), TypeError, "scale"),
    ("NonLocalStage", dict(scale=math.nan), ValueError, "scale"),
    ("NonLocalStage", dict(kernel="fractional", power=1.0, eps=-1.0), ValueError, "eps"),
    ("SpectralNonLocal", dict(backend="gpu"), ValueError, "backend"),
    ("SpectralNonLocal", dict(kernel="softmax"), ValueError, "kernel"),
    ("SpectralNonLocal", dict(kernel="log"), ValueError, "log"),
    ("SpectralNonLocal", dict(kernel="fractional"), ValueError, "power"),
    ("SpectralNonLocal", dict(normalize="none"), ValueError, "normalize"),
    ("SpectralNonLocal", dict(generalized="yes"), TypeError, "generalized"),
    ("SpectralNonLocal", dict(gamma=0.5), ValueError, "gamma"),  # gamma belongs to log, which SNL refuses
    ("PIDENonLocal", dict(backend="gpu"), ValueError, "backend"),
    ("PIDENonLocal", dict(pool=0), ValueError, "pool"),
    ("PIDENonLocal", dict(pool=(2, 0)), ValueError, "pool"),
    ("PIDENonLocal", dict(pool=2.0), ValueError, "pool"),
    ("PIDENonLocal", dict(pool=()), ValueError, "pool"),
    ("PIDENonLocal", dict(h=0), ValueError, "h"),
    ("PIDENonLocal", dict(h="0.1"), TypeError, "h"),
    ("PIDENonLocal", dict(scale=-0.1), ValueError, "scale"),
    ("PIDENonLocal", dict(s="half"), TypeError, "s"),
    ("PIDENonLocal", dict(s=math.nan), ValueError, "s"),
    ("PIDENonLocal", dict(n=0), ValueError, "n"),
    ("PIDENonLocal", dict(n=True), TypeError, "n"),
    ("PIDENonLocal", dict(stages=0), ValueError, "stages"),
    ("PIDENonLocal", dict(operator="laplace"), ValueError, "operator"),
    ("PIDENonLocal", dict(operator="inverse_fractional_laplacian", eps=-1.0), ValueError, "eps"),
])
def test_bad_layer_arguments_are_refused_at_construction_naming_them(layer, kwargs, error, argument):
    with pytest.raises(error, match=argument):
        getattr(nl, layer)(8, **kwargs)


@pytest.mark.parametrize("layer,kwargs,normalization", [
    ("NonLocalStage", {}, "D^-1 W (row)"),
    ("SpectralNonLocal", {}, "D^-1/2 W D^-1/2 (sym)"),
    ("SpectralNonLocal", dict(normalize="row"), "D^-1 W (row)"),
])
def test_log_kernel_is_refused_naming_the_layer_and_its_normalization(layer, kwargs, normalization):
    with pytest.raises(ValueError) as info:
        getattr(nl, layer)(8, kernel="log", **kwargs)
    message = str(info.value)
    assert message.startswith(f"{layer}: kernel='log'") and normalization in message, message


@pytest.mark.parametrize("layer", ["NonLocalStage", "SpectralNonLocal", "PIDENonLocal"])
def test_wrong_channel_count_names_the_layer_expected_shape_and_in_channels(layer):
    with pytest.raises(ValueError) as info:
        getattr(nl, layer)(8)(torch.randn(2, 6, 5, 5))
    for word in (layer, "(B, 8, H, W)", "in_channels=8", "(2, 6, 5, 5)"):
        assert word in str(info.value)


def test_pide_pool_tuple_must_match_the_spatial_dims():
    with pytest.raises(ValueError, match="pool=.*spatial dims"):
        nl.PIDENonLocal(8, pool=(2, 2))(torch.randn(2, 8, 3, 5, 5))


def test_pide_eps_passes_through_to_the_op(monkeypatch):
    seen = []
    real = _common.nonlocal_aggregate

    def spy(query, key, value, kernel, **kwargs):
        seen.append(kwargs.get("eps"))
        return real(query, key, value, kernel, **kwargs)

    monkeypatch.setattr(_common, "nonlocal_aggregate", spy)
    nl.PIDENonLocal(6, "fractional_laplacian", eps=1e-6, stages=1)(torch.randn(2, 6, 5, 5))
    assert seen == [1e-6]
