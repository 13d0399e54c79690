"""What the test suite and ``nonlocal-bench --check`` share (like ``torch.testing``).

* :data:`TOLERANCE` and :func:`error_and_bound`: the one error rule — against the float64 truth,
  ``err(ours) ≤ 2·err(plain computation in the same dtype) + TOLERANCE[dtype]·max(max|truth|, floor)``
  (flash-attention's test rule);
* :data:`KERNEL_PARAMS`: kernel parameters that keep each kernel well conditioned on the inputs of
  :func:`make_inputs`;
* :func:`make_inputs`: seeded query, key, value (and self_value) with unit-scale rows.

Nothing here is imported by the op itself.
"""

from __future__ import annotations

import torch

from .kernels import KERNELS

#: The tolerance of the error rule per dtype (see the module docstring and :func:`error_and_bound`).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def error_and_bound(ours, plain, truth, dtype, floor=0.0) -> tuple[float, float, float, float]:
    """``(err, bound, err_plain, scale)`` of the rule for one tensor: ``err`` of ``ours`` and
    ``err_plain`` of the plain computation in ``dtype``, both against the float64 ``truth``;
    ``scale = max(max|truth|, floor)``; ``bound = 2·err_plain + TOLERANCE[dtype]·scale``. A plain
    computation that overflowed (NaN error) counts as 0: ``ours`` is then judged against the table alone."""
    truth = truth.double()
    err = (ours.double() - truth).abs().max().item() if truth.numel() else 0.0
    err_plain = (plain.double() - truth).abs().max().item() if truth.numel() else 0.0
    if err_plain != err_plain:
        err_plain = 0.0
    scale = max(truth.abs().max().item() if truth.numel() else 0.0, floor)
    return err, 2 * err_plain + TOLERANCE[dtype] * scale, err_plain, scale


#: Parameters that keep each kernel well conditioned on the inputs of :func:`make_inputs`:
#: q, k have unit-scale rows, so q·k and ‖q−k‖² are O(1). The benchmark's defaults and the tests'.
KERNEL_PARAMS = {
    "dot": {},
    "gaussian": {},
    "rbf": {"scale": 0.5},
    "fractional": {"power": 1.5},
    "log": {"gamma": -3.0},  # ρ < e³ keeps log weights positive, so row sums stay away from 0
}


def make_inputs(kernel, normalize, batch, n, m, d, c, *, with_self_value, dtype=torch.float64, device="cpu",
                seed=0, coincident=True, noncontiguous=False, draw_dtype=torch.float64):
    """``[query (*batch, n, d), key (*batch, m, d), value (*batch, m, c), self_value (*batch, n, c) or None]``
    in ``dtype`` on ``device``, scaled so the pair variable is O(1).

    Drawn on CPU from a generator seeded with ``seed``, in ``draw_dtype`` (the tests draw in float64,
    the benchmark in float32; the two give different numbers), then cast, so every device and dtype
    sees the same numbers (rounded). Rows of q and k have unit expected norm (``randn / √d``);
    ``dot`` with ``row``/``sym`` gets positive data so the normalizer sums cannot vanish.
    ``coincident``: distance kernels with a singularity get coincident pairs (key rows copied from
    query rows). ``noncontiguous``: the tensors are transposed copies (feature stride ≠ 1).
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*batch, *shape, generator=g, dtype=draw_dtype)

    q = randn(n, d) / max(d, 1) ** 0.5
    k = randn(m, d) / max(d, 1) ** 0.5
    if kernel == "dot" and normalize in ("row", "sym"):
        q, k = q.abs() + 0.1, k.abs() + 0.1
    if coincident and KERNELS[kernel].masks_coincident and n and m:
        k[..., 0, :] = q[..., -1, :]
        if n > 2 and m > 2:
            k[..., m // 2, :] = q[..., n // 2, :]
    v = randn(m, c)
    u = randn(n, c) if with_self_value else None
    tensors = [q, k, v, u]
    if noncontiguous:
        tensors = [None if t is None else t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in tensors]
    return [None if t is None else t.to(device=device, dtype=dtype) for t in tensors]
