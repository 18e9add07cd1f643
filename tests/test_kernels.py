"""Every kernel backend against the float64 reference, on fresh random inputs."""

from __future__ import annotations

import math
import os

import pytest
import torch

from flood_kernels import FloodedCrossEntropyLoss, backends, flooded_cross_entropy
from flood_kernels._flood import mean_denominator
from flood_kernels._inputs import LossOptions
from flood_kernels.functional import flooded_cross_entropy_with_options

from helpers import (KERNEL_CASES, OPTION_SETS, assert_grad_close, assert_loss_close, leaf_copy, loss_and_grad,
                     materialize, random_logits, random_target, reference64, requires_cuda, row_term_scale,
                     run_without_host_sync)

pytestmark = pytest.mark.skipif(not KERNEL_CASES, reason="no kernel backend usable on this machine")


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
@pytest.mark.parametrize("flood,reduction", [
    ("batch", "mean"), ("batch", "sum"), ("individual", "mean"), ("individual", "none"), (None, "mean"),
    (None, "none"),
])
def test_options_match_reference(device, backend, option_set, flood, reduction):
    n, v = 13, 67
    options = materialize(OPTION_SETS[option_set], v, device)
    x = random_logits(n, v, device)
    target = random_target(n, v, device, ignore_fraction=0.2, ignore_index=options.get("ignore_index", -100))
    kwargs = dict(options, flood=flood, reduction=reduction, flood_level=1.5)
    grad_output = -2.5
    loss, raw, grad = loss_and_grad(x, target, grad_output, backend=backend, **kwargs)
    ref_loss, ref_raw, ref_grad = reference64(x, target, grad_output, **kwargs)
    assert_loss_close(loss, ref_loss)
    assert_loss_close(raw, ref_raw)
    assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
