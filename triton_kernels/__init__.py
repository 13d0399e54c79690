"""Triton kernels of nonlocal_ext, installed as ``nonlocal_ext.triton_kernels``.

(The folder is not a top-level ``triton_kernels`` package: that name is taken on PyPI.)
The fused forward and backward kernels are not written yet; ``backend="triton"`` says so.
"""
