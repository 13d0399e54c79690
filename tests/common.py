"""Shared test helpers: the combinations, one call with its gradients, the check against the float64 reference.

The inputs and the error rule come from :mod:`nonlocal_ext.testing` (shared with the benchmark)."""

from __future__ import annotations

import itertools

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nonlocal_ext
from nonlocal_ext import KERNELS
from nonlocal_ext.spec import NORMALIZATIONS, UPDATES
from nonlocal_ext.testing import KERNEL_PARAMS, error_and_bound, make_inputs

# Enumerations, all from the registries (nonlocal_ext.KERNELS, spec.NORMALIZATIONS and spec.UPDATES):
#: (update, with_self_value) of every valid call: self_value is taken by diffusion only.
UPDATE_CASES = [(update, False) for update in UPDATES] + [("diffusion", True)]
#: Every affinity kernel but ``dot`` (the one with a linear-time path), in the registry's order.
NON_DOT_KERNELS = [name for name in KERNELS if name != "dot"]
#: The kernels whose pair variable is the squared distance ρ, in the registry's order.
DISTANCE_KERNELS = [name for name, kernel in KERNELS.items() if kernel.family == "distance"]

# Every valid (kernel, normalize, update, symmetric, with_self_value).
COMBOS = [
    (kernel, normalize, update, symmetric, with_self_value)
    for kernel, normalize, (update, with_self_value), symmetric in itertools.product(
        KERNELS, NORMALIZATIONS, UPDATE_CASES, [False, True])
]


def combo_id(combo):
    kernel, normalize, update, symmetric, with_self_value = combo
    return "-".join([kernel, normalize, update] + (["sym"] if symmetric else []) + (["u"] if with_self_value else []))


# The error rule (TOLERANCE, error_and_bound), the kernel parameters and the inputs are
# nonlocal_ext/testing.py's: `nonlocal-bench --check` judges by the same ones.


def kernel_kwargs(kernel: str) -> dict:
    """Parameters that keep each kernel well conditioned on unit-scale data (the benchmark's too)."""
    return dict(KERNEL_PARAMS[kernel])


