"""flood_kernels: fused cross-entropy with flooding for PyTorch."""

from .backends import available_backends, empty_cpu_cache
from .functional import flooded_cross_entropy
from .linear import LinearFloodedCrossEntropyLoss, linear_flooded_cross_entropy
from .modules import FloodedCrossEntropyLoss

__all__ = [
    "available_backends",
    "empty_cpu_cache",
    "flooded_cross_entropy",
    "FloodedCrossEntropyLoss",
    "linear_flooded_cross_entropy",
    "LinearFloodedCrossEntropyLoss",
]
__version__ = "0.1.0"
