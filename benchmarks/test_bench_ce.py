"""pytest-benchmark suite: fused flooded CE vs the plain PyTorch one-liner, in every phase of bench.PHASES.

``pytest benchmarks/ --benchmark-only`` times forward+backward of each implementation of
:func:`flood_kernels.bench.implementations` and records in ``extra_info`` the achieved GB/s and the % of
the byte floors (1R+1W and 2R+1W of the N x V logits over the copy bandwidth measured in the same run).
"""

from __future__ import annotations

import pytest
import torch

from flood_kernels import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = bench.SHAPE_SETS["issue2"] if DEVICE.type == "cuda" else [(1024, 32000, "float32"), (256, 1000, "float32")]
IMPLEMENTATIONS = bench.implementations(DEVICE)


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    return bench.copy_bandwidth_gbps(DEVICE)


@pytest.mark.benchmark
@pytest.mark.parametrize("phase", list(bench.PHASES))
@pytest.mark.parametrize("n,v,dtype", SHAPES, ids=[f"{n}x{v}-{d}" for n, v, d in SHAPES])
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_forward_backward(benchmark, copy_bandwidth, implementation, n, v, dtype, phase):
    torch_dtype = getattr(torch, dtype)
    if not bench.runs_in_phase(implementation, phase):
        pytest.skip("the forced single-read / two-pass variants only differ in the plain and iflood phases")
    if not bench._fits(n, v, torch_dtype, DEVICE):
        pytest.skip("does not fit this device")
    loss_fn = IMPLEMENTATIONS[implementation]
    if implementation.startswith("torch.compile"):
        torch._dynamo.reset()  # a fresh cache per test: the recompile limit would make later shapes eager
    x, target = bench.make_inputs(n, v, torch_dtype, DEVICE)  # fresh per test: Liger writes over its input
    x.requires_grad_(True)
    flood, level_of_v = bench.PHASES[phase]
    level = level_of_v(v)

    def step() -> None:
        x.grad = None
        loss_fn(x, target, flood, level).backward()
        bench.synchronize(DEVICE)

    step()
    benchmark.pedantic(step, rounds=10 if DEVICE.type == "cuda" else 3, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: the step ran once, untimed
        return
    ms = benchmark.stats.stats.median * 1e3
    logits_bytes = n * v * x.element_size()
    benchmark.extra_info.update(
        copy_bandwidth_gbps=copy_bandwidth,
        gbps=3 * logits_bytes / (ms * 1e-3) / 1e9,
        pct_floor_1r1w=100 * 2 * logits_bytes / (copy_bandwidth * 1e9) / (ms * 1e-3),
        pct_floor_2r1w=100 * 3 * logits_bytes / (copy_bandwidth * 1e9) / (ms * 1e-3),
    )
