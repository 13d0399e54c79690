"""Triton kernels of nonlocal_ext, installed as ``nonlocal_ext.triton_kernels``.

(The folder is not a top-level ``triton_kernels`` package: that name is taken on PyPI.)

* :mod:`.tiles`      per-tile maths: pair variable, affinity weight and slopes (``@triton.jit`` helpers);
* :mod:`.aggregate`  the fused kernels: ``forward_kernel`` and the backward passes ``backward_preprocess_kernel``,
                     ``backward_column_kernel``, ``backward_row_kernel`` (docs/backends.md);
* :mod:`.configs`    autotune lists for sm_80 / sm_90, tail-tile heuristics, interpreter tiles;
* :mod:`.launchers`  host launchers (layouts, statistics, grids), used by ``backend="triton"``.

Importing :mod:`.aggregate` creates the kernels; under ``TRITON_INTERPRET=1`` they are interpreted
(CPU tensors), so the variable must be set before the first import.
"""
