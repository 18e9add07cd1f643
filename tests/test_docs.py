"""The numbers that docs/using_flooding.md gives for choosing b are what the loss computes."""

from __future__ import annotations

import os
import re

import torch

from flood_kernels import flooded_cross_entropy

GUIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs", "using_flooding.md")


def guide() -> str:
    with open(GUIDE, encoding="utf-8") as file:
        return " ".join(file.read().split())  # claims may wrap lines


def rounds_to(value: float, stated: str) -> bool:
    """``value`` printed with as many decimals as ``stated`` has gives ``stated``."""
    decimals = len(stated.split(".")[1]) if "." in stated else 0
    return f"{value:.{decimals}f}" == stated


def test_noise_entropy_examples():
    """`r = 0.2, K = 2`: `H = 0.500`: the least expected cross-entropy under symmetric label noise, i.e. the loss of
    the predictor that outputs the noisy-label distribution itself, averaged over that distribution."""
    claims = re.findall(r"`r = ([\d.]+), K = (\d+)`: `H = ([\d.]+)`", guide())
    assert len(claims) >= 2
    for rate, classes, stated in claims:
        rate, classes = float(rate), int(classes)
        noisy = torch.full((classes,), rate / (classes - 1), dtype=torch.float64)
        noisy[0] = 1 - rate  # the true class is 0
        logits = noisy.log().expand(classes, classes)
        losses = flooded_cross_entropy(logits, torch.arange(classes), flood=None, reduction="none",
                                       backend="reference")
        entropy = float(losses @ noisy)
        assert rounds_to(entropy, stated), (rate, classes, entropy, stated)


def test_label_smoothing_floor_examples():
    """(1.01 at `eps = 0.1, V = 1000`; 1.36 at `V = 32000`): the label-smoothed loss at its minimum, the prediction
    equal to the smoothed targets, which a small move of the logits only raises."""
    claims = re.findall(r"\(([\d.]+) at `eps = ([\d.]+), V = (\d+)`; ([\d.]+) at `V = (\d+)`\)", guide())
    assert claims
    for first, eps, first_v, second, second_v in claims:
        eps = float(eps)
        for stated, classes in ((first, int(first_v)), (second, int(second_v))):
            smoothed = torch.full((classes,), eps / classes, dtype=torch.float64)
            smoothed[0] += 1 - eps
            logits = smoothed.log()[None]
            target = torch.zeros(1, dtype=torch.long)
            floor = float(flooded_cross_entropy(logits, target, flood=None, label_smoothing=eps, backend="reference"))
            assert rounds_to(floor, stated), (eps, classes, floor, stated)
            moved = logits + 1e-2 * torch.randn(logits.shape, dtype=torch.float64)
            assert float(flooded_cross_entropy(moved, target, flood=None, label_smoothing=eps,
                                               backend="reference")) > floor