def run(backend, q, k, v, u, kernel, normalize, update, symmetric, grad_out=None, **kwargs):
    """Output and gradients (of query, key, value, self_value) of one call."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (q, k, v, u)]
    out = nonlocal_ext.nonlocal_aggregate(
        leaves[0], leaves[1], leaves[2], kernel, normalize=normalize, update=update, symmetric=symmetric,
        self_value=leaves[3], backend=backend, **kwargs)
    if grad_out is None:
        return out.detach(), []
    inputs = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype), allow_unused=True)
    return out.detach(), [torch.zeros_like(x) if gr is None else gr for x, gr in zip(inputs, grads)]


def square_only(combo):
    """symmetric and diffusion without self_value need N == M."""
    kernel, normalize, update, symmetric, with_self_value = combo
    return symmetric or (update == "diffusion" and not with_self_value)


_TRUTH = {}


def _truth(combo, shape, noncontiguous):
    """Inputs, upstream gradient and float64 reference results (on CPU) of one case, computed once per session
    (the CUDA tests compare several backends and dtypes with the same truth)."""
    key = (combo, shape, noncontiguous)
    if key not in _TRUTH:
        kernel, normalize, update, symmetric, with_self_value = combo
        batch, n, m, d, c = shape
        inputs64 = make_inputs(kernel, normalize, batch, n, m, d, c, with_self_value=with_self_value,
                               noncontiguous=noncontiguous)
        kwargs = dict(kernel_kwargs(kernel), eps=1e-4)  # one coincidence threshold for every dtype compared
        grad_out = torch.randn(*batch, n, c, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        truth = run("reference", *inputs64, kernel, normalize, update, symmetric, grad_out, **kwargs)
        _TRUTH[key] = (inputs64, kwargs, grad_out, truth)
        if len(_TRUTH) > 64:  # a bounded cache: the cases of one test function come in order
            del _TRUTH[next(iter(_TRUTH))]
    return _TRUTH[key]


def check_against_reference(backend, combo, shape, dtype, noncontiguous=False, device="cpu"):
    """Output and every gradient of ``backend`` on ``device`` in ``dtype`` against the float64 reference
    (on CPU), by :func:`assert_close_to_truth`; "plain PyTorch in the same dtype" is the reference backend
    on the same device (for ``backend="reference"`` itself: on CPU). NaN anywhere (an element a kernel did
    not write) fails with its own message. The inputs and the truth of a case are computed once (:func:`_truth`)."""
    kernel, normalize, update, symmetric, with_self_value = combo
    inputs64, kwargs, grad_out, truth = _truth(combo, shape, noncontiguous)
    low = [None if t is None else t.to(device=device, dtype=dtype) for t in inputs64]  # strides preserved
    g = grad_out.to(device)
    ours = run(backend, *low, kernel, normalize, update, symmetric, g, **kwargs)
    if dtype == torch.float64 and device == "cpu":
        plain = truth
    elif backend == "reference":  # the reference on a device is judged by the reference on CPU, same dtype
        plain = run("reference", *[None if t is None else t.cpu() for t in low], kernel, normalize, update,
                    symmetric, grad_out, **kwargs)
    else:
        plain = run("reference", *low, kernel, normalize, update, symmetric, g, **kwargs)
    assert ours[0].dtype == dtype and ours[0].shape == truth[0].shape
    assert ours[0].device.type == torch.device(device).type
    names = ["out", "grad query", "grad key", "grad value", "grad self_value"]
    for name, o, p, t in zip(names, [ours[0]] + ours[1], [plain[0]] + plain[1], [truth[0]] + truth[1]):
        o, p = o.cpu(), p.cpu()
        assert not o.isnan().any(), f"{name}: NaN (an element the kernels did not write)"
        assert_close_to_truth(o, p, t, dtype, name, floor=max(1.0, max_abs(truth[0])))


def max_abs(t):
    return t.double().abs().max().item() if t.numel() else 0.0


def assert_close_to_truth(ours, plain, truth, dtype, what, floor=0.0):
    """The rule above. ``floor`` raises max|truth| for tensors that are ~0 by cancellation:
    callers pass the scale of the computation (the inputs of :func:`make_inputs` and the
    upstream gradients are unit scale, so at least 1, or max|output| when that is larger)."""
    err, bound, err_plain, scale = error_and_bound(ours, plain, truth, dtype, floor)
    assert err <= bound, f"{what}: max error {err:.3e} > bound {bound:.3e} (plain {err_plain:.3e}, max|truth| {scale:.3e})"


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces (``.largest``)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


# ---- coordinates far from the origin (distance kernels) --------------------------------------------

#: The accuracy targets of distance kernels on coordinates, relative to max|truth| (float32).
VALUE_TARGET, GRADIENT_TARGET = 2e-4, 2e-3
OFFSETS = (0.0, 10.0, 1e3, 1e4)  # in units of the grid spacing h


def point_set(kind, dim, side):
    """(points (side^dim, dim) in the unit square/cube, spacing h): a grid, or a uniform random cloud."""
    h = 1.0 / (side - 1)
    if kind == "grid":
        axis = torch.arange(side, dtype=torch.float64) * h
        return torch.stack(torch.meshgrid(*([axis] * dim), indexing="ij"), -1).reshape(-1, dim), h
    return torch.rand(side ** dim, dim, generator=torch.Generator().manual_seed(dim), dtype=torch.float64), h


def coordinate_case(points, h, offset, kernel, power, normalize, update, backend):
    """Relative errors (value, worst gradient) of one float32 call with query = key = points + offset·h,
    against float64 on the same float32 points moved to their mean in float64."""
    p32 = (points + offset * h).float()
    p64 = p32.double()
    p64 = p64 - p64.mean(0)
    v = torch.stack([torch.sin(6.0 * points.sum(-1)), torch.cos(6.0 * points[:, 0]) + points[:, -1]], -1)
    grad_out = torch.randn(v.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kw = dict(power=power, eps=1e-4) if kernel == "fractional" else dict(gamma=-3.0, eps=1e-4)
    truth = run("reference", p64, p64, v, None, kernel, normalize, update, False, grad_out, **kw)
    ours = run(backend, p32, p32, v.float(), None, kernel, normalize, update, False, grad_out, **kw)

    def relative(o, t):
        return ((o.double() - t).abs().max() / t.abs().max()).item()

    return relative(ours[0], truth[0]), max(relative(o, t) for o, t in zip(ours[1], truth[1]))


#: Small versions of bench/accuracy.py's geometries: (kind, dim, points per side).
COORDINATE_SETS = [("grid", 2, 24), ("grid", 3, 8), ("cloud", 2, 24), ("cloud", 3, 8)]
COORDINATE_SET_IDS = ["grid2d", "grid3d", "cloud2d", "cloud3d"]


#: (kernel, power) of the accuracy targets.
COORDINATE_KERNELS = (("fractional", 1.0), ("fractional", 3.0), ("fractional", 4.0), ("log", None))


def coordinate_misses(backend, kind, dim, side, offsets=OFFSETS, kernels=COORDINATE_KERNELS):
    """The calls of one point set, moved by each offset, that miss the targets: ``fractional`` (power 1,
    3, 4) and ``log`` × ``count``/``row`` × ``aggregate``/``diffusion``, float32 against float64."""
    points, h = point_set(kind, dim, side)
    misses = []
    for offset in offsets:
        for kernel, power in kernels:
            for normalize in ("count", "row"):
                for update in UPDATES:
                    value, gradient = coordinate_case(points, h, offset, kernel, power, normalize, update, backend)
                    if value > VALUE_TARGET or gradient > GRADIENT_TARGET:
                        misses.append(f"offset {offset:g}h {kernel} {power} {normalize} {update}: "
                                      f"value {value:.2e}, gradient {gradient:.2e}")
    return misses
