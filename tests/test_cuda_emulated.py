"""The CUDA backend's kernels and launchers (csrc/cuda/flood_ce.cu), run on the CPU under tests/cuda_emulation, against
the float64 reference: every layout (a warp per row, a block per row, the row-resident kernel in one block and in
thread-block clusters of 2 to 8, its two-pass fallbacks), misaligned and strided rows, every option and dtype,
in-place backward, ignored and out-of-range targets, shuffled thread schedules, code built for sm_80 and sm_90.

What a GPU alone decides (speed, registers, the hardware's exp) is left to the ``gpu`` tests; everything the
kernels compute, index and synchronize is checked here, on every machine, before a GPU ever runs them.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import pytest
import torch
from torch import Tensor

from flood_kernels.reference import row_losses, softcapped

import cuda_emulation
from helpers import assert_draws_pass, assert_grad_close, assert_loss_close, random_row_options, random_seeds

ARCHS = (80, 90)

# Row-resident limits of flood_ce.cu: 512 threads x 8 packs of 16 bytes per block, clusters of up to 8 blocks.
RESIDENT_BLOCK_BYTES = 512 * 8 * 16


pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which(os.environ.get("CXX", "c++")) is None,
    reason="the CUDA emulation builds with the host C++ compiler on Linux (fibers on mmap'd stacks)")


@pytest.fixture(scope="module", params=ARCHS, ids=[f"sm{sm}" for sm in ARCHS])
def sm(request: Any) -> int:
    cuda_emulation.emulated_ops(request.param)  # builds once per session
    return request.param


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: Tensor) -> Tensor:
    """t's elements as integers of their width: compared with torch.equal, bit for bit (NaN payloads included)."""
    return t.view(_INT_VIEW[t.element_size()])


@dataclass
class Case:
    """One call of the ops: logits as rows of a NaN-filled buffer (`base`), target, options, the emulated device."""
    base: Tensor
    logits: Tensor
    target: Tensor
    weight: Optional[Tensor] = None
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    reverse_ce: float = 0.0
    reverse_ce_log_zero: float = -4.0
    device_sm: int = 90
    max_active_clusters: int = cuda_emulation.MAX_ACTIVE_CLUSTERS
    schedule_seed: int = 0
    description: str = ""

    def scalars(self) -> Tuple[Any, ...]:
        return (self.ignore_index, self.label_smoothing, self.z_loss, self.softcap or 0.0, self.reverse_ce,
                self.reverse_ce_log_zero)

    def logits_in(self, base: Tensor) -> Tensor:
        """The logits' view of another buffer like `base`."""
        return base.as_strided(self.logits.shape, self.logits.stride(), self.logits.storage_offset())


def rows_of_a_buffer(x: Tensor, pad: int = 0, offset: int = 0) -> Tuple[Tensor, Tensor]:
    """(buffer, rows): x copied into rows of stride V + pad starting at element `offset` of a NaN-filled 1-D buffer.
    With pad or offset, rows start off a 16-byte boundary, differently from row to row; a read outside a row
    brings a NaN in, a write outside one changes the buffer."""
    n, v = x.shape
    base = torch.full((offset + n * (v + pad) + pad,), float("nan"), dtype=x.dtype)
    rows = base.as_strided((n, v), (v + pad, 1), offset)
    rows.copy_(x)
    return base, rows


