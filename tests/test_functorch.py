"""``torch.func`` transforms: per-sample gradients (DP-SGD, influence functions) and ``torch.func.grad``.

The kernel backends' autograd is not a functorch one, so under a transform ``backend="auto"`` runs the reference
backend (PyTorch ops); the results must be float64 PyTorch's. The fused linear loss refuses with an error that
names what to use instead.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flood_kernels import backends, flooded_cross_entropy, linear_flooded_cross_entropy

from helpers import random_logits, random_target


def _one_liner_losses(x, target, weight):
    return F.cross_entropy(x, target, weight=weight, label_smoothing=0.1, reduction="none")


def test_per_sample_gradients_with_vmap_of_grad_are_pytorchs():
    """vmap(grad(...)) over samples, each sample's iFlood loss ``|l_i - b_i| + b_i``, levels on both sides."""
    x = random_logits(10, 13, "cpu").double()
    target = random_target(10, 13, "cpu")
    weight = torch.rand(13, dtype=torch.float64) + 0.5
    levels = _one_liner_losses(x, target, weight).detach() + torch.where(torch.arange(10) % 2 == 0, 0.3, -0.3)

    def sample_loss(row, label, level):
        return flooded_cross_entropy(row[None], label[None], flood="individual", flood_level=level[None],
                                     weight=weight, label_smoothing=0.1, reduction="sum")

    ours = torch.func.vmap(torch.func.grad(sample_loss))(x, target, levels)
    expected = []
    for i in range(10):
        leaf = x[i:i + 1].clone().requires_grad_(True)
        loss = _one_liner_losses(leaf, target[i:i + 1], weight)
        ((loss - levels[i]).abs() + levels[i]).sum().backward()
        expected.append(leaf.grad[0])
    expected = torch.stack(expected)
    assert (expected.sign() != 0).any()
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("flood_level", [0.5, 50.0])
def test_func_grad_of_the_batch_loss_is_the_backward(flood_level):
    x = random_logits(9, 13, "cpu")
    target = random_target(9, 13, "cpu", ignore_fraction=0.2)
    grad = torch.func.grad(lambda logits: flooded_cross_entropy(logits, target, flood_level=flood_level))(x)
    leaf = x.clone().requires_grad_(True)
    flooded_cross_entropy(leaf, target, flood_level=flood_level, backend="reference").backward()
    torch.testing.assert_close(grad, leaf.grad, rtol=0, atol=0)


def test_auto_is_the_reference_backend_only_under_a_transform():
    seen = []
    torch.func.grad(lambda x: seen.append(backends.resolve("auto", x.device)) or x.sum())(torch.randn(3))
    assert seen == ["reference"]
    assert backends.resolve("auto", torch.device("cpu")) == backends.available_backends("cpu")[0]


def test_linear_loss_under_a_transform_names_the_alternative():
    h, w, target = torch.randn(4, 6), torch.randn(13, 6), random_target(4, 13, "cpu")
    with pytest.raises(RuntimeError, match=r"torch.func.*flooded_cross_entropy\(F.linear"):
        torch.func.grad(lambda weight: linear_flooded_cross_entropy(h, weight, target))(w)
