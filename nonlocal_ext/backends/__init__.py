"""The backends, and the one place that chooses among them.

Each backend is a module with the same small interface:

* ``NAME``: its ``backend=`` name;
* ``unsupported_reason(spec, query) -> str | None``: why it cannot run this call (None: it can);
* ``aggregate(query, key, value, self_value, spec) -> Tensor``: inputs flattened to one batch
  dim, ``(B, N, D)``, ``(B, M, D)``, ``(B, M, C)``, ``(B, N, C)`` or None; differentiable.
"""

from __future__ import annotations

from . import chunked, cpu, linear, reference, triton

BACKENDS = {b.NAME: b for b in (reference, chunked, linear, cpu, triton)}


def available(spec, query) -> list[str]:
    """Names of the backends that can run this call."""
    return [name for name, b in BACKENDS.items() if b.unsupported_reason(spec, query) is None]


def select(name: str, spec, query):
    """The backend module for ``backend=name``.

    ``auto``: ``kernel="dot"`` always takes the exact linear-time path; every other kernel
    takes the first available of the fused backends for the device (``triton`` on CUDA,
    ``cpu`` on CPU), else ``chunked``. A backend asked for by name is used or refused with
    the reason and the list of what is available, never silently replaced.
    """
    if name == "auto":
        if spec.kernel.name == "dot":
            return linear
        fused = triton if query.device.type == "cuda" else cpu
        return fused if fused.unsupported_reason(spec, query) is None else chunked
    backend = BACKENDS[name]
    reason = backend.unsupported_reason(spec, query)
    if reason is not None:
        raise ValueError(f"{reason}; backends available for these inputs: {', '.join(available(spec, query))}")
    return backend
