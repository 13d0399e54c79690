"""What gets timed: our backends and the peers a user would otherwise pick.

A :class:`Runner` is a name, a ``reason(case, inputs)`` saying why it cannot run a case
(``None``: it can) and a ``build(case)`` returning ``fn(query, key, value, self_value) -> out``,
a differentiable function computing exactly ``nonlocal_aggregate`` for that case.

* **Ours** — one runner per backend in ``nonlocal_ext.backends.BACKENDS`` (reference, chunked,
  linear, cpu, triton, and any added later), asked through the registry's own
  ``unsupported_reason``; they call the public op with ``backend=<name>``.
* **Peers** — :data:`PEERS`, an ordinary dict (tests add a deliberately wrong runner to it):
  ``dense``: the plain dense formula of each kernel with autograd (what a user writes without
  us; unlike our ``reference`` it takes no log-domain care); ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` for ``gaussian`` + ``row``
  (its default scale is 1/√D, so ours is passed explicitly; on CPU its fused flash kernel needs
  D = C, else it falls back to its dense math path); ``sdpa_flash``, ``sdpa_efficient``, ``sdpa_math``:
  the same with one SDPA kernel pinned (CUDA only); ``flex``: FlexAttention on CUDA
  (compiled) for ``gaussian``, ``rbf`` and ``fractional`` with ``row``, through log-space scores;
  ``keops``: pykeops LazyTensors, when installed, for ``gaussian`` and ``rbf`` with
  ``none``/``count``/``row``.

A peer that cannot express a case is left out of ``--backends all``; a runner named explicitly
in ``--backends`` gets an error row with its reason instead.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import nonlocal_ext
from nonlocal_ext import backends
from nonlocal_ext.spec import validate

from .cases import PARAMETERS, Case

Inputs = tuple  # (query, key, value, self_value or None)


@dataclass(frozen=True)
class Runner:
    """One thing to time.

    ``forward_flops``: the GEMM FLOPs of its forward when it does less work than the dense
    computation exactly (``None``: the dense count of :meth:`Case.forward_flops`).
    ``dense_temporaries``: how many N×M temporaries per batch element it may hold at once, when it
    materializes them (used to refuse a case that cannot fit in memory before starting it).
    ``warmup``: calls before timing (more for runners that compile on first calls).
    """

    name: str
    kind: str  # "ours" | "peer"
    reason: Callable[[Case, Inputs], Optional[str]]
    build: Callable[[Case], Callable]
    forward_flops: Optional[Callable[[Case], float]] = None
    dense_temporaries: int = 0
    warmup: int = 1


# ---------------------------------------------------------------------------------------- ours

def _ours(name: str) -> Runner:
    def reason(case, inputs):
        q, k, v, u = inputs
        try:
            spec = validate(q, k, v, case.kernel, normalize=case.normalize, update=case.update, symmetric=False,
                            self_value=u, backend=name, **_defaults(case))
        except (TypeError, ValueError) as error:
            return str(error)
        return backends.BACKENDS[name].unsupported_reason(spec, q)

    def build(case):
        kwargs = case.kernel_kwargs

        def fn(q, k, v, u):
            return nonlocal_ext.nonlocal_aggregate(q, k, v, case.kernel, normalize=case.normalize,
                                                   update=case.update, self_value=u, backend=name, **kwargs)
        return fn

    return Runner(name, "ours", reason, build, forward_flops=_OWN_FLOPS.get(name),
                  dense_temporaries=_DENSE_TEMPORARIES.get(name, 0))


#: Forward GEMM FLOPs of the backends that do less than the dense work, exactly:
#: ``linear`` forms kᵀv then q(kᵀv), 2·(N+M)·D·C per batch element.
_OWN_FLOPS = {"linear": lambda case: 2.0 * case.batch * (case.N + case.M) * case.D * case.C}

#: Backends that materialize N×M matrices: how many they may hold at once (the dense reference
#: keeps ~4 in its forward and ~6 with autograd; 8 leaves a margin).
_DENSE_TEMPORARIES = {"reference": 8}

_OP_DEFAULTS = {name: p.default for name, p in inspect.signature(nonlocal_ext.nonlocal_aggregate).parameters.items()
                if name in PARAMETERS}


def _defaults(case: Case) -> dict:
    """The op's ``scale``, ``power``, ``gamma`` and ``eps`` for this case (its defaults, then the case's)."""
    return {**_OP_DEFAULTS, **case.kernel_kwargs}


def _auto() -> Runner:
    """``backend="auto"``: what a user gets without choosing (it may pick a dense path)."""
    def build(case):
        kwargs = case.kernel_kwargs

        def fn(q, k, v, u):
            return nonlocal_ext.nonlocal_aggregate(q, k, v, case.kernel, normalize=case.normalize,
                                                   update=case.update, self_value=u, **kwargs)
        return fn
    return Runner("auto", "ours", lambda case, inputs: None, build)  # auto keeps dense paths within its memory budget


def our_runners() -> dict[str, Runner]:
    """One runner per registered backend, in the registry's order (new backends appear by themselves),
    then ``auto``."""
    return {**{name: _ours(name) for name in backends.BACKENDS}, "auto": _auto()}


# --------------------------------------------------------------------------------------- dense

def _dense_reason(case, inputs):
    return None


def _dense_build(case):
    """What a user writes without us: W from the kernel's dense formula, normalized, times v, with
    autograd. ``gaussian`` + ``row`` is ``softmax(scale·q kᵀ) @ v``; distance kernels form
    ρ = ‖q‖² + ‖k‖² − 2 q kᵀ; coincident pairs of ``fractional``/``log`` get weight 0."""
    params = _defaults(case)
    scale, kernel, normalize = params["scale"], case.kernel, case.normalize

    def fn(q, k, v, u):
        s = q @ k.transpose(-1, -2)
        if kernel == "gaussian" and normalize == "row":
            w = torch.softmax(scale * s, dim=-1)
        elif kernel in ("dot", "gaussian"):
            w = scale * s if kernel == "dot" else torch.exp(scale * s)
        else:
            norms = q.square().sum(-1)[..., :, None] + k.square().sum(-1)[..., None, :]
            rho = (norms - 2 * s).clamp_min(0)
            if kernel == "rbf":
                w = torch.exp(-scale * rho)
            else:
                coincident = rho <= nonlocal_ext.kernels.default_eps(q.dtype) * norms
                safe = torch.where(coincident, torch.ones_like(rho), rho)
                w = (scale * safe.pow(-0.5 * params["power"]) if kernel == "fractional"
                     else -scale * torch.log(safe) - params["gamma"])
                w = torch.where(coincident, torch.zeros_like(w), w)
        if normalize == "row" and kernel != "gaussian":
            w = w / w.sum(-1, keepdim=True)
        elif normalize == "sym":
            w = w / w.sum(-1, keepdim=True).sqrt() / w.sum(-2, keepdim=True).sqrt()
        elif normalize == "count":
            w = w / case.M
        out = w @ v
        if case.update == "diffusion":
            out = out - w.sum(-1, keepdim=True) * (u if u is not None else v)
        return out
    return fn


# ---------------------------------------------------------------------------------------- sdpa

def _diffusion(out, v, u, case):
    """``row`` diffusion is the aggregate minus u (rowsum(Â) = 1)."""
    return out - (u if u is not None else v) if case.update == "diffusion" else out


def _sdpa_reason(case, inputs):
    if case.kernel != "gaussian" or case.normalize != "row":
        return "sdpa computes softmax attention: gaussian + row only"
    return None


def _sdpa_build(case):
    scale = _defaults(case)["scale"]

    def fn(q, k, v, u):
        # (B, 1 head, N, D): torch's fused SDPA kernels take 4-d inputs only (3-d ones take the
        # dense math path); on CPU its flash kernel also needs D = C.
        out = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
                                                               scale=scale)
        return _diffusion(out.squeeze(1), v, u, case)
    return fn


#: SDPA with one kernel pinned (``torch.nn.attention.sdpa_kernel``): the peers of the GPU targets
#: (`make gpu-check`: "within 1.25× of SDPA with the flash backend"; beyond FlashAttention's head-dim
#: limit, the efficient and math kernels). A pinned kernel that cannot take a case (flash with float32 or
#: D > 256) raises, which is the row's error. Benchmarked on CUDA only (on CPU ``sdpa`` is the peer).
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_math": "MATH"}


def _pinned_sdpa_reason(case, inputs):
    if not case.device.startswith("cuda"):
        return "the pinned-kernel SDPA peers are benchmarked on CUDA only (sdpa is the CPU peer)"
    return _sdpa_reason(case, inputs)


def _pinned_sdpa(name):
    def build(case):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        unpinned = _sdpa_build(case)
        kernel = getattr(SDPBackend, SDPA_BACKENDS[name])

        def fn(q, k, v, u):
            with sdpa_kernel(kernel):
                return unpinned(q, k, v, u)
        return fn
    return Runner(name, "peer", _pinned_sdpa_reason, build)


# ---------------------------------------------------------------------------------------- flex

#: Devices FlexAttention is benchmarked on. On CPU it has no backward and is meant for
#: debugging (tests add "cpu" here to check the score functions with the eager fallback).
FLEX_DEVICES = ("cuda",)
_FLEX_KERNELS = ("gaussian", "rbf", "fractional")
_compiled_flex = None


def _flex_function(device: str):
    """flex_attention, compiled on CUDA (its eager form materializes the scores)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    if device != "cuda":
        return flex_attention
    if _compiled_flex is None:
        # one compilation per shape and score function; dynamo's default of 8 recompilations
        # would silently fall back to the eager (dense) form in the middle of a sweep
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _flex_reason(case, inputs):
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return "FlexAttention needs torch >= 2.5"
    if case.device not in FLEX_DEVICES:
        return f"flex is benchmarked on {', '.join(FLEX_DEVICES)} only"
    if case.kernel not in _FLEX_KERNELS or case.normalize != "row":
        return "flex expresses gaussian, rbf and fractional with row (a softmax of log-weights) only"
    if case.device == "cpu" and case.needs_backward:
        return "FlexAttention has no backward on CPU"
    return None


