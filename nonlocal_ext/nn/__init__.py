"""Drop-in nonlocal layers built on :func:`nonlocal_ext.nonlocal_aggregate`.

Every layer takes ``(B, C, *spatial)`` and returns the same shape; it computes its affinities only
through the op (so every backend serves it, chosen by its ``backend=`` argument) and never forms
an N×N tensor.

* :class:`NonLocal1d`, :class:`NonLocal2d`, :class:`NonLocal3d`: Wang et al. 2018, modes
  ``gaussian``, ``embedded_gaussian``, ``dot_product``, ``concatenation``.
* :class:`NonLocalStage`: units sharing one affinity (Tao et al., “Nonlocal Neural Networks, Nonlocal Diffusion
  and Nonlocal Modeling”, NeurIPS 2018; in the form of “A Spectral Nonlocal Block for Neural Networks”, Eq. 3).
* :class:`SpectralNonLocal`: SNL (“A Spectral Nonlocal Block for Neural Networks”, Eq. 9) and gSNL (Eq. 11).
* :func:`convert`, :func:`replace_nonlocal`, :func:`convert_state_dict`: the nonlocal blocks of
  mmcv, SlowFast/PyTorchVideo, timm and AlexHex7 as ``NonLocal1d/2d/3d`` (module, model, checkpoint).
* :class:`PIDENonLocal`: nonlocal diffusion, fractional Laplacian and inverse fractional
  Laplacian blocks (Kannan, “Deep Neural Networks and PIDE discretizations”, Eq. 4.1–4.8).
"""

from .conversion import LAYOUTS, convert, convert_state_dict, replace_nonlocal
from .nonlocal_block import MODES, NonLocal1d, NonLocal2d, NonLocal3d, concat_relu_aggregate
from .pide import OPERATORS, PIDENonLocal, c_n, c_n_minus_s, c_ns
from .spectral import SpectralNonLocal
from .stage import NonLocalStage

__all__ = ["LAYOUTS", "MODES", "OPERATORS", "NonLocal1d", "NonLocal2d", "NonLocal3d", "NonLocalStage", "PIDENonLocal",
           "SpectralNonLocal", "c_n", "c_n_minus_s", "c_ns", "concat_relu_aggregate", "convert", "convert_state_dict",
           "replace_nonlocal"]
