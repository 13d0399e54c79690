"""``backend="auto"`` on CUDA: fused Triton, dense reference or SDPA, whichever the work model predicts faster.

The decision (:func:`choose`) takes the call's shape and the predicted H100 times of
:mod:`nonlocal_ext.triton_kernels.work_model` (forward + backward when the inputs require grad, else the
forward) and returns the name of the path:

* ``"triton"``: the fused kernels (memory O((N + M)(D + C)));
* ``"reference"``: the dense path, only when its B·N·M buffers (``work_model.dense_bytes``) fit the
  memory budget: ``DENSE_BUDGET_FRACTION`` of the device's free memory (``torch.cuda.mem_get_info``),
  or the ``budget_bytes`` passed in;
* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` for ``gaussian`` + ``row`` without
  ``symmetric`` (with diffusion: SDPA − u, rows of a softmax sum to 1), where the model says its
  flash kernel applies and is faster.

A path that is unavailable (triton missing) is not considered; without the fused kernels and over the
budget, ``chunked``. Ties go to the fused path (the one whose memory does not grow with N·M).
``select("auto")`` returns :data:`AUTO` for CUDA inputs, which decides per call (:func:`decide`).
"""

from __future__ import annotations

import math

import torch

#: The dense path may use at most this fraction of the free device memory for its B·N·M buffers.
DENSE_BUDGET_FRACTION = 0.25

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def call_of(spec, query, key, value):
    """The work model's :class:`~nonlocal_ext.triton_kernels.work_model.Call` of these inputs."""
    from ..triton_kernels.work_model import Call
    return Call(math.prod(query.shape[:-2]), query.shape[-2], key.shape[-2], query.shape[-1], value.shape[-1],
                spec.kernel.name, spec.normalize, spec.update, spec.symmetric, _DTYPES.get(query.dtype, "fp32"))


def choose(call, training: bool, budget_bytes: float, fused_available: bool = True) -> str:
    """``"triton"``, ``"reference"``, ``"sdpa"`` or ``"chunked"`` for a work-model call (see the module
    docstring); ``chunked`` only when neither the fused kernels nor a dense path within the budget is there."""
    from ..triton_kernels import work_model
    times = work_model.predictions(call, training)
    candidates = {}
    if fused_available:
        candidates["triton"] = times["fused"]
    if work_model.dense_bytes(call, training) <= budget_bytes:
        candidates["reference"] = times["dense"]
    if times["sdpa"] is not None:
        candidates["sdpa"] = times["sdpa"]
    if not candidates:  # no fused kernels and the dense buffers over the budget: bounded memory, slowly
        return "chunked"
    order = ["triton", "sdpa", "reference"]  # ties: the path with the smallest memory first
    return min(candidates, key=lambda name: (candidates[name], order.index(name)))


def budget(device) -> float:
    """``DENSE_BUDGET_FRACTION`` of the free memory of a CUDA ``device``."""
    free, _total = torch.cuda.mem_get_info(device)
    return DENSE_BUDGET_FRACTION * free


def decide(spec, query, key, value) -> str:
    """The path for a CUDA call: ``"triton"``, ``"reference"``, ``"sdpa"``, or ``"chunked"`` when the
    fused kernels are unavailable and the dense buffers exceed the budget."""
    from . import triton
    fused_available = triton.unsupported_reason(spec, query) is None
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    call = call_of(spec, query, key, value)
    limit = budget(query.device)
    choice = choose(call, training, limit, fused_available)
    if choice == "sdpa" and not expresses(spec):  # never taken: sdpa_applies ⊂ expresses (tested)
        raise AssertionError(f"the work model predicted SDPA for {spec}, which SDPA does not compute")
    return choice


class _Sdpa:
    """The SDPA path: a backend-like object (``NAME``, ``aggregate``) used only by ``auto``."""

    NAME = "sdpa"

    @staticmethod
    def aggregate(query, key, value, self_value, spec):
        """``(B, N, D)``, ``(B, M, D)``, ``(B, M, C)`` -> ``(B, N, C)``: softmax(scale·q kᵀ) v (− u)."""
        if not expresses(spec):
            raise ValueError("the SDPA path computes gaussian + row without symmetric only")
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=spec.params.scale)
        if spec.diffusion:
            out = out - (value if self_value is None else self_value)
        return out


class _CudaAuto:
    """What ``select("auto")`` returns for CUDA inputs: decides per call (it needs the value's width C,
    which ``select`` does not see) and runs the chosen backend."""

    NAME = "auto"

    @staticmethod
    def aggregate(query, key, value, self_value, spec):
        from . import chunked, reference, triton
        paths = {"triton": triton, "reference": reference, "chunked": chunked, "sdpa": SDPA}
        return paths[decide(spec, query, key, value)].aggregate(query, key, value, self_value, spec)


SDPA = _Sdpa()
AUTO = _CudaAuto()


def expresses(spec) -> bool:
    """Whether SDPA computes this spec exactly: softmax(scale·q kᵀ) v, minus u for diffusion."""
    return spec.kernel.name == "gaussian" and spec.normalize == "row" and not spec.symmetric