@pytest.mark.parametrize("v", [2, 5])
def test_rows_narrower_than_a_vector(device, backend, option_set, v):
    """A classifier's few classes (the CPU kernel's scalar path below one SIMD vector), with every option,
    a NaN row and a row of -inf but its target: per-row losses and the iFlood gradient match the reference."""
    n = 9
    options = materialize(OPTION_SETS[option_set], v, device)
    x = random_logits(n, v, device)
    x[2, 1] = float("nan")
    target = random_target(n, v, device, ignore_index=options.get("ignore_index", -100))
    target[4] = (options.get("ignore_index", -100) + 1) % v
    x[4] = float("-inf")
    x[4, target[4]] = 0.5
    levels = torch.rand(n, device=device) * 2
    finite = [row for row in range(n) if row != 2]
    for flood, reduction in (("individual", "none"), (None, "none")):
        kwargs = dict(options, flood=flood, reduction=reduction, flood_level=levels if flood else 0.0)
        loss, _, grad = loss_and_grad(x, target, -1.5, backend=backend, **kwargs)
        ref_loss, _, ref_grad = reference64(x, target, -1.5, **kwargs)
        assert_loss_close(loss[finite], ref_loss[finite])
        finite_kwargs = dict(kwargs, flood_level=levels[finite] if flood else 0.0)
        term_scale = row_term_scale(x[finite], target[finite], -1.5, **finite_kwargs)
        assert_grad_close(grad[finite], ref_grad[finite], torch.float32, term_scale=term_scale)
        ignored = bool(target[2] == options.get("ignore_index", -100))
        assert torch.isnan(loss[2]) != ignored
        assert torch.isnan(grad[2]).all() if not ignored else torch.equal(grad[2], torch.zeros_like(grad[2]))


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("v", [5, 67, 4099])
@pytest.mark.parametrize("softcap,offset", [(None, 200.0), (30.0, 0.0)])
def test_confident_rows_keep_their_own_precision(device, backend, v, softcap, offset):
    """Rows whose target holds nearly all the probability: l_y = lse - z_y and the target's gradient p_y - 1 are
    small differences of numbers near lse. The kernels keep lse as shift + log_sum (the row's max and
    log sum exp(z - max); LogSumExp in csrc/flood_ce_math.h), so with logits offset by 200 both are exact to a
    few float32 ulps of 1 (the rounding of the sum-exp: up to 11 on the CPU at V = 4099), not of |lse|: one
    float32 lse gave 65 to 72 (torch's float32 F.cross_entropy on the CPU: 2 to 18). Both paths, forward +
    backward and single-read. Under softcap z_y must be the value the row's statistics used, rounding included
    (the CPU kernel once took it from a scalar tanh that rounds differently from its vector tanh)."""
    n = 256
    x = random_logits(n, v, device)
    target = torch.randint(0, v, (n,), device=device)
    rows = torch.arange(n, device=device)
    x[rows, target] = x.amax(dim=1) + 6.0 + 10.0 * torch.rand(n, device=device)
    x[rows[:8], target[:8]] += 30.0  # some 1 - p_y < 1e-4 whatever the draw (under softcap 30, 27% of draws had none)
    x += offset
    options = LossOptions(flood=None, reduction="none", softcap=softcap)
    ref_loss, _, ref_grad = reference64(x, target, flood=None, reduction="none", softcap=softcap)
    assert ref_loss.max() < 0.25 and ref_loss.min() < 1e-4  # confident rows: p_y > 0.78, some 1 - p_y < 1e-4
    bound = 24 * torch.finfo(torch.float32).eps  # d loss.sum() / d l_i = 1: terms of size 1
    for single_read in (False, True) if backends.has_single_read(backend) else (False,):
        leaf = leaf_copy(x)
        loss, _ = flooded_cross_entropy_with_options(leaf, target, options, 0.0, None, backend,
                                                     single_read=single_read)
        loss.sum().backward()
        assert (loss.detach().double() - ref_loss).abs().max().item() <= bound, single_read
        assert (leaf.grad.double() - ref_grad).abs().max().item() <= bound, single_read


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("grad_output", [1.0, -1.0, 1e4])
def test_batch_flooding_flips_the_gradient_below_the_level(device, backend, grad_output):
    n, v = 8, 50
    x = random_logits(n, v, device)
    target = random_target(n, v, device)
    # The plain gradient of the same (two-pass) kernels: batch flooding at b = 0 always descends.
    _, raw, plain_grad = loss_and_grad(x, target, grad_output, backend=backend, flood_level=0.0)
    above_level = raw.item() + 1.0
    below_level = raw.item() - 1.0
    loss_up, _, grad_up = loss_and_grad(x, target, grad_output, backend=backend, flood_level=above_level)
    loss_down, _, grad_down = loss_and_grad(x, target, grad_output, backend=backend, flood_level=below_level)
    torch.testing.assert_close(loss_up, 2 * above_level - raw, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss_down, raw, rtol=0, atol=0)
    torch.testing.assert_close(grad_up, -plain_grad, rtol=0, atol=0)
    torch.testing.assert_close(grad_down, plain_grad, rtol=0, atol=0)
    ref_loss, _, ref_grad = reference64(x, target, grad_output, flood_level=above_level)
    assert_loss_close(loss_up, ref_loss)
    assert_grad_close(grad_up, ref_grad, torch.float32)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_gradient_is_zero_at_the_flood_level(device, backend):
    x = random_logits(6, 20, device)
    target = random_target(6, 20, device)
    raw = flooded_cross_entropy(x, target, flood=None, backend=backend)
    _, _, grad = loss_and_grad(x, target, backend=backend, flood_level=raw)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_per_sample_levels(device, backend, reduction):
    n, v = 16, 40
    x = random_logits(n, v, device)
    target = random_target(n, v, device, ignore_fraction=0.2)
    per_row = flooded_cross_entropy(x, target, flood=None, reduction="none", backend=backend)
    # Half of the rows below their level, half above.
    levels = (per_row + torch.where(torch.arange(n, device=device) % 2 == 0, 0.5, -0.5)).clamp_min(0)
    kwargs = dict(flood="individual", flood_level=levels, reduction=reduction)
    loss, _, grad = loss_and_grad(x, target, 0.75, backend=backend, **kwargs)
    ref_loss, _, ref_grad = reference64(x, target, 0.75, **kwargs)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("option_set", ["plain", "everything"])