def reference(case: Case, row_scale: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """float64 (losses, lse, gradient of sum(row_scale * losses)) on the same values. Rows whose target is out of
    range (the kernels give NaN there) are computed as ignored, then set to NaN."""
    v = case.logits.shape[1]
    x = case.logits.double().requires_grad_()
    in_range = (case.target >= 0) & (case.target < v)
    out_of_range = ~in_range & (case.target != case.ignore_index)
    target = case.target.masked_fill(out_of_range, case.ignore_index)
    weight = case.weight.double() if case.weight is not None else None
    losses = row_losses(x, target, weight, case.ignore_index, case.label_smoothing, case.z_loss, case.softcap,
                        case.reverse_ce, case.reverse_ce_log_zero)
    (grad,) = torch.autograd.grad((losses * row_scale.double()).sum(), x)
    lse = torch.logsumexp(softcapped(case.logits.double(), case.softcap), dim=1)
    losses = losses.detach().masked_fill(out_of_range, float("nan"))
    return losses, lse, grad.masked_fill(out_of_range[:, None], float("nan"))


def term_scale(case: Case, row_scale: Tensor, lse: Tensor) -> float:
    """The size of the terms a gradient element is a difference of (as helpers.row_term_scale): fp32 cancellation
    in p_y - 1 leaves a few ulps of it."""
    finite = lse[torch.isfinite(lse)]
    lse_max = finite.abs().max().item() if finite.numel() else 0.0
    coefficient = ((case.weight.max().item() if case.weight is not None else 1.0) + 2 * case.z_loss * lse_max
                   + case.reverse_ce * -case.reverse_ce_log_zero)
    return row_scale.abs().max().item() * coefficient


def assert_grad_rows_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, scale: float) -> None:
    """helpers.assert_grad_close on the rows the reference has numbers for; NaN exactly where it has NaN (the rows
    of out-of-range targets)."""
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), "NaN elsewhere than the reference"
    finite_rows = ~torch.isnan(expected).any(dim=1)
    if finite_rows.any():
        assert_grad_close(actual[finite_rows], expected[finite_rows], dtype, scale)


def labelled(what: str, check: Any, *args: Any) -> None:
    try:
        check(*args)
    except AssertionError as error:
        raise AssertionError(f"{what}: {error}") from None


def run_ops(case: Case, sm: int) -> None:
    """forward, backward (out of place and in place) and loss_and_grad (per-row flood signs and a grad_scale)
    against the reference; the in-place backward must leave the rest of its buffer bit for bit as it was."""
    ops = cuda_emulation.emulated_ops(sm)
    with cuda_emulation.configured(sm, case.device_sm, case.max_active_clusters, case.schedule_seed):
        n, v = case.logits.shape
        dtype = case.logits.dtype
        loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        rtol = 1e-10 if dtype == torch.float64 else 1e-5
        weight = case.weight.to(loss_dtype) if case.weight is not None else None
        grad_losses = (torch.randn(n, dtype=torch.float64) * 2).to(loss_dtype)
        ref_losses, ref_lse, ref_grad = reference(case, grad_losses)
        scale = term_scale(case, grad_losses, ref_lse)

        losses, lse = ops.forward(case.logits, case.target, weight, *case.scalars(), False)
        labelled("forward losses", assert_loss_close, losses, ref_losses, rtol)
        assert lse.shape == (n, 2)
        labelled("forward lse (shift + log_sum)", assert_loss_close, lse.sum(dim=1), ref_lse, rtol)

        grad = ops.backward(grad_losses, case.logits, case.target, weight, lse, *case.scalars())
        assert grad.is_contiguous() and grad.dtype == dtype
        labelled("backward", assert_grad_rows_close, grad, ref_grad, dtype, scale)

        base = case.base.clone()
        ops.backward_(grad_losses, case.logits_in(base), case.target, weight, lse, *case.scalars())
        labelled("in-place backward", assert_grad_rows_close, case.logits_in(base), ref_grad, dtype, scale)
        outside = torch.ones(base.numel(), dtype=torch.bool)
        case.logits_in(outside).fill_(False)
        assert torch.equal(bits(base)[outside], bits(case.base)[outside]), "in-place backward wrote outside the rows"

        grad_scale = torch.tensor(-0.75, dtype=loss_dtype)
        sign = torch.where(torch.rand(n) < 0.5, -1.0, 1.0).double()
        finite_losses = torch.nan_to_num(ref_losses, nan=0.0)
        levels = (finite_losses - sign * (0.25 + 0.5 * finite_losses.abs())).to(loss_dtype)  # a clear sign
        row_scale = grad_scale.double() * sign
        _, _, ref_fused_grad = reference(case, row_scale)
        fused_losses, fused_grad = ops.loss_and_grad(case.logits, case.target, weight, levels, grad_scale, True,
                                                     *case.scalars())
        labelled("loss_and_grad losses", assert_loss_close, fused_losses, ref_losses, rtol)
        labelled("loss_and_grad", assert_grad_rows_close, fused_grad, ref_fused_grad, dtype,
                 term_scale(case, row_scale, ref_lse))


