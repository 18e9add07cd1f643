"""Test setup: without a GPU the Triton kernels run on CPU tensors in Triton's interpreter.

TRITON_INTERPRET must be set before ``flood_kernels`` (and so its ``@triton.jit`` kernels) is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