def test_half_precision(device, backend, dtype, option_set):
    """Loss within 1e-5 of the float64 value of the same half numbers; gradients within 1 ulp."""
    n, v = 9, 301
    options = materialize(OPTION_SETS[option_set], v, device)
    x = random_logits(n, v, device, dtype=dtype)
    target = random_target(n, v, device, ignore_fraction=0.2, ignore_index=options.get("ignore_index", -100))
    for flood_level in (0.0, 50.0):
        loss, raw, grad = loss_and_grad(x, target, 3.0, backend=backend, flood_level=flood_level, **options)
        ref_loss, ref_raw, ref_grad = reference64(x, target, 3.0, flood_level=flood_level, **options)
        assert loss.dtype == torch.float32
        assert_loss_close(loss, ref_loss)
        assert_loss_close(raw, ref_raw)
        assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("flood,reduction", [("batch", "mean"), ("individual", "none"), (None, "sum")])
def test_float64_options_are_not_rounded_to_float32(device, backend, flood, reduction):
    """float64 logits get float64 arithmetic, the float options included: none of these values is a float32
    number, and rounding them to one (as a Triton launch does to a Python float) costs ~1e-8 relative."""
    n, v = 13, 67
    x = random_logits(n, v, device, dtype=torch.float64)
    target = random_target(n, v, device, ignore_fraction=0.2, ignore_index=1)
    kwargs = dict(weight=(torch.rand(v, dtype=torch.float64) + 0.25).to(device), label_smoothing=0.1, z_loss=1e-3,
                  softcap=3.3, reverse_ce=0.3, reverse_ce_log_zero=-4.1, ignore_index=1, flood=flood,
                  reduction=reduction, flood_level=2.2)
    loss, raw, grad = loss_and_grad(x, target, -1.3, backend=backend, **kwargs)
    ref_loss, ref_raw, ref_grad = reference64(x, target, -1.3, **kwargs)
    assert_loss_close(loss, ref_loss, rtol=1e-12)
    assert_loss_close(raw, ref_raw, rtol=1e-12)
    assert_grad_close(grad, ref_grad, torch.float64)


