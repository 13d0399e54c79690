"""nonlocal_ext: fused, memory-efficient nonlocal operators for PyTorch.

``nonlocal_aggregate`` is the op; :mod:`nonlocal_ext.kernels` defines the affinity kernels;
:mod:`nonlocal_ext.nn` holds the drop-in nonlocal layers.
"""

from . import kernels, nn
from .kernels import KERNELS
from .ops import nonlocal_aggregate

__all__ = ["KERNELS", "kernels", "nn", "nonlocal_aggregate"]
__version__ = "0.1.0"
