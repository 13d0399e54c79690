"""Numerics shared by the backends (the PyTorch ones and the Triton launchers)."""

from __future__ import annotations

import torch


def safe_inverse_power(sums: torch.Tensor, exponent: float) -> torch.Tensor:
    """``sums ** -exponent`` with a zero sum mapped to 0 (safe divide).

    A row (column) whose affinities sum to exactly 0 normalizes to a zero row (column),
    as the thesis' safe divide does for coincident points. Written so that autograd
    never forms ``inf · 0`` at the zero entries.
    """
    zero = sums == 0
    safe = torch.where(zero, torch.ones_like(sums), sums)
    return torch.where(zero, torch.zeros_like(sums), safe.pow(-exponent))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are accumulated in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