def test_triton_launch_splits_float_options():
    """What the Triton launchers pass for the float options (a launch makes every Python float a float32): their
    float32 values, then the float32 rounding errors, which float64 kernels add back (within 2**-48); beyond
    float32's range an option is infinite with no error term (not inf - inf = NaN in a float64 kernel)."""
    cross_entropy = pytest.importorskip("flood_kernels.triton.cross_entropy")
    options = (0.1, 1e-3, 3.3, 1e39)
    split = cross_entropy._split(*options)
    rounded, errors = split[:4], split[4:]
    for option, value, error in zip(options[:3], rounded, errors):
        assert value == torch.tensor(option, dtype=torch.float32).item() != option
        assert abs(value + error - option) <= 2.0 ** -48 * option
    assert rounded[3] == math.inf and errors[3] == 0.0


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("v", [1, 2, 4097, 8195, 524288])
def test_vocabulary_sizes(device, backend, v):
    """V = 1, V just past one and two blocks of the widest fp32 / half configurations, and V = 512k."""
    n = 3
    for dtype in (torch.float32, torch.bfloat16):
        x = random_logits(n, v, device, dtype=dtype)
        target = random_target(n, v, device)
        loss, _, grad = loss_and_grad(x, target, backend=backend, flood_level=0.1, label_smoothing=0.1)
        ref_loss, _, ref_grad = reference64(x, target, flood_level=0.1, label_smoothing=0.1)
        assert_loss_close(loss, ref_loss)
        assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_single_row_and_empty_batch(device, backend):
    x = random_logits(1, 33, device)
    target = random_target(1, 33, device)
    loss, _, grad = loss_and_grad(x, target, backend=backend, flood_level=7.0)
    ref_loss, _, ref_grad = reference64(x, target, flood_level=7.0)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, torch.float32)
    empty = random_logits(0, 33, device).requires_grad_(True)
    empty_target = torch.zeros(0, dtype=torch.long, device=device)
    total = flooded_cross_entropy(empty, empty_target, reduction="sum", flood_level=1.0, backend=backend)
    total.backward()
    assert total.item() == 2.0 and empty.grad.shape == (0, 33)
    assert torch.isnan(flooded_cross_entropy(empty, empty_target, flood=None, backend=backend))


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_all_targets_ignored(device, backend):
    """Like PyTorch: mean -> NaN (0 / 0), sum -> 0; gradients are exact zeros either way."""
    x = random_logits(5, 30, device)
    target = torch.full((5,), -100, device=device)
    mean_loss, _, mean_grad = loss_and_grad(x, target, backend=backend, flood=None)
    assert torch.isnan(mean_loss)
    assert torch.isnan(torch.nn.functional.cross_entropy(x, target))
    sum_loss, _, sum_grad = loss_and_grad(x, target, backend=backend, reduction="sum", flood_level=0.5)
    assert sum_loss.item() == 1.0
    assert torch.equal(mean_grad, torch.zeros_like(x)) and torch.equal(sum_grad, torch.zeros_like(x))


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_ignored_rows_get_exact_zero_gradient_even_with_nan_logits(device, backend):
    x = random_logits(4, 30, device)
    x[1] = float("nan")
    target = random_target(4, 30, device)
    target[1] = -100
    loss, _, grad = loss_and_grad(x, target, backend=backend, flood_level=0.3)
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    kept = [0, 2, 3]
    ref_loss, _, ref_grad = reference64(x[kept], target[kept], flood_level=0.3)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad[kept], ref_grad, torch.float32)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_nan_and_inf_propagate(device, backend):
    x = random_logits(4, 30, device)
    target = random_target(4, 30, device)
    x[2, 5] = float("nan")
    per_row = flooded_cross_entropy(x, target, flood=None, reduction="none", backend=backend)
    assert torch.isnan(per_row[2]) and torch.isfinite(per_row[[0, 1, 3]]).all()
    assert torch.isnan(flooded_cross_entropy(x, target, flood_level=0.1, backend=backend))
    x[2, 5] = float("inf")
    assert torch.isnan(flooded_cross_entropy(x, target, flood_level=0.1, backend=backend))


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_masked_vocabulary_with_minus_inf(device, backend):
    """-inf logits (masked classes), also filling whole leading blocks, give the reference's finite loss."""
    n, v = 4, 5000
    x = random_logits(n, v, device)
    x[:, : v - 40] = float("-inf")
    target = torch.randint(v - 40, v, (n,), device=device)
    loss, _, grad = loss_and_grad(x, target, backend=backend, flood_level=0.2, z_loss=1e-3)
    ref_loss, _, ref_grad = reference64(x, target, flood_level=0.2, z_loss=1e-3)
    assert torch.isfinite(loss)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_masked_prefix_then_very_negative_logits(device, backend):
    """A -inf block followed by logits below -88 (exp underflows in fp32) must not rescale 0 by inf."""
    n, v = 2, 8200
    x = random_logits(n, v, device) - 100.0
    x[:, :4100] = float("-inf")
    target = torch.randint(4100, v, (n,), device=device)
    loss, _, grad = loss_and_grad(x, target, backend=backend, flood=None)
    ref_loss, _, ref_grad = reference64(x, target, flood=None)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_nan_in_a_masked_leading_block_propagates(device, backend):
    """A NaN among -inf logits, with finite logits only in later blocks (V past two blocks): the running max
    skips the NaN (maxnum on GPU), so only the running sum carries it, and the rescale at the first finite
    block must keep it, not reset an 'empty' sum to 0."""
    for dtype in (torch.float32, torch.bfloat16):
        n, v = 3, 16500
        x = random_logits(n, v, device, dtype=dtype)
        x[:, :8300] = float("-inf")
        x[0, 10] = float("nan")
        target = torch.randint(8300, v, (n,), device=device)
        per_row = flooded_cross_entropy(x, target, flood=None, reduction="none", backend=backend)
        assert torch.isnan(per_row[0]) and torch.isfinite(per_row[1:]).all(), (dtype, per_row)
        loss, _, grad = loss_and_grad(x, target, backend=backend, flood_level=0.1)
        assert torch.isnan(loss) and torch.isnan(grad[0]).all(), dtype


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_strided_and_multidimensional_inputs(device, backend):
    n, v = 6, 45
    wide = random_logits(n, v + 19, device)
    x = wide[:, 3: v + 3]  # row stride v + 19
    target = random_target(n, v, device)
    loss, _, grad = loss_and_grad(x, target, backend=backend, flood_level=2.0)
    ref_loss, _, ref_grad = reference64(x, target, flood_level=2.0)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, torch.float32)

    transposed = random_logits(v, n, device).t()  # class stride != 1: copied
    loss, _, grad = loss_and_grad(transposed, target, backend=backend, flood_level=2.0)
    ref_loss, _, ref_grad = reference64(transposed, target, flood_level=2.0)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, torch.float32)

    images = (torch.randn(2, v, 3, 4) * 3).to(device)  # (N, C, d1, d2)
    pixel_target = torch.randint(0, v, (2, 3, 4), device=device)
    for reduction, flood in (("mean", "batch"), ("none", "individual")):
        loss, _, grad = loss_and_grad(images, pixel_target, backend=backend, reduction=reduction, flood=flood,
                                      flood_level=3.0)
        ref_loss, _, ref_grad = reference64(images, pixel_target, reduction=reduction, flood=flood, flood_level=3.0)
        assert loss.shape == ref_loss.shape == ((2, 3, 4) if reduction == "none" else ())
        assert_loss_close(loss, ref_loss)
        assert_grad_close(grad, ref_grad, torch.float32)

    single = random_logits(1, v, device)[0]  # (C,) with a 0-d target
    loss, _, grad = loss_and_grad(single, target[0], backend=backend, flood_level=0.5)
    ref_loss, _, ref_grad = reference64(single, target[0], flood_level=0.5)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_inplace_backward_overwrites_only_when_asked(device, backend):
    n, v = 7, 90
    base = random_logits(n, v, device)
    target = random_target(n, v, device, ignore_fraction=0.3)
    ref_loss, _, ref_grad = reference64(base, target, -1.5, flood_level=9.0, label_smoothing=0.1)

    x = base.clone().requires_grad_(True)
    logits = x * 1.0  # a non-leaf, as an LM head output would be
    (flooded_cross_entropy(logits, target, flood_level=9.0, label_smoothing=0.1, backend=backend) * -1.5).backward()
    assert torch.equal(logits.detach(), base), "default backward must not modify the logits"
    assert_grad_close(x.grad, ref_grad, torch.float32)

    x = base.clone().requires_grad_(True)
    logits = x * 1.0
    loss = flooded_cross_entropy(logits, target, flood_level=9.0, label_smoothing=0.1, inplace_backward=True,
                                 backend=backend)
    (loss * -1.5).backward()
    assert_loss_close(loss.detach(), ref_loss)
    assert_grad_close(x.grad, ref_grad, torch.float32)
    assert_grad_close(logits.detach(), ref_grad, torch.float32)

    leaf = base.clone().requires_grad_(True)  # the logits themselves a leaf: its .grad must still be right
    loss = flooded_cross_entropy(leaf, target, flood_level=9.0, label_smoothing=0.1, inplace_backward=True,
                                 backend=backend)
    (loss * -1.5).backward()
    assert_grad_close(leaf.grad, ref_grad, torch.float32)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_out_of_range_target(device, backend):
    x = random_logits(3, 10, device)
    target = torch.tensor([1, 10, 2], device=device)
    if device == "cpu":
        with pytest.raises(IndexError):
            flooded_cross_entropy(x, target, backend=backend)
        with pytest.raises(IndexError):
            flooded_cross_entropy(x, torch.tensor([1, -3, 2], device=device), backend=backend)
    else:
        per_row = flooded_cross_entropy(x, target, flood=None, reduction="none", backend=backend)
        assert torch.isnan(per_row[1]) and torch.isfinite(per_row[[0, 2]]).all()
        # With class weights the "mean" denominator gathers weight[target]: every path must give NaN, not a
        # device assert (which would end this process's CUDA context) or a wrapped negative index.
        weight = torch.rand(10, device=device) + 0.5
        x.requires_grad_(True)  # the single-read path serves only a loss that will be differentiated
        for bad in (10, -3):
            target[1] = bad
            for single_read in (True, False):
                for flood in ("batch", "individual", None):
                    loss = flooded_cross_entropy_with_options(x, target, LossOptions(flood=flood), 0.5, weight,
                                                              backend, single_read=single_read)[0]
                    assert torch.isnan(loss), (bad, single_read, flood)
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)]
                                             if torch.cuda.is_available() else []))
