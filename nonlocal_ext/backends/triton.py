"""``backend="triton"``: fused Triton kernels for CUDA tensors (``nonlocal_ext.triton_kernels``).

Not implemented in this version: the backend reports itself unavailable with the reason.
"""

from __future__ import annotations

NAME = "triton"


def unsupported_reason(spec, query) -> str | None:
    return "backend='triton': the fused Triton kernels are not implemented in this version"


def aggregate(query, key, value, self_value, spec):  # pragma: no cover - unreachable until implemented
    raise NotImplementedError(unsupported_reason(spec, query))