def launches_of(sm: int, call: Any) -> Tuple[str, ...]:
    cuda_emulation.take_launches(sm)
    call()
    return cuda_emulation.take_launches(sm)


def make_case(x: Tensor, target: Tensor, pad: int = 0, offset: int = 0, **options: Any) -> Case:
    base, rows = rows_of_a_buffer(x, pad, offset)
    return Case(base, rows, target, **options)


# (classes, dtype, device_sm, max_active_clusters) -> how loss_and_grad runs on sm_90 code: the launch API and the
# cluster size of its one launch. On sm_80 code (or an sm_80 device) clusters never run: rows that fit a block
# stay resident, longer ones take the two-pass kernel.
CLUSTERS = cuda_emulation.MAX_ACTIVE_CLUSTERS
PATHS = [
    pytest.param(700, torch.float32, 90, CLUSTERS, ("<<<>>>", 1), id="warp-per-row"),
    pytest.param(3001, torch.float16, 90, CLUSTERS, ("cudaLaunchKernelEx", 1), id="one-block"),
    pytest.param(16384, torch.float32, 90, CLUSTERS, ("cudaLaunchKernelEx", 1), id="one-full-block"),
    pytest.param(16385, torch.float32, 90, CLUSTERS, ("cudaLaunchKernelEx", 2), id="cluster-2"),
    pytest.param(100000, torch.bfloat16, 90, CLUSTERS, ("cudaLaunchKernelEx", 4), id="cluster-4"),
    pytest.param(131072, torch.float32, 90, CLUSTERS, ("cudaLaunchKernelEx", 8), id="cluster-8"),
    pytest.param(65536, torch.float64, 90, CLUSTERS, ("cudaLaunchKernelEx", 8), id="cluster-8-float64"),
    pytest.param(262145, torch.bfloat16, 90, CLUSTERS, ("<<<>>>", 1), id="beyond-clusters"),
    pytest.param(40000, torch.float32, 90, 0, ("<<<>>>", 1), id="no-cluster-fits"),
    pytest.param(40000, torch.float32, 80, CLUSTERS, ("<<<>>>", 1), id="sm80-device"),
]


@pytest.mark.parametrize("v,dtype,device_sm,max_clusters,sm90_launch", PATHS)
def test_each_loss_and_grad_path(sm, v, dtype, device_sm, max_clusters, sm90_launch):
    """Each way loss_and_grad can run, with misaligned rows, weights, smoothing, softcap and an ignored row."""
    gen = torch.Generator().manual_seed(v)
    n = 3
    x = (torch.randn(n, v, generator=gen) * 3).to(dtype)
    target = torch.randint(0, v, (n,), generator=gen)
    target[1] = -100
    case = make_case(x, target, pad=3, offset=1, weight=torch.rand(v, generator=gen) + 0.5, label_smoothing=0.1,
                     softcap=20.0, device_sm=device_sm, max_active_clusters=max_clusters)
    launches = launches_of(sm, functools.partial(run_ops, case, sm))
    fused = launches[-1]  # loss_and_grad is the last op run_ops calls
    api, cluster = sm90_launch
    if sm < 90 or device_sm < 90:
        fits_a_block = v * x.element_size() <= RESIDENT_BLOCK_BYTES
        api, cluster = ("cudaLaunchKernelEx" if fits_a_block and v > 1024 else "<<<>>>"), 1
    assert fused.startswith(api) and fused.endswith(f"cluster={cluster}"), launches