def test_mean_denominator_reads_no_weight_for_out_of_range_targets(device):
    weight = torch.tensor([1.0, 2.0, 4.0], device=device)
    target = torch.tensor([0, 3, -100, -1, 2, 7], device=device)
    denominator = mean_denominator(target, weight, -100, torch.float32)
    assert denominator.item() == 5.0  # rows with targets 0 and 2; ignored and out-of-range rows read nothing


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_gradcheck_float64(device, backend):
    x = random_logits(4, 11, device, dtype=torch.float64).requires_grad_(True)
    target = random_target(4, 11, device)
    target[0] = -100
    weight = (torch.rand(11, dtype=torch.float64) + 0.5).to(device)
    for kwargs in (
        dict(flood_level=0.5, label_smoothing=0.2, weight=weight, z_loss=0.01),
        dict(flood_level=40.0, softcap=2.0, reverse_ce=0.3),
        dict(flood="individual", flood_level=1.0, reduction="none"),
    ):
        assert torch.autograd.gradcheck(
            lambda t, options=kwargs: flooded_cross_entropy(t, target, backend=backend, **options), (x,), eps=1e-6,
            atol=1e-5)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_lse_is_the_row_max_and_log_sum_and_backward_checks_it(device, backend):
    """The forward op's lse is (N, 2): each row's max and log sum exp(x - max) (LogSumExp), which the backward
    reads; a tensor of another shape or layout is an error naming lse, not a read out of bounds."""
    ops = backends.kernel_ops(backend)
    x = random_logits(5, 37, device)
    target = random_target(5, 37, device)
    scalars = (-100, 0.0, 0.0, 0.0, 0.0, -4.0)
    _, lse = ops.forward(x, target, None, *scalars, False)
    assert lse.shape == (5, 2) and lse.dtype == torch.float32
    torch.testing.assert_close(lse[:, 0], x.amax(dim=1), rtol=0, atol=0)
    x64 = x.double()
    log_sum = (x64 - x64.amax(dim=1, keepdim=True)).exp().sum(1).log()
    torch.testing.assert_close(lse[:, 1].double(), log_sum, rtol=1e-5, atol=1e-6)  # float32 standard
    grad_losses = torch.randn(5, device=device)
    for bad in (lse[:, 0].contiguous(), lse[:4], lse.t().contiguous().t()):  # (N,); 4 rows; pair stride N
        with pytest.raises((RuntimeError, ValueError), match="lse"):
            ops.backward(grad_losses, x, target, None, bad, *scalars)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_ops_pass_opcheck(device, backend):
    ops = backends.kernel_ops(backend)
    x = random_logits(5, 37, device)
    target = random_target(5, 37, device, ignore_fraction=0.3)
    weight = (torch.rand(37) + 0.5).to(device)
    scalars = (-100, 0.1, 1e-3, 3.0, 0.2, -4.0)
    x_grad = x.clone().requires_grad_(True)
    torch.library.opcheck(ops.forward, (x_grad, target, weight) + scalars + (False,))
    _, lse = ops.forward(x, target, weight, *scalars, False)
    grad_losses = torch.randn(5, device=device)
    torch.library.opcheck(ops.backward, (grad_losses, x, target, weight, lse) + scalars)
    torch.library.opcheck(ops.backward_inplace, (grad_losses, x.clone(), target, weight, lse) + scalars)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", [c.values[1] for c in KERNEL_CASES if c.values[0] == "cuda"])
