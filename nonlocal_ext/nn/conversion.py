r"""Swap the nonlocal blocks of other libraries for :class:`NonLocal1d/2d/3d`: a module, a model, a checkpoint.

* :func:`convert` ``(module) -> NonLocalNd``: our layer with the same parameters (trainable as they
  were), buffers (BatchNorm running statistics), train/eval mode, device and dtype, giving the same
  outputs and gradients;
* :func:`replace_nonlocal` ``(model) -> names``: every supported block inside a model, in place;
* :func:`convert_state_dict` ``(state_dict, layout)``: a checkpoint of a model with those blocks,
  renamed for the same model built with ours, without the original library installed.

| layout | block | how it maps onto ours |
|---|---|---|
| ``"mmcv"`` | ``mmcv.cnn.NonLocal1d/2d/3d`` | ``ConvModule``\ s ``g``, ``theta``, ``phi``, ``conv_out`` (conv + ``bn``/``gn``); inter = max(C // reduction, 1); ``use_scale`` scales ``embedded_gaussian`` only, by 1/√inter; the output conv has a bias only without a norm; ``sub_sample`` pools inside ``g`` and ``phi`` |
| ``"slowfast"`` | SlowFast ``Nonlocal``, PyTorchVideo ``NonLocal`` | ``conv_theta``, ``conv_phi``, ``conv_g``, ``conv_out`` and ``bn`` (SlowFast) or ``norm`` (PyTorchVideo, optional); x max-pooled by ``pool`` (window = stride = ``pool_size``) before φ and g; ``softmax`` scaled by 1/√dim_inner, ``dot_product`` ÷ M |
| ``"timm"`` | ``timm.layers.NonLocalAttn`` | ``t``, ``p``, ``g``, ``z``, ``norm`` (BatchNorm2d); softmax scaled by its ``scale`` (1/√in_channels); no pooling |
| ``"alexhex7"`` | ``NONLocalBlock1D/2D/3D`` | our own layout: keys unchanged |

SlowFast is recognized by its sub-modules and attributes (``conv_theta/phi/g/out``, ``bn``,
``instantiation``), since it is not an installable package; the others by class and attributes.
AlexHex7's four files define classes of the same names, told apart by the name of their module
(``non_local_embedded_gaussian`` …) and by their sub-modules (``gaussian``: no ``theta``;
``concatenation``: ``concat_project``).

A converted layer holds new Parameter objects: convert a model before building its optimizer.
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict

import torch
from torch import nn

from .nonlocal_block import DEFAULT_POOL_SIZE, NonLocal1d, NonLocal2d, NonLocal3d, _NonLocalNd

__all__ = ["LAYOUTS", "SUPPORTED", "convert", "convert_state_dict", "replace_nonlocal"]

LAYOUTS = ("mmcv", "slowfast", "timm", "alexhex7")
SUPPORTED = ("mmcv.cnn.NonLocal1d/2d/3d, pytorchvideo.layers.nonlocal_net.NonLocal, SlowFast Nonlocal, "
             "timm.layers.NonLocalAttn, AlexHex7 NONLocalBlock1D/2D/3D")

_OURS = {1: NonLocal1d, 2: NonLocal2d, 3: NonLocal3d}
_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# ---------------------------------------------------------------------------- recognizing a block

def _layout(module: nn.Module) -> str | None:
    """The layout of a supported block, or None."""
    cls, where = type(module).__name__, type(module).__module__
    has = lambda *names: all(hasattr(module, n) for n in names)  # noqa: E731
    if isinstance(module, _NonLocalNd):
        return None
    if where.startswith("mmcv.") and cls in ("NonLocal1d", "NonLocal2d", "NonLocal3d") and has("conv_out", "g"):
        return "mmcv"
    if has("conv_theta", "conv_phi", "conv_g", "conv_out", "instantiation") and (has("norm") or has("bn")):
        return "slowfast"
    if cls == "NonLocalAttn" and has("t", "p", "g", "z", "norm", "scale"):
        return "timm"
    if re.fullmatch(r"NONLocalBlock[123]D|_NonLocalBlockND", cls) and has("g", "W", "phi", "in_channels",
                                                                           "inter_channels", "sub_sample"):
        return "alexhex7"
    return None


def _unsupported(module) -> TypeError:
    return TypeError(f"cannot convert a {type(module).__module__}.{type(module).__name__}: "
                     f"supported nonlocal blocks are {SUPPORTED}")


def _conv_dim(conv, what: str) -> int:
    """The spatial dims of a plain 1×1 convolution (stride 1, no padding, groups 1), else a ValueError."""
    # mmcv's Conv2d/Conv3d wrappers subclass torch's and differ only on empty inputs
    exact = type(conv) in _CONVS or type(conv).__module__.startswith("mmcv.")
    dim = next((d for cls, d in _CONVS.items() if isinstance(conv, cls)), None) if exact else None
    if dim is None:
        raise TypeError(f"cannot convert: {what} is a {type(conv).__name__}, expected a Conv1d/2d/3d")
    if (set(conv.kernel_size) != {1} or set(conv.stride) != {1} or set(conv.dilation) != {1} or conv.groups != 1
            or (isinstance(conv.padding, str) and conv.padding != "valid")
            or (not isinstance(conv.padding, str) and set(conv.padding) != {0})):
        raise ValueError(f"cannot convert: {what} is not a plain 1×1 convolution ({conv})")
    return dim


def _norm_kind(norm, what: str) -> str:
    if norm is None:
        return "none"
    if isinstance(norm, _BATCH_NORMS) and type(norm) in _BATCH_NORMS:
        return "batch"
    if type(norm) is nn.GroupNorm:
        return "group"
    raise TypeError(f"cannot convert: {what} is a {type(norm).__name__}; supported output norms are "
                    f"BatchNorm1d/2d/3d, GroupNorm and none")


def _max_pool_size(pool, dim: int, what: str):
    """The window of a max-pool whose stride is its window (no padding, floor), as a tuple."""
    if type(pool) not in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d):
        raise TypeError(f"cannot convert: {what} is a {type(pool).__name__}, expected a MaxPool{dim}d")
    as_tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * dim  # noqa: E731
    kernel, stride = as_tuple(pool.kernel_size), as_tuple(pool.stride or pool.kernel_size)
    if kernel != stride or set(as_tuple(pool.padding)) != {0} or set(as_tuple(pool.dilation)) != {1} or pool.ceil_mode:
        raise ValueError(f"cannot convert: {what} ({pool}) is not a max-pool with stride = window, no padding, floor")
    return kernel


def _options(module: nn.Module, layout: str) -> dict:
    """Constructor arguments of our layer (with ``dimension``) that reproduce ``module`` exactly."""
    if layout == "mmcv":
        dim = _conv_dim(_mmcv_conv(module.g), "g.conv")
        out = module.conv_out
        if out.with_activation or getattr(out, "order", ("conv", "norm", "act"))[:2] != ("conv", "norm"):
            raise ValueError("cannot convert: mmcv conv_out has an activation or a non-default order")
        norm = out.norm if out.with_norm else None
        sub = bool(module.sub_sample)
        if sub:
            pools = [module.g[1]] + ([module.phi] if module.mode == "gaussian" else [module.phi[1]])
            sizes = {_max_pool_size(p, dim, "the sub_sample max-pool") for p in pools}
            if sizes != {DEFAULT_POOL_SIZE[dim]}:
                raise ValueError(f"cannot convert: mmcv sub_sample pools {sizes}, expected {DEFAULT_POOL_SIZE[dim]}")
        use_scale = bool(module.use_scale) and module.mode == "embedded_gaussian"
        return dict(dimension=dim, in_channels=module.in_channels, inter_channels=module.inter_channels,
                    mode=module.mode, sub_sample=sub, use_scale="inter" if use_scale else False,
                    norm=_norm_kind(norm, "mmcv conv_out.norm"), out_bias=out.conv.bias is not None,
                    bias=_mmcv_conv(module.g).bias is not None,
                    norm_groups=norm.num_groups if isinstance(norm, nn.GroupNorm) else 32)
    if layout == "slowfast":
        dim = _conv_dim(module.conv_theta, "conv_theta")
        for name in ("conv_phi", "conv_g", "conv_out"):
            _conv_dim(getattr(module, name), name)
        norm = module.norm if hasattr(module, "norm") else module.bn
        pool = getattr(module, "pool", None) if getattr(module, "use_pool", True) else None
        pool_size = None if pool is None else _max_pool_size(pool, dim, "pool")
        instantiation = module.instantiation
        if instantiation not in ("softmax", "dot_product"):
            raise ValueError(f"cannot convert: unknown instantiation={instantiation!r}")
        biases = {getattr(module, n).bias is not None for n in ("conv_theta", "conv_phi", "conv_g")}
        if len(biases) != 1:
            raise ValueError("cannot convert: conv_theta, conv_phi and conv_g differ in having a bias")
        return dict(dimension=dim, in_channels=module.conv_theta.in_channels,
                    inter_channels=module.conv_theta.out_channels,
                    mode="embedded_gaussian" if instantiation == "softmax" else "dot_product",
                    sub_sample=pool_size is not None, pool_size=pool_size, pool_input=pool_size is not None,
                    use_scale="inter" if instantiation == "softmax" else False, norm=_norm_kind(norm, "the norm"),
                    bias=biases.pop(), out_bias=module.conv_out.bias is not None,
                    norm_groups=norm.num_groups if isinstance(norm, nn.GroupNorm) else 32)
    if layout == "timm":
        dim = _conv_dim(module.t, "t")
        biases = {c.bias is not None for c in (module.t, module.p, module.g)}
        if len(biases) != 1:
            raise ValueError("cannot convert: t, p and g differ in having a bias")
        scale = float(module.scale)
        return dict(dimension=dim, in_channels=module.t.in_channels, inter_channels=module.t.out_channels,
                    mode="embedded_gaussian", sub_sample=False, use_scale=scale if scale != 1.0 else False,
                    norm=_norm_kind(module.norm, "norm"), bias=biases.pop(), out_bias=module.z.bias is not None)
    # alexhex7
    conv = module.g[0] if isinstance(module.g, nn.Sequential) else module.g
    dim = _conv_dim(conv, "g")
    return dict(dimension=dim, in_channels=module.in_channels, inter_channels=module.inter_channels,
                mode=_alexhex7_mode(module), sub_sample=bool(module.sub_sample),
                bn_layer=isinstance(module.W, nn.Sequential))


def _mmcv_conv(part):
    return (part[0] if isinstance(part, nn.Sequential) else part).conv


def _alexhex7_mode(module) -> str:
    if getattr(module, "theta", None) is None:
        return "gaussian"
    if hasattr(module, "concat_project"):
        return "concatenation"
    where = type(module).__module__
    for mode in ("embedded_gaussian", "dot_product"):
        if where.endswith(mode):
            return mode
    raise TypeError(f"cannot convert {where}.{type(module).__name__}: the embedded_gaussian and dot_product "
                    f"blocks of AlexHex7 have the same sub-modules and are told apart by the module name "
                    f"(non_local_embedded_gaussian / non_local_dot_product), which is {where!r} here")


# ---------------------------------------------------------------------------- modules

def convert(module: nn.Module, backend: str = "auto") -> _NonLocalNd:
    """Our :class:`NonLocal1d/2d/3d` equivalent to ``module`` (a supported block; see the module docstring).

    The result carries copies of the block's parameters (with their ``requires_grad``) and buffers,
    its train/eval mode, device and dtype, and computes the same outputs and gradients. A module
    that is not a supported block is a TypeError naming its class and listing the supported ones.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(module).__name__}")
    layout = _layout(module)
    if layout is None:
        raise _unsupported(module)
    options = _options(module, layout)
    cls = _OURS[options.pop("dimension")]
    tensor = next(iter(module.parameters()), None)
    factory = {} if tensor is None else {"device": tensor.device, "dtype": tensor.dtype}
    ours = cls(backend=backend, **options, **factory)
    norm = _their_norm(module, layout)
    if norm is not None:  # their norm module itself: eps, momentum, affine, running statistics as they are
        ours.W[1] = copy.deepcopy(norm)
    ours.load_state_dict(convert_state_dict(module.state_dict(), layout), strict=True)
    names = _key_map(module.state_dict().keys(), layout)
    ours_params = dict(ours.named_parameters())
    for name, p in module.named_parameters():
        ours_params[names.get(name, name)].requires_grad_(p.requires_grad)
    return ours.train(module.training)


