"""Test setup: without a GPU the Triton kernels run on CPU tensors in Triton's interpreter.

TRITON_INTERPRET must be set before ``flood_kernels`` (and so its ``@triton.jit`` kernels) is imported.

Tests draw from torch's global generator, whose default seed makes a run's values depend on the order the tests
run in. ``FLOOD_KERNELS_TORCH_SEED=<int>`` (or ``random``) seeds it before every test from that base and the
test's id instead: fresh draws for every test, to find a test whose premise holds only for some draws (a failing
test's captured setup output shows its seed).
"""

import hashlib
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_SEED_BASE = os.environ.get("FLOOD_KERNELS_TORCH_SEED")
if _SEED_BASE == "random":
    _SEED_BASE = str(random.SystemRandom().randrange(2**31))


@pytest.fixture(autouse=True)
def _reseeded_torch(request):
    if _SEED_BASE is not None:
        seed = int(hashlib.sha256(f"{_SEED_BASE}/{request.node.nodeid}".encode()).hexdigest()[:8], 16)
        torch.manual_seed(seed)
        print(f"torch.manual_seed({seed}) from FLOOD_KERNELS_TORCH_SEED={_SEED_BASE}")
    yield
