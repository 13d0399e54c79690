"""The backends, and the one place that chooses among them.

Each backend is a module with the same small interface:

* ``NAME``: its ``backend=`` name;
* ``unsupported_reason(spec, query) -> str | None``: why it cannot run this call (None: it can);
* ``aggregate(query, key, value, self_value, spec) -> Tensor``: inputs flattened to one batch
  dim, ``(B, N, D)``, ``(B, M, D)``, ``(B, M, C)``, ``(B, N, C)`` or None; differentiable.
"""

from __future__ import annotations

import math

from . import chunked, cpu, cuda_choice, linear, reference, triton

BACKENDS = {b.NAME: b for b in (reference, chunked, linear, cpu, triton)}


def available(spec, query) -> list[str]:
    """Names of the backends that can run this call."""
    return [name for name, b in BACKENDS.items() if b.unsupported_reason(spec, query) is None]


#: ``auto`` uses the dense reference up to this many affinities B·N·M: below it the dense
#: computation is faster than ``chunked`` on CPU (bench/NOTES.md: chunked at 0.49–0.96× of it at
#: N = M = 1024, mixed at 2048, ``chunked`` ahead from 4096) and its N×M temporaries are small.
DENSE_MAX_ELEMENTS = 1 << 21


#: ``auto`` keeps ``gaussian`` on the dense reference below this many affinities B·N·M even when
#: the fused ``cpu`` kernels are available: there one softmax of MKL GEMMs beats the fused
#: kernel's fixed cost per call (bench/NOTES.md: cpu at 0.64–0.94× of dense for N = M ≤ 512,
#: ahead from 1024 on). The other kernels always take ``cpu``: their forward is faster fused at every
#: size measured (N ≥ 8); forward+backward trails dense by 5–20% below N ≈ 1024 (README, Backends).
SMALL_GAUSSIAN_DENSE_MAX = 1 << 19


def select(name: str, spec, query, key):
    """The backend module for ``backend=name``.

    ``auto``: ``kernel="dot"`` always takes the exact linear-time path; on CUDA every other kernel
    goes to the work model's per-call decision (``cuda_choice``: fused, dense within a memory
    budget, or SDPA); on CPU it takes the fused backend of the device (``cpu``) when it is
    available (except small ``gaussian`` problems on CPU: dense, see SMALL_GAUSSIAN_DENSE_MAX),
    else the dense ``reference`` for small problems (B·N·M ≤ DENSE_MAX_ELEMENTS) and
    ``chunked`` for the rest. A backend asked for by name is used or refused with the reason
    and the list of what is available, never silently replaced.
    """
    if name == "auto":
        if spec.kernel.name == "dot":
            return linear
        if query.device.type == "cuda":  # the work model decides per call (cuda_choice.decide)
            return cuda_choice.AUTO
        affinities = math.prod(query.shape[:-1]) * key.shape[-2]  # B·N·M
        fused = triton if query.device.type == "cuda" else cpu
        if fused.unsupported_reason(spec, query) is None:
            if fused is cpu and spec.kernel.name == "gaussian" and affinities <= SMALL_GAUSSIAN_DENSE_MAX:
                return reference
            return fused
        return reference if affinities <= DENSE_MAX_ELEMENTS else chunked
    backend = BACKENDS[name]
    reason = backend.unsupported_reason(spec, query)
    if reason is not None:
        raise ValueError(f"{reason}; backends available for these inputs: {', '.join(available(spec, query))}")
    return backend
