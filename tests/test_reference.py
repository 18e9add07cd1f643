"""The reference backend against one-liners written directly with torch.nn.functional (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flood_kernels import flooded_cross_entropy
from flood_kernels.reference import row_losses

from helpers import random_logits, random_target


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("flood_level", [0.0, 1.0, 60.0])
def test_batch_flooding_is_the_papers_one_liner(reduction, flood_level):
    n, v = 20, 31
    x = random_logits(n, v, "cpu", torch.float64).requires_grad_(True)
    target = random_target(n, v, "cpu", ignore_fraction=0.25)
    weight = torch.rand(v, dtype=torch.float64) + 0.5
    kwargs = dict(weight=weight, reduction=reduction, label_smoothing=0.1)
    ours = flooded_cross_entropy(x, target, flood_level=flood_level, backend="reference", **kwargs)
    expected = (F.cross_entropy(x, target, **kwargs) - flood_level).abs() + flood_level
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    grad, = torch.autograd.grad(ours, x)
    expected_grad, = torch.autograd.grad(expected, x)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_individual_flooding_is_iflood(reduction):
    n, v = 20, 31
    x = random_logits(n, v, "cpu", torch.float64)
    target = random_target(n, v, "cpu", ignore_fraction=0.25)
    levels = torch.rand(n, dtype=torch.float64) * 4
    ours = flooded_cross_entropy(x, target, flood="individual", flood_level=levels, reduction=reduction,
                                 backend="reference")
    per_sample = F.cross_entropy(x, target, reduction="none")
    valid = target != -100
    flooded = torch.where(valid, (per_sample - levels).abs() + levels, 0.0)
    expected = {"mean": flooded.sum() / valid.sum(), "sum": flooded.sum(), "none": flooded}[reduction]
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_z_loss_softcap_and_reverse_ce_follow_their_formulas():
    n, v = 9, 17
    x = random_logits(n, v, "cpu", torch.float64)
    target = random_target(n, v, "cpu")
    softcap, z_loss, rho, log_zero = 2.5, 0.01, 0.4, -4.0
    capped = softcap * torch.tanh(x / softcap)
    log_probs = capped.log_softmax(-1)
    lse = capped.logsumexp(-1)
    p_target = log_probs.exp().gather(1, target[:, None]).squeeze(1)
    expected = (-log_probs.gather(1, target[:, None]).squeeze(1) + z_loss * lse**2
                + rho * -log_zero * (1 - p_target))
    ours = row_losses(x, target, None, -100, 0.0, z_loss, softcap, rho, log_zero)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_half_input_is_computed_in_float32():
    x = random_logits(6, 40, "cpu", torch.bfloat16)
    target = random_target(6, 40, "cpu")
    loss = flooded_cross_entropy(x, target, backend="reference")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), F.cross_entropy(x.double(), target), rtol=1e-6, atol=0)
