"""Let the pinned torchvision import on a CPU-only torch, so that timm (which imports it) runs.

torchvision 0.28.0 is the release paired with our torch 2.13.0, but the registry's wheel is a CUDA
build: its compiled operators (``_C.so``: nms, roi_align, deform_conv2d …) link against
``libtorch_cuda``/``libc10_cuda`` and cannot load against the CPU torch, and torchvision's
``import`` then fails while registering fake/meta kernels for operators that were never declared
(``RuntimeError: operator torchvision::nms does not exist``). A registry torchvision built for
another torch replaces ours with a multi-GB CUDA build, and no CPU torchvision wheel is available.

:func:`declare_missing_ops` declares those operators' schemas (torchvision's public signatures),
with no kernels, only when ``_C.so`` cannot be loaded. Everything else is the installed package's
own code: torchvision's Python (``torchvision.ops.misc.FrozenBatchNorm2d`` and the rest that
timm imports) and all of timm. Calling one of the declared operators raises torch's "no kernel
for the CPU backend" error; neither timm's ``NonLocalAttn`` nor its ResNet uses them.
"""

from __future__ import annotations

import importlib.util
import os

import torch

SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
    "SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, "
    "SymInt groups, SymInt offset_groups, bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
_LIBRARY = None


def declare_missing_ops() -> bool:
    """Declare torchvision's operators if its ``_C.so`` cannot be loaded; True if it declared them.

    Call before the first ``import torchvision`` (or timm). Does nothing when torchvision is not
    installed, already imported, or its compiled operators load.
    """
    global _LIBRARY
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _LIBRARY is not None or hasattr(torch.ops.torchvision, "nms"):
        return False
    compiled = os.path.join(spec.submodule_search_locations[0], "_C.so")
    try:
        torch.ops.load_library(compiled)
        return False
    except OSError:
        pass
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS:
        _LIBRARY.define(schema)
    return True