@pytest.mark.parametrize("flood,reduction,single_read", [
    ("batch", "mean", "0"), ("batch", "sum", "0"), ("individual", "mean", "0"), ("individual", "mean", "1"),
    ("individual", "none", "0"), (None, "mean", "0"), (None, "sum", "1"),
])
def test_no_host_synchronization(backend, flood, reduction, single_read, monkeypatch):
    """The hot path never waits for the GPU, with a Python-number level (the usual call) and a tensor one:
    torch's sync debug mode turns any synchronizing call (a blocking copy, .item()) into an error."""
    monkeypatch.setenv("FLOOD_KERNELS_SINGLE_READ", single_read)
    x = random_logits(32, 500, "cuda").requires_grad_(True)
    target = random_target(32, 500, "cuda", ignore_fraction=0.2)
    module = FloodedCrossEntropyLoss(flood_level=0.5, flood=flood, reduction=reduction, backend=backend)

    def step(level):
        loss = flooded_cross_entropy(x, target, flood=flood, reduction=reduction, flood_level=level, backend=backend)
        (loss.sum() + module(x, target).sum()).backward()

    level_tensor = torch.full((), 0.5, device="cuda")
    for level in (0.5, level_tensor):
        run_without_host_sync(lambda: step(level))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", [c.values[1] for c in KERNEL_CASES if c.values[0] == "cuda"])
