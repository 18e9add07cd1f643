"""The C++ CPU backend recycles large gradient buffers (csrc/cpu/gradient_buffers.cpp): a recycled block
holds the previous gradient, so every element must be rewritten, and freeing must hand it back."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import flood_kernels
from flood_kernels._inputs import LossOptions
from flood_kernels.functional import flooded_cross_entropy_with_options
from helpers import assert_grad_close, random_logits, random_target, reference64

pytestmark = pytest.mark.skipif("cpu" not in flood_kernels.available_backends("cpu"),
                                reason="needs the C++ extension")

N, V = 1024, 8192  # 32 MB of fp32 gradient: the smallest size that is recycled


def _grad(x, target, single_read=None, flood="batch", flood_level=0.0, **options):
    leaf = x.clone().requires_grad_(True)
    loss, _ = flooded_cross_entropy_with_options(leaf, target, LossOptions(flood=flood, **options), flood_level,
                                                 None, "cpu", single_read=single_read)
    loss.backward()
    return leaf.grad


@pytest.mark.parametrize("single_read", [True, False])
def test_recycled_buffer_is_fully_rewritten(single_read):
    flood_kernels.empty_cpu_cache()
    previous = _grad(random_logits(N, V, "cpu"), random_target(N, V, "cpu"))
    previous.fill_(float("nan"))  # poison the block that goes back to the cache
    address = previous.data_ptr()
    del previous
    x, target = random_logits(N, V, "cpu"), random_target(N, V, "cpu", ignore_fraction=0.1)
    grad = _grad(x, target, single_read, flood_level=20.0, flood="individual", label_smoothing=0.1)
    assert grad.data_ptr() == address, "a freed gradient of the same size must be reused"
    _, _, expected = reference64(x, target, flood_level=20.0, flood="individual", label_smoothing=0.1)
    assert_grad_close(grad, expected.float(), torch.float32)


def test_live_gradients_never_share_a_block():
    x, target = random_logits(N, V, "cpu"), random_target(N, V, "cpu")
    first, second = _grad(x, target), _grad(x, target)
    assert first.data_ptr() != second.data_ptr()
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_empty_cache_returns_the_blocks_to_the_os():
    grad = _grad(random_logits(N, V, "cpu"), random_target(N, V, "cpu"))
    del grad  # cached: still resident
    before = _resident_bytes()
    flood_kernels.empty_cpu_cache()
    assert before - _resident_bytes() >= N * V * 4 * 0.9


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/statm")
def test_environment_variable_turns_recycling_off():
    script = (
        "import os, torch, flood_kernels\n"
        "def resident():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
        f"x = torch.randn({N}, {V}, requires_grad=True); t = torch.randint(0, {V}, ({N},))\n"
        "flood_kernels.flooded_cross_entropy(x[:2], t[:2], backend='cpu').backward()  # first-call setup\n"
        "x.grad = None\n"
        "before = resident()\n"
        "flood_kernels.flooded_cross_entropy(x, t, backend='cpu').backward()\n"
        "x.grad = None\n"
        "print(resident() - before)\n"
    )

    def kept_bytes(flag: str) -> int:
        env = dict(os.environ, FLOOD_KERNELS_CPU_BUFFER_CACHE=flag)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    gradient_bytes = N * V * 4
    assert kept_bytes("1") >= 0.9 * gradient_bytes
    assert kept_bytes("0") < 0.25 * gradient_bytes


@pytest.mark.parametrize("single_read", [True, False])
def test_gradients_beyond_the_caches_are_streamed_correctly(single_read):
    """Gradients of 64 MB and more are written with non-temporal stores where a row is vector-aligned: with
    V = 8195 rows alternate between aligned and not."""
    n, v = 2048, 8195
    x, target = random_logits(n, v, "cpu"), random_target(n, v, "cpu", ignore_fraction=0.05)
    grad = _grad(x, target, single_read, flood="individual", flood_level=8.0)
    _, _, expected = reference64(x, target, flood="individual", flood_level=8.0)
    assert_grad_close(grad, expected.float(), torch.float32)
