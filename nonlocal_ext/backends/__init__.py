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


#: On devices other than CPU and CUDA (no fused kernels, no cost model measured there) ``auto`` uses the
#: dense reference up to this many affinities B·N·M and ``chunked`` above; its N×M temporaries stay small.
DENSE_MAX_ELEMENTS = 1 << 21


def select(name: str, spec, query, key, value=None, backward: bool = False):
    """The backend module for ``backend=name``.

    ``auto`` on CUDA: ``kernel="dot"`` takes the exact linear-time path; every other kernel goes to
    the work model's per-call decision (``cuda_choice``: fused, dense within a memory budget, or
    SDPA). On CPU, :func:`.cost.choose` prices the candidates (``backward``: whether a backward will run;
    the fused kernels' speed on this CPU probed once per process, :func:`.cost.fused_speed_scale`) and the
    cheapest runs: the fused ``cpu`` kernels where they are built, the dense ``reference`` while
    its N×M temporaries fit the memory budget, ``chunked``, and for ``dot`` the linear path. Other devices:
    ``linear`` for ``dot``, else the ``reference`` for small problems (B·N·M ≤ DENSE_MAX_ELEMENTS) and
    ``chunked`` for the rest. A backend asked for by name is used or refused with the reason and the list
    of what is available, never silently replaced.
    """
    if name == "auto":
        dot = spec.kernel.name == "dot"
        if query.device.type == "cuda":  # the work model decides per call (cuda_choice.decide)
            return linear if dot else cuda_choice.AUTO
        d, m = query.shape[-1], key.shape[-2]
        c = d if value is None else value.shape[-1]
        n, batch = query.shape[-2], math.prod(query.shape[:-2])
        if query.device.type != "cpu":
            return linear if dot else reference if batch * n * m <= DENSE_MAX_ELEMENTS else chunked
        half, fused = reference.half_class(spec, query), cpu.unsupported_reason(spec, query) is None
        choice = cost.choose(batch, n, m, d, c, spec.kernel.name, spec.normalize, spec.symmetric, backward,
                             half, fused, query.element_size(),
                             half_ratio=cost.half_gemm_ratio(query.dtype) if half else None,
                             fused_scale=cost.fused_speed_scale() if fused else 1.0)
        return BACKENDS[choice]
    backend = BACKENDS[name]
    reason = backend.unsupported_reason(spec, query)
    if reason is not None:
        raise ValueError(f"{reason}; backends available for these inputs: {', '.join(available(spec, query))}")
    return backend
