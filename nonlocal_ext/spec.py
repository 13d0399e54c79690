"""Argument validation for :func:`nonlocal_ext.nonlocal_aggregate`, and the validated spec.

Every error about the arguments themselves is raised here, before any backend runs, as a
``TypeError`` (wrong kind of argument) or ``ValueError`` (wrong value or shape) whose message
names the argument. (A backend that cannot run the call is refused by ``backends.select``.)

``normalize="sym"`` needs non-negative row and column sums: ``r^(−½)`` of a negative sum is
undefined (NaN). The policy, by the sign the kernel's weights can take
(:meth:`~nonlocal_ext.kernels.AffinityKernel.weight_sign`):

* never negative (``gaussian``, ``rbf``, ``fractional`` with ``scale >= 0``): always defined;
* never positive (``fractional`` with ``scale < 0``): NaN by construction, refused here;
* either sign (``dot``, ``log``): defined exactly when the data give non-negative sums (``dot`` on
  non-negative query and key, e.g. ReLU embeddings; ``log`` when the pairs are closer than
  ``exp(−gamma/scale)``). The sums exist only inside the backends, so :func:`check_sym_sums`
  looks at the result instead: a NaN output from finite inputs is a ``ValueError`` saying why.
  That costs one reduction and one host synchronization per call; it is skipped where values do
  not exist or cannot be read (meta and fake tensors, ``torch.compile`` tracing, ``torch.func``
  transforms such as vmap, CUDA graph capture), where a negative sum gives NaN in the rows (a row sum) or everywhere (a column sum).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import KERNELS, AffinityKernel, KernelParams, resolve_params, type_name, values_readable

NORMALIZATIONS = ("none", "count", "row", "sym")
UPDATES = ("aggregate", "diffusion")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AggregateSpec:
    """Everything about one call except the tensors."""

    kernel: AffinityKernel
    params: KernelParams
    normalize: str
    update: str
    symmetric: bool

    @property
    def diffusion(self) -> bool:
        return self.update == "diffusion"


def _check_choice(name, value, choices):
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {', '.join(map(repr, choices))}; got {type_name(value)}")
    if value not in choices:
        raise ValueError(f"unknown {name}={value!r}; expected one of {', '.join(map(repr, choices))}")


def validate(query, key, value, kernel, *, scale, power, gamma, eps, normalize, update, symmetric,
             self_value, backend) -> AggregateSpec:
    """Check every argument of ``nonlocal_aggregate``; return the spec of the call."""
    named = [("query", query), ("key", key), ("value", value)]
    if self_value is not None:
        named.append(("self_value", self_value))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type_name(t)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                            f"got {t.dtype}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., positions, features), "
                             f"got shape {tuple(t.shape)}")
    for name, t in named[1:]:
        if t.dtype != query.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but query has {query.dtype}: all inputs must share one dtype")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}: all inputs must share one device")
        if t.shape[:-2] != query.shape[:-2]:
            raise ValueError(f"{name} has batch dims {tuple(t.shape[:-2])} but query has {tuple(query.shape[:-2])}: "
                             "the leading batch dims must be equal")

    n, d = query.shape[-2:]
    m = key.shape[-2]
    if key.shape[-1] != d:
        raise ValueError(f"key has {key.shape[-1]} features but query has {d}: expected key of shape (..., M, {d})")
    if value.shape[-2] != m:
        raise ValueError(f"value has {value.shape[-2]} positions but key has {m}: expected value of shape (..., {m}, C)")

    _check_choice("kernel", kernel, tuple(KERNELS))
    _check_choice("normalize", normalize, NORMALIZATIONS)
    _check_choice("update", update, UPDATES)
    from .backends import BACKENDS  # the registry of backends (imported here: the backends import this module)
    _check_choice("backend", backend, ("auto", *BACKENDS))
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type_name(symmetric)}")
    affinity = KERNELS[kernel]
    params = resolve_params(affinity, query.dtype, scale=scale, power=power, gamma=gamma, eps=eps)

    if normalize == "sym" and affinity.weight_sign(params) == "nonpositive":
        raise ValueError(f"normalize='sym' with kernel={kernel!r} and scale={params.scale}: every weight is <= 0, so "
                         "the row and column sums are negative and D^(-1/2) is undefined; use scale > 0 or "
                         "normalize='row', 'count' or 'none'")
    if symmetric and n != m:
        raise ValueError(f"symmetric=True needs as many queries as keys, got N={n} and M={m}")
    if self_value is not None:
        if update != "diffusion":
            raise ValueError("self_value is only used by update='diffusion'")
        if self_value.shape[-2:] != (n, value.shape[-1]):
            raise ValueError(f"self_value must have shape (..., N={n}, C={value.shape[-1]}), "
                             f"got {tuple(self_value.shape)}")
    elif update == "diffusion" and n != m:
        raise ValueError(f"update='diffusion' without self_value uses value as self_value, which needs N == M; "
                         f"got N={n}, M={m} (pass self_value of shape (..., {n}, C))")
    if m == 0 and n > 0 and normalize != "none":
        raise ValueError(f"key has no positions (M = 0): normalize={normalize!r} is undefined")
    return AggregateSpec(affinity, params, normalize, update, symmetric)


def check_sym_sums(spec: AggregateSpec, inputs, out: torch.Tensor) -> None:
    """The ``sym`` policy for kernels whose weights can take either sign (see the module docstring).

    Raises a ValueError when the output is NaN although every input is finite: a row or column
    sum of the affinities was negative. NaN or Inf inputs propagate to the output by design and
    are not an error.
    """
    if spec.normalize != "sym" or spec.kernel.weight_sign(spec.params) != "any" or not values_readable(out):
        return
    if not torch.isnan(out).any():
        return
    if not all(torch.isfinite(t).all() for t in inputs if t is not None):
        return
    kernel = spec.kernel
    raise ValueError(
        f"normalize='sym' with kernel={kernel.name!r}: a row or column sum of the affinities is negative, where "
        f"D^(-1/2) is undefined (the result would be NaN). {kernel.name} weights are negative "
        f"{kernel.negative_where}; keep the sums non-negative by {kernel.nonnegative_sums_by}, or use "
        f"normalize='row', 'count' or 'none'")
