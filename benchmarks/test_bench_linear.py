"""pytest-benchmark suite: fused linear + flooded CE vs the eager / compiled one-liner and the fused peers.

Times forward+backward of ``loss(h @ W.T + flood)`` with gradients for ``h`` and ``W`` (batch flooding, the
descent phase). ``extra_info`` holds the time of one ``h @ W.T`` matmul (three of them are the floor of any
exact method that does not recompute) and, on CUDA, the peak memory beyond inputs and weights, with and
without the gradients of ``h`` and ``W``. GPU: N = 8192, D = 4096, V in {128256, 256000}, bf16; CPU: a small
float32 shape. torch.compile, Liger and Cut Cross-Entropy are measured on CUDA only (on CPU the compile alone
would take longer than the whole suite may).
"""

from __future__ import annotations

from typing import Callable, Dict

import pytest
import torch
import torch.nn.functional as F

from flood_kernels import available_backends, bench
from flood_kernels.linear import linear_flooded_cross_entropy

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = ([(8192, 4096, v, "bfloat16") for v in (128256, 256000)] if DEVICE.type == "cuda"
          else [(512, 256, 8192, "float32")])
LEVEL = bench.PHASES["descent"][1](0)

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _eager(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, level: float) -> torch.Tensor:
    return (F.cross_entropy(F.linear(h, w).float(), target) - level).abs() + level


def implementations(device: torch.device) -> Dict[str, LossFn]:
    """name -> loss(h, W, target, level): ours per kernel backend, eager, and the peers importable here."""
    impls: Dict[str, LossFn] = {}
    ours = [b for b in available_backends(device) if b != "reference" and not (b == "triton" and device.type == "cpu")]
    for backend in ours or ["reference"]:
        impls[f"flood_kernels[{backend}]"] = (lambda h, w, t, b, _backend=backend: linear_flooded_cross_entropy(
            h, w, t, flood_level=b, backend=_backend))
        if device.type == "cuda" and backend == ours[0]:  # the grad_W sums do not depend on the CE backend
            for accumulator in ("compensated", "weight_dtype"):
                impls[f"flood_kernels[{backend}, {accumulator} grad_W]"] = (
                    lambda h, w, t, b, _backend=backend, _accumulator=accumulator: linear_flooded_cross_entropy(
                        h, w, t, flood_level=b, backend=_backend, grad_weight_accumulator=_accumulator))
    impls["eager (upcast)"] = _eager
    if device.type == "cuda":
        impls["torch.compile (upcast)"] = torch.compile(_eager, dynamic=False)
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions()
        impls["F.linear_cross_entropy (chunked)"] = (
            lambda h, w, t, b: (F.linear_cross_entropy(h, w, t, options=options) - b).abs() + b)
    if device.type == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss()
            impls["liger fused linear CE"] = lambda h, w, t, b: (liger(w, h, t) - b).abs() + b
        except ImportError:
            pass
        try:
            from cut_cross_entropy import linear_cross_entropy as cce

            impls["cut cross-entropy"] = lambda h, w, t, b: (cce(h, w, t) - b).abs() + b
        except ImportError:
            pass
    return impls


IMPLEMENTATIONS = implementations(DEVICE)
_MATMUL_MS: Dict[tuple, float] = {}


def _matmul_ms(h: torch.Tensor, w: torch.Tensor) -> float:
    key = (tuple(h.shape), tuple(w.shape), h.dtype)
    if key not in _MATMUL_MS:
        with torch.no_grad():
            _MATMUL_MS[key] = bench.time_ms(lambda: h @ w.t(), DEVICE, min_seconds=0.2)
    return _MATMUL_MS[key]


def _fits(n: int, d: int, v: int, element_size: int) -> bool:
    """Room for the eager baseline: logits, an fp32 copy, its gradient, and the weights with their gradients."""
    need = n * v * (2 * element_size + 8) + 2 * (n + v) * d * element_size
    if DEVICE.type == "cuda":
        return need < 0.8 * torch.cuda.mem_get_info(DEVICE)[0]
    return need < 4 * 2**30


@pytest.mark.benchmark
@pytest.mark.parametrize("n,d,v,dtype", SHAPES, ids=[f"{n}x{d}x{v}-{t}" for n, d, v, t in SHAPES])
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_linear_forward_backward(benchmark, implementation, n, d, v, dtype):
    torch_dtype = getattr(torch, dtype)
    if not _fits(n, d, v, torch.tensor([], dtype=torch_dtype).element_size()):
        pytest.skip("does not fit this device")
    loss_fn = IMPLEMENTATIONS[implementation]
    # Drawn on the device (V x D numbers drawn on the host would take longer than the benchmark).
    generator = torch.Generator(device=DEVICE).manual_seed(n + d + v)
    h = torch.randn(n, d, generator=generator, device=DEVICE, dtype=torch_dtype).requires_grad_(True)
    w = torch.randn(v, d, generator=generator, device=DEVICE, dtype=torch_dtype).div_(d ** 0.5).requires_grad_(True)
    target = torch.randint(0, v, (n,), generator=generator, device=DEVICE)

    def step() -> None:
        h.grad = w.grad = None
        loss_fn(h, w, target, LEVEL).backward()
        bench.synchronize(DEVICE)

    step()
    matmul_ms = _matmul_ms(h.detach(), w.detach())
    extra = {"matmul_ms": matmul_ms}
    if DEVICE.type == "cuda":
        h.grad = w.grad = None
        torch.cuda.synchronize(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        baseline = torch.cuda.memory_allocated(DEVICE)
        step()
        peak = torch.cuda.max_memory_allocated(DEVICE) - baseline
        gradients = (h.numel() + w.numel()) * h.element_size()
        extra.update(peak_extra_mb=peak / 2**20, peak_extra_beyond_gradients_mb=(peak - gradients) / 2**20)
    benchmark.pedantic(step, rounds=10 if DEVICE.type == "cuda" else 3, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: the step ran once, untimed
        return
    ms = benchmark.stats.stats.median * 1e3
    extra.update(ms=ms, pct_of_three_matmuls=100 * 3 * matmul_ms / ms)
    benchmark.extra_info.update(extra)