def draw(seed: int, sm: int) -> Case:
    """A random configuration: the path (warp, block, resident block or cluster, beyond), dtype, options, row
    alignment, ignored / out-of-range / masked targets, emulated device, cluster occupancy and thread schedule."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64])
    block_classes = RESIDENT_BLOCK_BYTES // torch.empty(0, dtype=dtype).element_size()
    path = rng.choice(["warp", "warp", "block", "resident", "cluster", "beyond"])
    if path == "warp":
        v = rng.choice([1, 2, 3, 5, 8, 17, 31, 64, 100, 257, 1000, 1024])
    elif path == "block":
        v = rng.randint(1025, 5000)
    elif path == "resident":
        v = rng.randint(1025, block_classes)
    elif path == "cluster":
        v = rng.randint(block_classes + 1, 8 * block_classes)
    else:
        v = 8 * block_classes + rng.randint(1, 4000)
    n = rng.choice([1, 2, 3, 7, 16, 33]) if v <= 5000 else rng.choice([1, 2, 3])
    options = random_row_options(rng, gen, v)
    ignore_index = options.pop("ignore_index")
    x = torch.randn(n, v, generator=gen) * rng.choice([0.5, 3.0, 8.0])
    target = torch.randint(0, v, (n,), generator=gen)
    target[torch.rand(n, generator=gen) < rng.choice([0.0, 0.3, 1.0])] = ignore_index
    if rng.random() < 0.2:  # an out-of-range target: NaN loss and gradient, no read outside the row
        target[rng.randrange(n)] = rng.choice([v, v + 7, -5])
    if rng.random() < 0.2 and "label_smoothing" not in options and v > 1:  # masked classes, never the target
        masked = torch.rand(n, v, generator=gen) < 0.3
        masked[torch.arange(n), target.clamp(0, v - 1)] = False
        x[masked] = float("-inf")
    pad = rng.choice([0, 0, 1, 3, 8])
    offset = rng.choice([0, 0, 1, 2, 5])
    device_sm = rng.choice([sm, sm, 80 if sm == 90 else 90])
    case = make_case(x.to(dtype), target, pad, offset, ignore_index=ignore_index, device_sm=device_sm,
                     max_active_clusters=rng.choice([CLUSTERS, CLUSTERS, 0]), schedule_seed=rng.choice([0, seed]),
                     **options)
    shown = {key: (f"tensor{tuple(value.shape)}" if isinstance(value, Tensor) else value)
             for key, value in options.items()}
    case.description = (f"seed {seed}: sm_{sm} code on an sm_{device_sm} device, {path}: N={n} V={v} {dtype}, row "
                        f"stride V+{pad} at offset {offset}, ignore_index {ignore_index}, max clusters "
                        f"{case.max_active_clusters}, schedule {case.schedule_seed}, {shown}")
    return case


def test_random_configurations_match_the_reference(sm):
    """Fresh draws every run (replay one with FLOOD_KERNELS_RANDOM_SEED=<seed> FLOOD_KERNELS_RANDOM_DRAWS=1)."""
    cases = (draw(seed, sm) for seed in random_seeds(60))
    assert_draws_pass((case.description, functools.partial(run_ops, case, sm)) for case in cases)


@pytest.mark.parametrize("v,dtype", [(300, torch.float32), (3000, torch.bfloat16), (40000, torch.float32)])
def test_results_do_not_depend_on_the_thread_schedule(sm, v, dtype):
    """Every op bit for bit the same under shuffled thread orders: the reductions' order is fixed by the code, so
    a difference means a race (a read that a missing barrier leaves unordered against a write)."""
    gen = torch.Generator().manual_seed(v)
    n = 5
    x = (torch.randn(n, v, generator=gen) * 4).to(dtype)
    target = torch.randint(0, v, (n,), generator=gen)
    weight = torch.rand(v, generator=gen) + 0.5
    case = make_case(x, target, pad=1, offset=3)
    logits = case.logits
    ops = cuda_emulation.emulated_ops(sm)
    scalars = (-100, 0.2, 1e-3, 10.0, 0.5, -4.0)
    grad_losses = torch.randn(n)
    levels = torch.rand(n) * 8

    def run_all(schedule_seed: int) -> Tuple[Tensor, ...]:
        with cuda_emulation.configured(sm, sm, schedule_seed=schedule_seed):
            losses, lse = ops.forward(logits, target, weight, *scalars, False)
            grad = ops.backward(grad_losses, logits, target, weight, lse, *scalars)
            in_place = case.base.clone()
            ops.backward_(grad_losses, case.logits_in(in_place), target, weight, lse, *scalars)
            fused = ops.loss_and_grad(logits, target, weight, levels, torch.tensor(0.5), True, *scalars)
            return (losses, lse, grad, in_place) + tuple(fused)

    in_order = run_all(0)
    for seed in (1, 2, 3):
        for a, b in zip(in_order, run_all(seed)):
            assert torch.equal(bits(a), bits(b)), seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n,offset", [(1, 0), (7, 3), (1000, 0), (4099, 5), (70001, 1)])
def test_scale_grad(sm, dtype, n, offset):
    """grad *= grad_output in the accumulation type, over a grid-stride of 16-byte packs after a scalar head that
    aligns grad; bit for bit untouched when grad_output is 1; nothing outside grad touched."""
    ops = cuda_emulation.emulated_ops(sm)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    base = (torch.randn(offset + n + 9) * 3).to(dtype)
    grad = base[offset:offset + n]
    before = base.clone()
    ops.scale_grad_(grad, torch.tensor(1.0, dtype=loss_dtype))
    assert torch.equal(bits(base), bits(before))
    ops.scale_grad_(grad, torch.tensor(-1.7, dtype=loss_dtype))
    expected = before.clone()
    expected[offset:offset + n] = (before[offset:offset + n].to(loss_dtype) * -1.7).to(dtype)
    assert torch.equal(bits(base), bits(expected))


@pytest.mark.parametrize("v,dtype", [(1000, torch.bfloat16), (3000, torch.bfloat16), (40000, torch.float32)])
def test_rows_past_the_int32_range(sm, v, dtype):
    """A second row 2**31 + 67 elements after the first (an address space reserved, two rows written): the row
    offsets are 64-bit in every path (warp, resident block, cluster on sm_90) and in the in-place backward."""
    stride = 2**31 + 67
    try:
        big = torch.empty(stride + v, dtype=dtype)  # untouched pages: only the two rows are ever written
    except RuntimeError:
        pytest.skip("cannot reserve the address space of a 2**31-element buffer here")
    logits = big.as_strided((2, v), (stride, 1))
    gen = torch.Generator().manual_seed(v)
    logits.copy_((torch.randn(2, v, generator=gen) * 3).to(dtype))
    target = torch.randint(0, v, (2,), generator=gen)
    case = Case(big, logits, target)
    ops = cuda_emulation.emulated_ops(sm)
    grad_losses = torch.tensor([0.5, -2.0])
    ref_losses, ref_lse, ref_grad = reference(case, grad_losses)
    scale = term_scale(case, grad_losses, ref_lse)
    losses, lse = ops.forward(logits, target, None, *case.scalars(), False)
    assert_loss_close(losses, ref_losses)
    assert_grad_close(ops.backward(grad_losses, logits, target, None, lse, *case.scalars()), ref_grad, dtype, scale)
    ref_fused_grad = reference(case, torch.ones(2))[2]
    fused_losses, fused_grad = ops.loss_and_grad(logits, target, None, torch.zeros(2), torch.tensor(1.0), False,
                                                 *case.scalars())
    assert_loss_close(fused_losses, ref_losses)
    assert_grad_close(fused_grad, ref_fused_grad, dtype, term_scale(case, torch.ones(2), ref_lse))
    ops.backward_(grad_losses, logits, target, None, lse, *case.scalars())
    assert_grad_close(logits, ref_grad, dtype, scale)