def _their_norm(module, layout):
    if layout == "mmcv":
        return module.conv_out.norm if module.conv_out.with_norm else None
    if layout == "slowfast":
        return module.norm if hasattr(module, "norm") else module.bn
    if layout == "timm":
        return module.norm
    return module.W[1] if isinstance(module.W, nn.Sequential) else None


def replace_nonlocal(model: nn.Module, backend: str = "auto") -> list[str]:
    """Replace, in place, every supported nonlocal block inside ``model`` (at any depth: attributes,
    Sequential, ModuleList, ModuleDict) with :func:`convert` of it; returns the qualified names replaced.

    ``model`` itself cannot be replaced in place: for a single block use :func:`convert`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"replace_nonlocal expects an nn.Module, got {type(model).__name__}")
    if _layout(model) is not None:
        raise ValueError(f"replace_nonlocal: model is itself a {type(model).__name__} block; use convert(model)")
    replaced = []

    def visit(parent: nn.Module, prefix: str):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            qualified = f"{prefix}{name}"
            if _layout(child) is not None:
                parent._modules[name] = convert(child, backend=backend)
                replaced.append(qualified)
            else:
                visit(child, qualified + ".")

    visit(model, "")
    return replaced


# ---------------------------------------------------------------------------- checkpoints

def _norm_prefixes(keys, root, layout):
    if layout == "mmcv":
        return [f"{root}conv_out.{n}." for n in ("bn", "gn") if any(k.startswith(f"{root}conv_out.{n}.") for k in keys)]
    if layout == "slowfast":
        return [f"{root}{n}." for n in ("bn", "norm") if any(k.startswith(f"{root}{n}.") for k in keys)]
    return [f"{root}norm."] if any(k.startswith(f"{root}norm.") for k in keys) else []


_SIGNATURE = {  # a key that only a block of the layout has, relative to the block's root
    "mmcv": re.compile(r"(.*?)conv_out\.conv\.weight"),
    "slowfast": re.compile(r"(.*?)conv_theta\.weight"),
    "timm": re.compile(r"(.*?)t\.weight"),
}


def _rules(layout: str, has_norm: bool):
    """(their suffix pattern, our replacement) within one block."""
    out = "W.0." if has_norm else "W."
    if layout == "mmcv":
        return [(r"(g|theta|phi)(\.0)?\.conv\.", r"\1\2."), (r"conv_out\.conv\.", out), (r"conv_out\.(bn|gn)\.", "W.1."),
                (r"concat_project\.conv\.", "concat_project.0.")]
    if layout == "slowfast":
        return [(r"conv_(theta|phi|g)\.", r"\1."), (r"conv_out\.", out), (r"(bn|norm)\.", "W.1.")]
    return [(r"t\.", "theta."), (r"p\.", "phi."), (r"g\.", "g."), (r"z\.", out), (r"norm\.", "W.1.")]


def _block_roots(keys, layout):
    roots = []
    for k in keys:
        match = _SIGNATURE[layout].fullmatch(k)
        if match is None:
            continue
        root = match.group(1)
        if layout == "timm" and not all(f"{root}{n}.weight" in keys for n in ("p", "g", "z")):
            continue  # some other module with a sub-module named t
        if layout == "slowfast" and not all(f"{root}conv_{n}.weight" in keys for n in ("phi", "g", "out")):
            continue
        roots.append(root)
    return sorted(roots, key=len, reverse=True)  # innermost first when blocks nest (they do not in practice)


def _key_map(keys, layout: str, prefix: str = "") -> dict:
    """{their key: our key} for the keys of the blocks of ``layout`` under ``prefix``."""
    if layout == "alexhex7":
        return {}
    keys = set(keys)
    renamed = {}
    for root in _block_roots(keys, layout):
        if not root.startswith(prefix):
            continue
        rules = [(re.compile(re.escape(root) + pattern), root + repl)
                 for pattern, repl in _rules(layout, bool(_norm_prefixes(keys, root, layout)))]
        for k in keys:
            if k in renamed or not k.startswith(root):
                continue
            for pattern, repl in rules:
                if pattern.match(k):
                    renamed[k] = pattern.sub(repl, k, count=1)
                    break
    return renamed


def convert_state_dict(state_dict, layout: str, prefix: str = "") -> "OrderedDict[str, torch.Tensor]":
    """A state dict with the nonlocal blocks of ``layout`` renamed to our layout; other keys untouched.

    Args:
        state_dict: of a block or of a whole model (e.g. an mmaction2 or SlowFast checkpoint's
            ``state_dict``); its tensors are not copied.
        layout: ``"mmcv"``, ``"slowfast"`` (PyTorchVideo's ``norm`` naming included), ``"timm"``
            or ``"alexhex7"`` (our layout already: returned as is).
        prefix: only blocks whose keys start with ``prefix`` are renamed.

    The blocks are found by their keys (mmcv: ``…conv_out.conv.weight``; slowfast:
    ``…conv_theta.weight`` with ``conv_phi``, ``conv_g``, ``conv_out``; timm: ``…t.weight`` with
    ``p``, ``g``, ``z``). The model that loads the result must build each block with the options
    :func:`convert` would choose (e.g. ``NonLocal3d(..., pool_input=True, pool_size=(1, 2, 2),
    use_scale="inter")`` for SlowFast); with them it loads with ``strict=True``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout={layout!r}; expected one of {', '.join(map(repr, LAYOUTS))}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    if not hasattr(state_dict, "items"):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    renamed = _key_map(state_dict.keys(), layout, prefix)
    return OrderedDict((renamed.get(k, k), v) for k, v in state_dict.items())