def _flex_build(case):
    """Row normalization is a softmax of log w, and log w is a score FlexAttention can compute.

    ``gaussian``: log w = scale·q·k (flex's own scale). ``rbf``: log w = −scale·ρ with
    ρ = ‖q‖² + ‖k‖² − 2 q·k; the ‖q‖² term is constant along a row and cancels in the softmax, so
    appending one column gives q̃·k̃ = scale·(2 q·k − ‖k‖²) with q̃ = [2·scale·q, −scale],
    k̃ = [k, ‖k‖²]. ``fractional``: q̃ = [−2q, ‖q‖², 1], k̃ = [k, 1, ‖k‖²] give q̃·k̃ = ρ, and the
    score function returns −(power/2)·log ρ (the constant log scale cancels), or −inf on
    coincident pairs, tested on detached norms (a mask needs no gradient).
    """
    params = _defaults(case)
    scale = params["scale"]
    flex = _flex_function(case.device)

    def attend(qt, kt, v, score_mod=None, flex_scale=1.0):
        pad = -qt.shape[-1] % 16  # zero columns change no q̃·k̃; the fused kernels want aligned head dims
        if pad:
            qt, kt = torch.nn.functional.pad(qt, (0, pad)), torch.nn.functional.pad(kt, (0, pad))
        out = flex(qt.unsqueeze(1), kt.unsqueeze(1), v.unsqueeze(1), score_mod=score_mod, scale=flex_scale)
        return out.squeeze(1)

    def fn(q, k, v, u):
        if case.kernel == "gaussian":
            out = attend(q, k, v, flex_scale=scale)
        else:
            qn, kn = q.square().sum(-1, keepdim=True), k.square().sum(-1, keepdim=True)
            if case.kernel == "rbf":
                out = attend(torch.cat([2 * scale * q, torch.full_like(qn, -scale)], -1),
                             torch.cat([k, kn], -1), v)
            else:
                eps = case.parameters()["eps"]
                half_power = 0.5 * params["power"]
                q_norms, k_norms = qn.detach().squeeze(-1), kn.detach().squeeze(-1)

                def log_weight(score, b, h, i, j):
                    rho = score.clamp_min(0)
                    coincident = rho <= eps * (q_norms[b, i] + k_norms[b, j])
                    return torch.where(coincident, -math.inf, -half_power * torch.log(rho.clamp_min(1e-30)))
                out = attend(torch.cat([-2 * q, qn, torch.ones_like(qn)], -1),
                             torch.cat([k, torch.ones_like(kn), kn], -1), v, score_mod=log_weight)
        return _diffusion(out, v, u, case)
    return fn


