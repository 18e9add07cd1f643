"""Second derivatives: the fused kernels give first derivatives only, and say so instead of returning a wrong one.

A gradient penalty, a Hessian-vector product or MAML differentiates the gradient again (``create_graph=True``).
Autograd does not record the kernels, so a second derivative through their gradient would silently miss the
loss's curvature; every kernel path's backward must raise a clear error under create_graph=True, whether or not
grad_output requires grad. The reference backend (PyTorch ops) and probability targets are differentiable to any
order and must give float64 PyTorch's second derivatives.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flood_kernels import backends, flooded_cross_entropy, linear_flooded_cross_entropy
from flood_kernels._inputs import LossOptions
from flood_kernels.functional import flooded_cross_entropy_with_options

from helpers import KERNEL_CASES, random_logits, random_target

# name -> how the loss is computed: each reaches a different autograd node of the kernel backends
PATHS = {
    "reduced (flooded_loss / forward + epilogue)": dict(flood="batch", flood_level=0.5),
    "per-row losses, reduction none": dict(flood="individual", flood_level=0.5, reduction="none"),
    "single read": dict(flood="individual", flood_level=0.5, single_read=True),
    "in-place backward": dict(flood="batch", flood_level=0.5, inplace_backward=True),
    "linear": dict(flood="batch", flood_level=0.5, linear=True),
}


def _loss(x, target, backend, options):
    options = dict(options)
    if options.pop("linear", False):
        weight = torch.randn(x.shape[1], 6, dtype=x.dtype, device=x.device)
        return linear_flooded_cross_entropy(x[:, :6], weight, target, backend=backend, chunk_size=3, **options)
    single_read = options.pop("single_read", None)
    if single_read is not None:
        if not backends.has_single_read(backend):
            pytest.skip(f"{backend} has no single-read path")
        level = options.pop("flood_level")
        loss, _ = flooded_cross_entropy_with_options(x, target, LossOptions(**options), level, None, backend,
                                                     single_read=True)
        return loss
    return flooded_cross_entropy(x, target, backend=backend, **options)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("grad_output_requires_grad", [False, True])
def test_backward_with_create_graph_through_the_kernels_raises(device, backend, path, grad_output_requires_grad):
    """Raised by the backward itself: a gradient penalty through ``torch.autograd.grad(penalty, x)`` would prune an
    error node placed on the gradient (no path from it to x), and a second derivative would come out silently
    without the loss's curvature."""
    x = random_logits(7, 11, device).requires_grad_(True)
    target = random_target(7, 11, device)
    loss = _loss(x * 1.0, target, backend, PATHS[path])
    grad_output = torch.ones_like(loss, requires_grad=grad_output_requires_grad)
    with pytest.raises(RuntimeError, match="first derivatives only.*backend='reference'"):
        torch.autograd.grad(loss, x, grad_output, create_graph=True)


def _hessian_vector_product(loss_fn, x, vector):
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(leaf), leaf, create_graph=True)
    (product,) = torch.autograd.grad(grad, leaf, vector)
    return product


@pytest.mark.parametrize("flood_level", [0.5, 50.0])
def test_reference_backend_gives_pytorchs_second_derivatives(flood_level):
    """What the error message offers: the reference backend's Hessian-vector product is float64 PyTorch's, with
    every option, on both sides of the flood level."""
    x = random_logits(9, 11, "cpu").double()
    target = random_target(9, 11, "cpu", ignore_fraction=0.2)
    weight = torch.rand(11, dtype=torch.float64) + 0.5
    vector = torch.randn(9, 11, dtype=torch.float64)
    options = dict(weight=weight, label_smoothing=0.1, z_loss=1e-2, softcap=6.0)

    def one_liner(leaf):
        z = 6.0 * torch.tanh(leaf / 6.0)
        losses = F.cross_entropy(z, target, weight=weight, label_smoothing=0.1, reduction="none")
        losses = losses + torch.where(target != -100, 1e-2 * torch.logsumexp(z, 1).square(), 0.0)
        mean = losses.sum() / weight[target[target != -100]].sum()
        return (mean - flood_level).abs() + flood_level

    ours = _hessian_vector_product(
        lambda leaf: flooded_cross_entropy(leaf, target, flood_level=flood_level, backend="reference", **options),
        x, vector)
    expected = _hessian_vector_product(one_liner, x, vector)
    assert expected.abs().max() > 0
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


def test_probability_targets_give_pytorchs_second_derivatives():
    x = random_logits(6, 11, "cpu").double()
    q = torch.softmax(torch.randn(6, 11, dtype=torch.float64), dim=1)
    vector = torch.randn(6, 11, dtype=torch.float64)
    ours = _hessian_vector_product(lambda leaf: flooded_cross_entropy(leaf, q, flood_level=50.0), x, vector)
    expected = _hessian_vector_product(lambda leaf: (F.cross_entropy(leaf, q) - 50.0).abs() + 50.0, x, vector)
    assert expected.abs().max() > 0
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
