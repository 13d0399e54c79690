"""``backend="cpu"``: the fused C++ kernels of ``csrc/`` (registered as ``torch.ops.nonlocal_ext``).

The op schemas are registered by the extension; the CPU kernels behind them are not written
yet, so this backend reports itself unavailable with the reason.
"""

from __future__ import annotations

from .._extension import require_extension

NAME = "cpu"


def unsupported_reason(spec, query) -> str | None:
    try:
        require_extension("backend='cpu'")
    except RuntimeError as error:
        return str(error)
    if query.device.type != "cpu":
        return f"backend='cpu' runs on CPU tensors, got a tensor on {query.device}"
    return "backend='cpu': the fused C++ CPU kernels are not implemented in this version"


def aggregate(query, key, value, self_value, spec):  # pragma: no cover - unreachable until implemented
    raise NotImplementedError(unsupported_reason(spec, query))
