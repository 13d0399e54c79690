"""The cases of the Triton kernels' tests, shared by the interpreter suite (tests/triton_suite.py, CPU
tensors under TRITON_INTERPRET=1) and the native CUDA tests (tests/test_cuda.py): one list, two devices.
"""

from __future__ import annotations

import torch

from common import combo_id, square_only


def case_id(combo, shape, dtype) -> str:
    return f"{combo_id(combo)}-{'x'.join(map(str, shape[1:]))}-{str(dtype)[6:]}"


def every_combination_shape(combo):
    """33 rows = 2 tiles of 32 (the interpreter's): 33 × 33 for the square-only combinations, else 33 queries
    against 17 keys; D = 5, C = 3."""
    n, m = (33, 33) if square_only(combo) else (33, 17)
    return ((), n, m, 5, 3)


# Odd sizes (N ∈ {1, 67, 130}, M ∈ {1, 33, 130}, D ∈ {5, 200}, C ∈ {3, 300}), a covering subset: each size,
# each affinity kernel, normalization, update and symmetric at least once. C = 300 is masked in one 512-wide
# forward value tile; D = 200 and C = 300 span 2 and 3 backward output tiles of 128 (the second grid axis);
# the GEMM slices of 64 have tails. N = 130 runs on non-contiguous inputs.
ODD_CASES = [
    (("gaussian", "row", "aggregate", False, False), ((), 67, 33, 200, 3), torch.float32),
    (("fractional", "sym", "diffusion", False, True), ((), 130, 1, 5, 300), torch.float32),
    (("rbf", "count", "aggregate", False, False), ((2,), 1, 130, 5, 3), torch.float64),
    (("log", "none", "diffusion", True, False), ((), 1, 1, 200, 3), torch.float64),
    (("log", "sym", "diffusion", True, False), ((), 130, 130, 5, 3), torch.float32),
    (("gaussian", "sym", "diffusion", True, True), ((), 67, 67, 5, 3), torch.float32),
    (("rbf", "row", "diffusion", False, True), ((), 130, 33, 5, 3), torch.float32),
    (("fractional", "none", "aggregate", True, False), ((), 67, 67, 5, 3), torch.float32),
]

#: D = 64, C = 128: the EVEN_D / EVEN_C path (loads without a feature mask).
EVEN_FEATURE_COMBOS = [("rbf", "row", "diffusion", False, True), ("gaussian", "sym", "aggregate", True, False)]


def even_feature_shape(combo):
    n, m = (67, 67) if square_only(combo) else (67, 33)
    return ((), n, m, 64, 128)


FLOAT16_COMBOS = [("gaussian", "row", "aggregate", False, False),
                  ("gaussian", "sym", "diffusion", True, True),
                  ("rbf", "row", "diffusion", False, True),
                  ("fractional", "none", "aggregate", False, False),
                  ("log", "count", "diffusion", True, False)]

BFLOAT16_COMBOS = [("gaussian", "row", "aggregate", False, False),
                   ("gaussian", "sym", "diffusion", True, True),
                   ("rbf", "sym", "diffusion", False, True),
                   ("fractional", "row", "diffusion", False, False),
                   ("log", "none", "diffusion", True, False)]


def half_shape(combo, dtype):
    """float16: (2, 67, 67 | 33, 5, 3); bfloat16: D = 200, C = 130 mask the feature tails (non-contiguous)."""
    n, m = (67, 67) if square_only(combo) else (67, 33)
    return ((2,), n, m, 5, 3) if dtype == torch.float16 else ((2,), n, m, 200, 130)


# Wide feature dimensions: D, C ∈ {256, 512, 1024}.
WIDE_CASES = [
    (("gaussian", "row", "aggregate", False, False), ((), 37, 19, 256, 256), torch.float32),
    (("fractional", "sym", "diffusion", True, False), ((), 21, 21, 512, 300), torch.float32),
    (("rbf", "count", "diffusion", False, True), ((), 19, 37, 1000, 1024), torch.float32),
    (("log", "row", "aggregate", False, False), ((2,), 19, 17, 1024, 700), torch.float16),
]
