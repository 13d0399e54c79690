"""The backends, and the one place that chooses among them.

Each backend is a module with the same small interface:

* ``NAME``: its ``backend=`` name;
* ``unsupported_reason(spec, query) -> str | None``: why it cannot run this call (None: it can);
* ``aggregate(query, key, value, self_value, spec) -> Tensor``: inputs flattened to one batch
  dim, ``(B, N, D)``, ``(B, M, D)``, ``(B, M, C)``, ``(B, N, C)`` or None; differentiable.
"""

from __future__ import annotations

import math

import torch

from . import chunked, cost, cpu, cuda_choice, linear, reference, triton

BACKENDS = {b.NAME: b for b in (reference, chunked, linear, cpu, triton)}


def available(spec, query) -> list[str]:
    """Names of the backends that can run this call."""
    return [name for name, b in BACKENDS.items() if b.unsupported_reason(spec, query) is None]


#: Without fused kernels for the device, ``auto`` uses the dense reference up to this many
#: affinities B·N·M and ``chunked`` above (bench/NOTES.md: chunked at 0.49–0.96× of dense at
#: N = M = 1024, mixed at 2048, ``chunked`` ahead from 4096); its N×M temporaries stay small.
DENSE_MAX_ELEMENTS = 1 << 21

#: Bytes the dense path's N×M temporaries may take when ``auto`` prefers it to the fused kernels
#: (it holds up to DENSE_TEMPORARIES matrices of B·N·M elements with autograd).
DENSE_MEMORY_BUDGET = 1 << 30
DENSE_TEMPORARIES = 8


def select(name: str, spec, query, key, value=None, backward: bool = False):
    """The backend module for ``backend=name``.

    ``auto``: ``kernel="dot"`` always takes the exact linear-time path. On CUDA every other kernel
    goes to the work model's per-call decision (``cuda_choice``: fused, dense within a memory
    budget, or SDPA). On CPU, where the fused ``cpu`` kernels are available, the choice between
    them and the dense ``reference`` follows :mod:`.cost` (``backward``: whether a backward will
    run), the dense path only while its N×M temporaries fit DENSE_MEMORY_BUDGET. Without fused
    kernels: the dense ``reference`` for small problems (B·N·M ≤ DENSE_MAX_ELEMENTS), ``chunked``
    for the rest. A backend asked for by name is used or refused with the reason and the list of
    what is available, never silently replaced.
    """
    if name == "auto":
        if spec.kernel.name == "dot":
            return linear
        if query.device.type == "cuda":  # the work model decides per call (cuda_choice.decide)
            return cuda_choice.AUTO
        d = query.shape[-1]
        m = key.shape[-2]
        c = d if value is None else value.shape[-1]
        affinities = math.prod(query.shape[:-1]) * m  # B·N·M
        if cpu.unsupported_reason(spec, query) is None:
            dense_bytes = DENSE_TEMPORARIES * affinities * 4 * (2 if query.dtype == torch.float64 else 1)
            if dense_bytes <= DENSE_MEMORY_BUDGET and cost.prefer_dense(
                    affinities, m, d, c, spec.kernel.name, spec.normalize, backward):
                return reference
            return cpu
        return reference if affinities <= DENSE_MAX_ELEMENTS else chunked
    backend = BACKENDS[name]
    reason = backend.unsupported_reason(spec, query)
    if reason is not None:
        raise ValueError(f"{reason}; backends available for these inputs: {', '.join(available(spec, query))}")
    return backend
