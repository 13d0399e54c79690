"""``nonlocal_ext.nn.convert``, ``replace_nonlocal`` and ``convert_state_dict`` against the real blocks.

The blocks are the installed packages' own classes (``requirements-dev.txt`` pins them): mmcv-lite's
``mmcv.cnn.NonLocal1d/2d/3d``, PyTorchVideo's ``create_nonlocal``, timm's ``NonLocalAttn`` and a
whole timm ResNet with nonlocal blocks. SlowFast is not installable: its block is written here
from the facts of its layout (sub-module and attribute names, pooling of x before φ and g, the
1/√dim_inner softmax scale), as are the AlexHex7 blocks (``test_nn.HandBuiltNonLocal``).

Every case: float64, every parameter and buffer (BN affine and running statistics) random, train
and eval mode; the converted layer's outputs, input gradients, parameter gradients and updated
running statistics agree with the original within 1e-10.

Run alone: .venv/bin/python -m pytest -q tests/test_convert.py
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp

from nonlocal_ext import nn as nl
from nonlocal_ext.nn.conversion import _key_map

from test_nn import HandBuiltNonLocal, randomize
from torchvision_ops import declare_missing_ops

declare_missing_ops()  # the pinned torchvision's CUDA-built operators cannot load on a CPU torch

mmcv_cnn = pytest.importorskip("mmcv.cnn", reason="mmcv-lite is pinned in requirements-dev.txt")
nonlocal_net = pytest.importorskip("pytorchvideo.layers.nonlocal_net", reason="pytorchvideo is pinned")
timm = pytest.importorskip("timm", reason="timm is pinned in requirements-dev.txt")
from timm.layers import NonLocalAttn  # noqa: E402

TOL = dict(rtol=1e-10, atol=1e-10)
SHAPES = {1: (2, 8, 9), 2: (2, 8, 5, 7), 3: (2, 8, 3, 5, 7)}  # odd sizes: floor pooling drops a row
MMCV = {1: mmcv_cnn.NonLocal1d, 2: mmcv_cnn.NonLocal2d, 3: mmcv_cnn.NonLocal3d}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_same_block(theirs, ours, layout, shape, seed=0):
    """Outputs, gradients (input and every parameter) and running statistics, train then eval."""
    names = _key_map(theirs.state_dict().keys(), layout)
    ours_params = dict(ours.named_parameters())
    for train in (True, False):
        theirs.train(train), ours.train(train)
        assert ours.training == train
        x = randn(*shape, seed=seed + train)
        grad = randn(*shape, seed=seed + 7)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        if reverse_mode_is_broken(theirs):
            assert_same_gradient_forward_mode(theirs, ours, names, x, grad)
        out_theirs, out_ours = theirs(x1), ours(x2)
        torch.testing.assert_close(out_ours, out_theirs, **TOL)
        assert not out_theirs.eq(x).all()  # the residual branch is not zero: the test sees it
        theirs_state, ours_state = theirs.state_dict(), ours.state_dict()
        for name, t in theirs_state.items():  # running statistics after a training step, too
            torch.testing.assert_close(ours_state[names.get(name, name)], t, **TOL, msg=name)
        if reverse_mode_is_broken(theirs):
            continue
        theirs.zero_grad(), ours.zero_grad()
        out_theirs.backward(grad), out_ours.backward(grad)
        torch.testing.assert_close(x2.grad, x1.grad, **TOL)
        for name, p in theirs.named_parameters():
            q = ours_params[names.get(name, name)]
            assert q.shape == p.shape and q.requires_grad == p.requires_grad, name
            if p.requires_grad:
                torch.testing.assert_close(q.grad, p.grad, **TOL, msg=f"gradient of {name}")


def reverse_mode_is_broken(block) -> bool:
    """mmcv's ``concatenation`` divides the output of its in-place ReLU in place (``pairwise_weight /=
    …``), so its own backward raises "modified by an inplace operation"; checked, then its gradients
    are compared in forward mode, where in-place updates are fine."""
    return type(block).__module__.startswith("mmcv.") and block.mode == "concatenation"


def assert_same_gradient_forward_mode(theirs, ours, names, x, grad, directions=3):
    """⟨grad, J_theirs·t⟩ == ⟨∇ours, t⟩ for random tangents t of the input and every parameter (a
    random direction sees any difference of the full gradients), J_theirs by ``torch.func.jvp``."""
    state = {n: t.clone() for n, t in theirs.state_dict().items()}
    with pytest.raises(RuntimeError, match="inplace operation"):
        theirs(x.clone().requires_grad_()).backward(grad)
    theirs.zero_grad()
    params = {n: p.detach() for n, p in theirs.named_parameters()}
    buffers = {n: b for n, b in theirs.named_buffers()}

    def f(x, params):  # on copies of the buffers: the BN update of this call is not kept
        return functional_call(theirs, ({**params, **{n: b.clone() for n, b in buffers.items()}},), (x,))

    leaf = x.clone().requires_grad_()
    ours.zero_grad()
    ours_params = dict(ours.named_parameters())
    ours_state = {n: t.clone() for n, t in ours.state_dict().items()}
    ours(leaf).backward(grad)
    ours.load_state_dict(ours_state)  # undo the running-statistics update of this extra step
    for k in range(directions):
        tx = randn(*x.shape, seed=100 + k)
        tp = {n: randn(*p.shape, seed=200 + k + i) for i, (n, p) in enumerate(params.items())}
        _, tangent = jvp(f, (x, params), (tx, tp))
        expected = (grad * tangent).sum()
        got = (leaf.grad * tx).sum() + sum((ours_params[names.get(n, n)].grad * t).sum() for n, t in tp.items())
        torch.testing.assert_close(got, expected, **TOL)
    theirs.load_state_dict(state)
    ours.zero_grad()


def converted(theirs, layout, backend="auto"):
    ours = nl.convert(theirs, backend=backend)
    assert isinstance(ours, (nl.NonLocal1d, nl.NonLocal2d, nl.NonLocal3d))
    assert len(ours.state_dict()) == len(theirs.state_dict())
    # the checkpoint path gives the same state: strict load of convert_state_dict
    fresh = copy.deepcopy(ours)
    fresh.load_state_dict(nl.convert_state_dict(theirs.state_dict(), layout), strict=True)
    return ours


# ---------------------------------------------------------------------------- mmcv

MMCV_NORMS = {"bn": lambda d: dict(type=f"BN{d}d" if d != 2 else "BN"), "gn": lambda d: dict(type="GN", num_groups=4),
              "none": lambda d: None}


@pytest.mark.parametrize("norm", list(MMCV_NORMS))
@pytest.mark.parametrize("use_scale", [True, False])
@pytest.mark.parametrize("sub_sample", [True, False])
@pytest.mark.parametrize("mode", nl.MODES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_mmcv_nonlocal(dim, mode, sub_sample, use_scale, norm):
    theirs = MMCV[dim](8, sub_sample=sub_sample, use_scale=use_scale, norm_cfg=MMCV_NORMS[norm](dim), mode=mode)
    theirs = randomize(theirs.double(), seed=dim)
    ours = converted(theirs, "mmcv")
    assert ours.norm == {"bn": "batch", "gn": "group", "none": "none"}[norm]
    assert ours.use_scale == ("inter" if use_scale and mode == "embedded_gaussian" else False)
    out_conv = ours.W if norm == "none" else ours.W[0]
    assert (out_conv.bias is None) == (norm != "none")  # mmcv: a conv bias only without a norm
    assert_same_block(theirs, ours, "mmcv", SHAPES[dim])


def test_mmcv_reduction_and_frozen_parameters_carry_over():
    theirs = randomize(mmcv_cnn.NonLocal2d(8, reduction=4, sub_sample=True, norm_cfg=dict(type="BN")).double())
    theirs.theta.conv.weight.requires_grad_(False)
    ours = converted(theirs, "mmcv")
    assert ours.inter_channels == 2 and not ours.theta.weight.requires_grad and ours.phi[0].weight.requires_grad
    assert_same_block(theirs, ours, "mmcv", SHAPES[2])


# ---------------------------------------------------------------------------- PyTorchVideo and SlowFast

@pytest.mark.parametrize("with_norm", [True, False])
@pytest.mark.parametrize("instantiation", ["softmax", "dot_product"])
@pytest.mark.parametrize("pool_size", [(1, 1, 1), (1, 2, 2), (2, 2, 2), (3, 1, 2)])
def test_pytorchvideo_nonlocal(pool_size, instantiation, with_norm):
    theirs = nonlocal_net.create_nonlocal(dim_in=8, dim_inner=4, pool_size=pool_size, instantiation=instantiation,
                                          norm=nn.BatchNorm3d if with_norm else None, norm_eps=1e-3, norm_momentum=0.3)
    theirs = randomize(theirs.double(), seed=3)
    ours = converted(theirs, "slowfast")
    pooled = pool_size != (1, 1, 1)
    assert (ours.sub_sample, ours.pool_input) == (pooled, pooled)
    if pooled:
        assert ours.pool_size == pool_size
    if with_norm:
        assert (ours.W[1].eps, ours.W[1].momentum) == (1e-3, 0.3)
    assert_same_block(theirs, ours, "slowfast", (2, 8, 4, 5, 7))


class SlowFastNonlocal(nn.Module):
    """SlowFast's ``Nonlocal`` layout (not installable: written from its documented structure):
    ``conv_theta/conv_phi/conv_g/conv_out`` (Conv3d 1×1), ``bn``, ``pool`` when ``use_pool``,
    attributes ``dim_inner``, ``instantiation``, ``use_pool``; x max-pooled (window = stride,
    no padding) before φ and g; softmax of θᵀφ·dim_inner^-½, or θᵀφ / M."""

    def __init__(self, dim, dim_inner, pool_size=None, instantiation="softmax"):
        super().__init__()
        self.dim_inner, self.instantiation = dim_inner, instantiation
        self.use_pool = pool_size is not None and any(k > 1 for k in pool_size)
        self.conv_theta, self.conv_phi, self.conv_g = (nn.Conv3d(dim, dim_inner, 1) for _ in range(3))
        self.conv_out = nn.Conv3d(dim_inner, dim, 1)
        self.bn = nn.BatchNorm3d(dim)
        if self.use_pool:
            self.pool = nn.MaxPool3d(kernel_size=pool_size, stride=pool_size, padding=[0, 0, 0])

    def forward(self, x):
        b, _, *spatial = x.shape
        keys = self.pool(x) if self.use_pool else x
        theta = self.conv_theta(x).flatten(2)
        phi, g = self.conv_phi(keys).flatten(2), self.conv_g(keys).flatten(2)
        scores = theta.transpose(1, 2) @ phi
        if self.instantiation == "softmax":
            a = torch.softmax(scores / math.sqrt(self.dim_inner), dim=-1)
        else:
            a = scores / scores.shape[-1]
        y = (g @ a.transpose(1, 2)).reshape(b, self.dim_inner, *spatial)
        return x + self.bn(self.conv_out(y))


@pytest.mark.parametrize("instantiation", ["softmax", "dot_product"])
@pytest.mark.parametrize("pool_size", [None, (1, 2, 2), (2, 2, 2)])
def test_slowfast_nonlocal_recognized_by_its_attributes(pool_size, instantiation):
    theirs = randomize(SlowFastNonlocal(8, 4, pool_size, instantiation).double(), seed=4)
    ours = converted(theirs, "slowfast")
    assert ours.mode == ("embedded_gaussian" if instantiation == "softmax" else "dot_product")
    assert_same_block(theirs, ours, "slowfast", (2, 8, 4, 5, 7))


# ---------------------------------------------------------------------------- timm

@pytest.mark.parametrize("use_scale,rd", [(True, None), (False, None), (True, 4)])
def test_timm_nonlocal_attn(use_scale, rd):
    theirs = randomize(NonLocalAttn(16, use_scale=use_scale, rd_channels=rd).double(), seed=5)
    ours = converted(theirs, "timm")
    assert ours.inter_channels == (rd or 8) and ours.scale == (16 ** -0.5 if use_scale else 1.0)
    assert_same_block(theirs, ours, "timm", (2, 16, 5, 7))


def test_timm_resnet_with_nonlocal_blocks_replaced_keeps_its_logits():
    model = timm.create_model("resnet26", block_args=dict(attn_layer="nl"), num_classes=5).double()
    randomize(model, seed=6)
    x = randn(2, 3, 64, 64, seed=7)
    blocks = [name for name, m in model.named_modules() if isinstance(m, NonLocalAttn)]
    assert len(blocks) == 8
    reference = copy.deepcopy(model)
    names = nl.replace_nonlocal(model)
    assert names == blocks
    assert not any(isinstance(m, NonLocalAttn) for m in model.modules())
    assert sum(isinstance(m, nl.NonLocal2d) for m in model.modules()) == 8
    for train in (False, True):
        model.train(train), reference.train(train)
        torch.testing.assert_close(model(x), reference(x), **TOL)
    # a timm checkpoint loads into the converted model once renamed
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(nl.convert_state_dict(reference.state_dict(), "timm"), strict=True)


# ---------------------------------------------------------------------------- AlexHex7

def alexhex7(dim, mode, sub_sample, bn_layer):
    """A ``NONLocalBlock{dim}D`` as AlexHex7's file for ``mode`` defines it (the class and module names
    are what tell the embedded_gaussian and dot_product files apart)."""
    cls = type(f"NONLocalBlock{dim}D", (HandBuiltNonLocal,), {"__module__": f"lib.non_local_{mode}"})
    block = cls(dim, 8, mode, sub_sample, bn_layer)
    block.in_channels, block.inter_channels, block.sub_sample = 8, block.ci, sub_sample
    if mode == "gaussian":
        block.theta = None
    return block


@pytest.mark.parametrize("bn_layer", [True, False])
@pytest.mark.parametrize("sub_sample", [True, False])
@pytest.mark.parametrize("mode", nl.MODES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_alexhex7_nonlocal(dim, mode, sub_sample, bn_layer):
    theirs = randomize(alexhex7(dim, mode, sub_sample, bn_layer).double(), seed=8)
    ours = converted(theirs, "alexhex7")
    assert ours.mode == mode
    assert_same_block(theirs, ours, "alexhex7", SHAPES[dim])


def test_alexhex7_without_its_module_name_is_ambiguous():
    block = alexhex7(2, "dot_product", True, True)
    type(block).__module__ = "somewhere"
    with pytest.raises(TypeError, match="embedded_gaussian and dot_product"):
        nl.convert(block)


# ---------------------------------------------------------------------------- models, devices, dtypes, errors

def test_replace_nonlocal_in_nested_containers_returns_the_qualified_names():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(8, 8, 3, padding=1)
            self.body = nn.Sequential(nn.ReLU(), mmcv_cnn.NonLocal2d(8, sub_sample=True, norm_cfg=dict(type="BN")))
            self.heads = nn.ModuleDict({"a": nn.ModuleList([nn.Identity(), NonLocalAttn(8, rd_channels=4)])})
            self.video = nonlocal_net.create_nonlocal(dim_in=8, dim_inner=4, pool_size=(1, 2, 2))

        def forward(self, x):
            y = self.heads["a"][1](self.body(self.stem(x)))
            return y, self.video(y.unsqueeze(2).expand(-1, -1, 3, -1, -1))

    model = randomize(Net().double(), seed=9)
    reference = copy.deepcopy(model)
    names = nl.replace_nonlocal(model, backend="reference")
    assert names == ["body.1", "heads.a.1", "video"]
    assert model.body[1].backend == "reference" and isinstance(model.heads["a"][1], nl.NonLocal2d)
    assert nl.replace_nonlocal(model) == []  # nothing left to replace
    x = randn(2, 8, 6, 6, seed=10)
    for train in (True, False):
        model.train(train), reference.train(train)
        for ours, theirs in zip(model(x), reference(x)):
            torch.testing.assert_close(ours, theirs, **TOL)


def test_convert_keeps_dtype_and_mode_and_backend():
    theirs = mmcv_cnn.NonLocal2d(8, sub_sample=True).float().eval()
    ours = nl.convert(theirs, backend="chunked")
    assert ours.g[0].weight.dtype == torch.float32 and not ours.training and ours.backend == "chunked"
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module", [nn.Conv2d(2, 2, 1), nl.NonLocal2d(4), nn.Sequential()],
                         ids=["conv", "ours", "sequential"])
def test_unsupported_modules_are_a_type_error_listing_the_supported(module):
    with pytest.raises(TypeError, match=r"cannot convert a torch.nn.*|cannot convert a nonlocal_ext.*") as info:
        nl.convert(module)
    assert "mmcv.cnn.NonLocal1d/2d/3d" in str(info.value) and "timm.layers.NonLocalAttn" in str(info.value)
    with pytest.raises(TypeError, match="nn.Module"):
        nl.convert("NonLocal2d")


def test_blocks_with_options_we_cannot_express_are_refused_naming_the_part():
    pooled = nonlocal_net.create_nonlocal(dim_in=8, dim_inner=4, pool_size=(1, 2, 2))
    pooled.pool.ceil_mode = True
    with pytest.raises(ValueError, match="pool"):
        nl.convert(pooled)
    wide = nonlocal_net.create_nonlocal(dim_in=8, dim_inner=4)
    wide.conv_g = nn.Conv3d(8, 4, 3, padding=1)
    with pytest.raises(ValueError, match="conv_g"):
        nl.convert(wide)
    other_norm = nonlocal_net.create_nonlocal(dim_in=8, dim_inner=4, norm=nn.InstanceNorm3d)
    with pytest.raises(TypeError, match="InstanceNorm3d"):
        nl.convert(other_norm)
    with pytest.raises(ValueError, match="model is itself"):
        nl.replace_nonlocal(NonLocalAttn(8))


def test_convert_state_dict_renames_blocks_only_and_checks_its_arguments():
    model = nn.Sequential(nn.Conv2d(8, 8, 1), mmcv_cnn.NonLocal2d(8, sub_sample=True, norm_cfg=dict(type="BN")))
    theirs = model.state_dict()
    sd = nl.convert_state_dict(theirs, "mmcv")
    assert "0.weight" in sd and "0.bias" in sd  # outside the block: untouched
    assert {"1.g.0.weight", "1.theta.weight", "1.phi.0.weight", "1.W.0.weight", "1.W.1.running_mean"} <= set(sd)
    assert "1.W.0.bias" not in sd  # mmcv has no conv bias before its norm
    assert all(sd[k] is v for k, v in zip(sd, theirs.values()))  # renamed, not copied, in order
    ours = nn.Sequential(nn.Conv2d(8, 8, 1), nl.NonLocal2d(8, out_bias=False))
    ours.load_state_dict(sd, strict=True)
    assert list(nl.convert_state_dict(theirs, "mmcv", prefix="2.")) == list(theirs)  # no block under "2."
    assert "1.W.0.weight" in nl.convert_state_dict(theirs, "mmcv", prefix="1.")
    with pytest.raises(ValueError, match="layout"):
        nl.convert_state_dict({}, "detectron")
    with pytest.raises(TypeError, match="prefix"):
        nl.convert_state_dict({}, "mmcv", prefix=1)
    with pytest.raises(TypeError, match="state_dict"):
        nl.convert_state_dict([1], "mmcv")


@pytest.mark.parametrize("pool_size", [(1, 2, 2), (2, 2, 2)])
def test_slowfast_checkpoint_loads_into_a_model_built_with_our_layers(pool_size):
    """What a SlowFast/PyTorchVideo user does without the library: rename the checkpoint and load it."""
    theirs = randomize(nn.ModuleDict({"s3": nn.ModuleDict({"nonlocal": nonlocal_net.create_nonlocal(
        dim_in=8, dim_inner=4, pool_size=pool_size)})}).double(), seed=11)
    ours = nn.ModuleDict({"s3": nn.ModuleDict({"nonlocal": nl.NonLocal3d(
        8, 4, pool_input=True, pool_size=pool_size, use_scale="inter", dtype=torch.float64)})})
    ours.load_state_dict(nl.convert_state_dict(theirs.state_dict(), "slowfast"), strict=True)
    ours.eval(), theirs.eval()
    x = randn(2, 8, 4, 6, 6, seed=12)
    torch.testing.assert_close(ours["s3"]["nonlocal"](x), theirs["s3"]["nonlocal"](x), **TOL)