# --------------------------------------------------------------------------------------- keops

_KEOPS_KERNELS = ("gaussian", "rbf")


def _keops_reason(case, inputs):
    if importlib.util.find_spec("pykeops") is None:
        return "pykeops is not installed"
    if case.kernel not in _KEOPS_KERNELS or case.normalize not in ("none", "count", "row"):
        return "keops runner expresses gaussian and rbf with none, count or row only"
    return None


def _keops_build(case):
    """Symbolic reductions over j: Σ_j w_ij v_j and Σ_j w_ij, never forming W.

    ``gaussian`` + ``row`` uses KeOps' own stabilized ``sumsoftmaxweight``.
    """
    from pykeops.torch import LazyTensor

    scale = _defaults(case)["scale"]

    def fn(q, k, v, u):
        q_i, k_j, v_j = LazyTensor(q[:, :, None, :]), LazyTensor(k[:, None, :, :]), LazyTensor(v[:, None, :, :])
        if case.kernel == "gaussian":
            log_w = (q_i | k_j) * scale
            if case.normalize == "row":
                return _diffusion(log_w.sumsoftmaxweight(v_j, axis=2), v, u, case)
            w = log_w.exp()
        else:
            w = (-scale * q_i.sqdist(k_j)).exp()
        out = (w * v_j).sum(axis=2)
        if case.normalize == "row":
            sums = w.sum(axis=2)
            out = out / torch.where(sums == 0, torch.ones_like(sums), sums)
        elif case.normalize == "count":
            out = out / case.M
        if case.update == "diffusion":
            rowsum = {"none": w.sum(axis=2), "count": w.sum(axis=2) / case.M}.get(case.normalize, 1.0)
            out = out - rowsum * (u if u is not None else v)
        return out
    return fn


#: The peers, in table order. Tests may add runners here (e.g. a deliberately wrong one).
PEERS: dict[str, Runner] = {
    "dense": Runner("dense", "peer", _dense_reason, _dense_build, dense_temporaries=8),
    "sdpa": Runner("sdpa", "peer", _sdpa_reason, _sdpa_build),
    **{name: _pinned_sdpa(name) for name in SDPA_BACKENDS},
    "flex": Runner("flex", "peer", _flex_reason, _flex_build, warmup=3),
    "keops": Runner("keops", "peer", _keops_reason, _keops_build, warmup=2),
}


def all_runners() -> dict[str, Runner]:
    """Our backends, then the peers."""
    return {**our_runners(), **PEERS}