def test_cuda_graph_capture_with_a_python_number_level(backend):
    """A float level is filled on the device at capture time, so the captured step replays without the host."""
    x = random_logits(64, 1000, "cuda").requires_grad_(True)
    target = random_target(64, 1000, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            x.grad = None
            flooded_cross_entropy(x, target, flood_level=100.0, backend=backend).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        loss = flooded_cross_entropy(x, target, flood_level=100.0, backend=backend)
        loss.backward()
    with torch.no_grad():
        x.mul_(0.5)  # new values in the captured input: the replay must recompute, not reuse
    graph.replay()
    torch.cuda.synchronize()
    ref_loss, _, ref_grad = reference64(x.detach(), target, flood_level=100.0)
    assert_loss_close(loss.detach(), ref_loss)
    assert_grad_close(x.grad, ref_grad, torch.float32)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", [c.values[1] for c in KERNEL_CASES if c.values[0] == "cuda"])
def test_cuda_graph_capture(backend):
    """No host synchronization: forward + backward replay inside a CUDA graph with a new flood level."""
    n, v = 64, 1000
    x = random_logits(n, v, "cuda").requires_grad_(True)
    target = random_target(n, v, "cuda")
    level = torch.tensor(0.0, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            x.grad = None
            flooded_cross_entropy(x, target, flood_level=level, backend=backend).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        loss = flooded_cross_entropy(x, target, flood_level=level, backend=backend)
        loss.backward()
    for flood_level in (0.0, 100.0):
        level.fill_(flood_level)
        graph.replay()
        torch.cuda.synchronize()
        ref_loss, _, ref_grad = reference64(x.detach(), target, flood_level=flood_level)
        assert_loss_close(loss.detach(), ref_loss)
        assert_grad_close(x.grad, ref_grad, torch.float32)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", [c.values[1] for c in KERNEL_CASES if c.values[0] == "cuda"])
@pytest.mark.parametrize("v,dtype,options", [
    (256000, torch.bfloat16, {"softcap": 30.0}),  # Gemma-2 sized, the widest register footprint in bf16
    (128256, torch.float32, {"label_smoothing": 0.1, "weight": "random"}),
    (20000, torch.float64, {"z_loss": 1e-4, "reverse_ce": 0.2}),
])
def test_large_vocabularies_with_options(backend, v, dtype, options):
    """Launch configurations of the largest rows, with the options that raise register pressure."""
    options = materialize(options, v, "cuda")
    x = random_logits(5, v, "cuda", dtype=dtype)
    target = random_target(5, v, "cuda")
    loss, _, grad = loss_and_grad(x, target, -1.0, backend=backend, flood_level=0.5, **options)
    ref_loss, _, ref_grad = reference64(x, target, -1.0, flood_level=0.5, **options)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, dtype)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", [c.values[1] for c in KERNEL_CASES if c.values[0] == "cuda"])
def test_64bit_offsets(backend):
    """N x V >= 2**31 elements: rows past the int32 range are addressed correctly."""
    n, v = 16400, 131072
    assert n * v >= 2**31
    x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(0, v, (n,), device="cuda")
    rows = torch.tensor([0, n // 2, n - 2, n - 1], device="cuda")
    per_row = flooded_cross_entropy(x, target, flood=None, reduction="none", backend=backend)
    ref = torch.nn.functional.cross_entropy(x[rows].double(), target[rows], reduction="none")
    torch.testing.assert_close(per_row[rows].double(), ref, rtol=1e-5, atol=1e-5)
    grad_losses = torch.zeros(n, device="cuda")
    grad_losses[rows] = 1.0
    x64 = x[rows].double().requires_grad_(True)  # before the in-place backward writes the gradient over x
    x.requires_grad_(True)
    per_row = flooded_cross_entropy(x, target, flood=None, reduction="none", backend=backend, inplace_backward=True)
    per_row.backward(grad_losses)
    torch.nn.functional.cross_entropy(x64, target[rows], reduction="sum").backward()
    assert_grad_close(x.grad[rows], x64.grad, torch.bfloat16)


def _random_configuration(rng: torch.Generator, device: str):
    """One random case: shape, dtype, every option drawn independently, flood mode and reduction."""
    def draw(values):
        return values[int(torch.randint(len(values), (1,), generator=rng))]

    n, v = draw([1, 3, 17]), draw([1, 5, 130, 1000])
    dtype = draw([torch.float32, torch.bfloat16, torch.float16])
    flood, reduction = draw([("batch", "mean"), ("batch", "sum"), ("individual", "mean"), ("individual", "none"),
                             (None, "sum"), (None, "none")])
    options = {
        "ignore_index": draw([-100, 0]),
        "label_smoothing": draw([0.0, 0.25]),
        "z_loss": draw([0.0, 1e-3]),
        "softcap": draw([None, 3.0]),
        "reverse_ce": draw([0.0, 0.4]),
        "flood": flood,
        "reduction": reduction,
    }
    if draw([False, True]):
        options["weight"] = (torch.rand(v, generator=rng) + 0.25).to(device)
    if flood == "individual" and draw([False, True]):
        options["flood_level"] = (torch.rand(n, generator=rng) * 4).to(device)
    else:
        # Not 0: with V = 1 every loss is exactly 0, and the sign of |l - b| at the tie l == b is a coin toss
        # in fp32 (flood_level=0 is covered by the listed cases).
        options["flood_level"] = draw([0.5, 1.0, 30.0])
    x = (torch.randn(n, v, generator=rng) * 3).to(device=device, dtype=dtype)
    target = torch.randint(0, v, (n,), generator=rng)
    target[torch.rand(n, generator=rng) < 0.2] = options["ignore_index"]
    grad_output = draw([1.0, -2.0, 1e3])
    return x, target.to(device), grad_output, options


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("seed", range(int(os.environ.get("FLOOD_RANDOM_CASES", "16"))))
def test_random_configurations(device, backend, seed):
    """Options drawn at random together, so combinations nobody listed are checked too."""
    rng = torch.Generator().manual_seed(1000 + seed)
    x, target, grad_output, options = _random_configuration(rng, device)
    loss, raw, grad = loss_and_grad(x, target, grad_output, backend=backend, **options)
    ref_loss, ref_raw, ref_grad = reference64(x, target, grad_output, **options)
    assert_loss_close(loss, ref_loss)
    assert_loss_close(raw, ref_raw)
    assert_grad_close(grad, ref_grad, x.dtype, term_scale=row_term_scale(x, target, grad_output, **options))
