"""Probability targets (``nn.CrossEntropyLoss``'s floating ``target`` of the input's shape) with every flood mode.

The reference is float64 ``F.cross_entropy`` with the same probabilities, plus ``z_loss * lse**2`` and the flood
transform written out here; two identities tie the results to the fused class-index kernels: one-hot
probabilities give the class-index losses row by row, and a mixup target ``lam * e_a + (1 - lam) * e_b`` gives
``lam * l_a + (1 - lam) * l_b`` (the loss is linear in the target).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from flood_kernels import FloodedCrossEntropyLoss, flooded_cross_entropy, linear_flooded_cross_entropy

from helpers import assert_grad_close, assert_loss_close, backend_cases, random_logits, random_target

V = 13
OPTIONS = {
    "plain": {},
    "weight+smoothing": {"weight": True, "label_smoothing": 0.2},
    "z_loss+softcap": {"z_loss": 1e-2, "softcap": 3.0},
    "everything": {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0},
}
# flood, reduction, where the level is: above or below the raw loss, or per sample (iFlood)
FLOODS = [("batch", "mean", "above"), ("batch", "mean", "below"), ("batch", "sum", "below"),
          ("individual", "mean", "per-sample"), ("individual", "none", "per-sample"), (None, "mean", "none"),
          (None, "none", "none")]


def random_probabilities(shape, dim: int = 1, scale: float = 2.0) -> torch.Tensor:
    """Fresh class distributions along ``dim`` (no zeros, far from uniform)."""
    return torch.softmax(torch.randn(shape) * scale, dim=dim)


def _options(name: str, device: str = "cpu") -> dict:
    """The loss options ``name`` of OPTIONS, with fresh class weights on ``device`` where it has them."""
    options = dict(OPTIONS[name])
    if options.pop("weight", False):
        options["weight"] = (torch.rand(V) + 0.25).to(device)
    return options


def _reference_row_losses(x64: torch.Tensor, q64: torch.Tensor, weight=None, label_smoothing=0.0, z_loss=0.0,
                          softcap=None) -> torch.Tensor:
    """float64 ``F.cross_entropy`` with probabilities, reduction="none", plus the z-loss, on softcapped logits."""
    z = x64 if softcap is None else softcap * torch.tanh(x64 / softcap)
    weight64 = None if weight is None else weight.double()
    losses = F.cross_entropy(z, q64, weight=weight64, reduction="none", label_smoothing=label_smoothing)
    return losses + z_loss * torch.logsumexp(z, dim=1).square()


def _reference_flood(losses: torch.Tensor, flood, reduction: str, level) -> torch.Tensor:
    if flood == "individual":
        losses = (losses - level).abs() + level
    total = losses if reduction == "none" else losses.sum() if reduction == "sum" else losses.mean()
    return (total - level).abs() + level if flood == "batch" else total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("option_name", list(OPTIONS))
@pytest.mark.parametrize("flood,reduction,placement", FLOODS, ids=["-".join(map(str, f)) for f in FLOODS])
def test_matches_float64_pytorch_with_the_flood_transform(dtype, option_name, flood, reduction, placement):
    n = 11
    x = random_logits(n, V, "cpu", dtype=dtype)
    q = random_probabilities((n, V)).to(dtype)
    options = _options(option_name)
    raw64 = _reference_row_losses(x.double(), q.double(), **options)
    raw_total = raw64.mean() if reduction == "mean" else raw64.sum()
    level = {"above": 1.5 * raw_total.item(), "below": 0.5 * raw_total.item(), "none": 0.0,
             "per-sample": (raw64 + torch.randn(n).clamp(-1, 1)).clamp_min(0.0).float()}[placement]
    kwargs = dict(options, flood=flood, reduction=reduction, flood_level=level)

    leaf = x.clone().requires_grad_(True)
    loss, raw = flooded_cross_entropy(leaf, q, return_raw=True, **kwargs)
    grad_output = torch.randn(loss.shape, dtype=loss.dtype)
    (loss * grad_output).sum().backward()

    leaf64 = x.double().requires_grad_(True)
    level64 = level.double() if isinstance(level, torch.Tensor) else level
    expected = _reference_flood(_reference_row_losses(leaf64, q.double(), **options), flood, reduction, level64)
    (expected * grad_output.double()).sum().backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_loss_close(loss, expected.detach(), rtol=1e-10 if dtype == torch.float64 else 1e-5)
    expected_raw = raw64 if reduction == "none" else raw_total
    assert_loss_close(raw, expected_raw, rtol=1e-10 if dtype == torch.float64 else 1e-5)
    assert_grad_close(leaf.grad, leaf64.grad.to(dtype), dtype)


@pytest.mark.parametrize("shape", [(V,), (4, V), (3, V, 2, 5)], ids=["C", "NC", "NCd1d2"])
@pytest.mark.parametrize("flood,reduction", [("individual", "none"), ("batch", "mean")])
def test_layouts_of_nn_cross_entropy_loss(shape, flood, reduction):
    """``(C,)``, ``(N, C)`` and ``(N, C, d1, d2)`` with targets of the same shape; per-sample levels of the shape
    of the samples; the "none" output has F.cross_entropy's shape."""
    x = torch.randn(shape) * 3
    q = random_probabilities(shape, dim=0 if len(shape) == 1 else 1)
    plain = F.cross_entropy(x.double(), q.double(), reduction="none")
    level = (torch.rand(plain.shape) * 4) if flood == "individual" else 0.5 * plain.mean().item()
    leaf = x.clone().requires_grad_(True)
    loss = flooded_cross_entropy(leaf, q, flood=flood, reduction=reduction, flood_level=level)
    loss.sum().backward()
    leaf64 = x.double().requires_grad_(True)
    plain64 = F.cross_entropy(leaf64, q.double(), reduction="none")
    level64 = level.double() if isinstance(level, torch.Tensor) else level
    expected = _reference_flood(plain64, flood, reduction, level64)
    expected.sum().backward()
    assert loss.shape == expected.shape
    assert_loss_close(loss, expected.detach())
    assert_grad_close(leaf.grad, leaf64.grad.float(), torch.float32)


def test_module_is_a_drop_in_for_nn_cross_entropy_loss_with_probabilities():
    """flood=None: the loss and the gradients of the logits and of the target are nn.CrossEntropyLoss's; "mean"
    divides by the number of samples, not by the weights."""
    weight = torch.rand(V) + 0.25
    x = random_logits(9, V, "cpu")
    q = random_probabilities((9, V))
    results = []
    for loss_fn in (FloodedCrossEntropyLoss(flood=None, weight=weight, label_smoothing=0.05),
                    nn.CrossEntropyLoss(weight=weight, label_smoothing=0.05)):
        leaf, target = x.clone().requires_grad_(True), q.clone().requires_grad_(True)
        loss = loss_fn(leaf, target)
        loss.backward()
        results.append((loss.detach(), leaf.grad, target.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_target_gradient_carries_the_flood_sign():
    """Below the level the gradients of the logits and of the target are plain cross-entropy's, negated."""
    x = random_logits(8, V, "cpu")
    q = random_probabilities((8, V))
    grads = []
    for level in (0.0, 100.0):
        leaf, target = x.clone().requires_grad_(True), q.clone().requires_grad_(True)
        flooded_cross_entropy(leaf, target, flood_level=level).backward()
        grads.append((leaf.grad, target.grad))
    for descent, ascent in zip(*grads):
        assert descent.abs().max() > 0
        torch.testing.assert_close(ascent, -descent, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", backend_cases(with_reference=True))
@pytest.mark.parametrize("option_name", ["plain", "everything"])
def test_one_hot_probabilities_are_the_class_index_losses(device, backend, option_name):
    """Row by row, a one-hot target gives what its class index gives through the backend's fused kernels."""
    options = _options(option_name, device)
    x = random_logits(10, V, device)
    target = random_target(10, V, device)
    per_row = dict(options, flood=None, reduction="none", backend=backend)
    by_index = flooded_cross_entropy(x, target, **per_row)
    one_hot = F.one_hot(target, V).float()
    torch.testing.assert_close(flooded_cross_entropy(x, one_hot, **per_row), by_index, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_cases(with_reference=True))
def test_mixup_target_is_the_mix_of_the_two_class_index_losses(device, backend):
    """``lam * e_a + (1 - lam) * e_b`` gives ``lam * l_a + (1 - lam) * l_b`` per row (every option is linear in
    the target or does not depend on it), so iFlood of a mixup batch floods those mixed losses."""
    options = _options("everything", device)
    x = random_logits(12, V, device)
    a, b = random_target(12, V, device), random_target(12, V, device)
    lam = torch.rand(12, 1, device=device)
    mixed = lam * F.one_hot(a, V) + (1 - lam) * F.one_hot(b, V)
    per_row = dict(options, flood=None, reduction="none", backend=backend)
    expected = (lam[:, 0] * flooded_cross_entropy(x, a, **per_row)
                + (1 - lam[:, 0]) * flooded_cross_entropy(x, b, **per_row))
    torch.testing.assert_close(flooded_cross_entropy(x, mixed, **per_row), expected, rtol=1e-5, atol=1e-5)
    levels = expected.detach() + torch.where(torch.arange(12, device=device) % 2 == 0, 0.5, -0.5)
    flooded = flooded_cross_entropy(x, mixed, **dict(per_row, flood="individual", flood_level=levels))
    torch.testing.assert_close(flooded, (expected - levels).abs() + levels, rtol=1e-5, atol=1e-5)


def test_nan_logits_give_a_nan_loss():
    x = random_logits(5, V, "cpu")
    x[2, 4] = float("nan")
    q = random_probabilities((5, V))
    losses = flooded_cross_entropy(x, q, flood="individual", flood_level=0.5, reduction="none")
    assert torch.isnan(losses[2]) and torch.isfinite(losses[[0, 1, 3, 4]]).all()
    assert torch.isnan(flooded_cross_entropy(x, q, flood_level=0.5))


@pytest.mark.parametrize("override,error,message", [
    (dict(ignore_index=3), ValueError, "ignore_index"),
    (dict(reverse_ce=0.5), ValueError, "reverse_ce"),
    (dict(inplace_backward=True), ValueError, "inplace_backward"),
    (dict(target=torch.rand(6, V + 1)), ValueError, "target"),
    (dict(target=torch.rand(6)), ValueError, "target"),
    (dict(flood="individual", flood_level=torch.ones(5)), ValueError, "flood_level"),
    (dict(flood="batch", reduction="none"), ValueError, "reduction"),
    (dict(weight=torch.ones(V - 1)), ValueError, "weight"),
    (dict(backend="tpu"), ValueError, "backend"),
    (dict(flood_level=-1.0), ValueError, "flood_level"),
], ids=lambda value: None)
def test_bad_arguments_raise_naming_the_argument(override, error, message):
    kwargs = dict(override)
    target = kwargs.pop("target", random_probabilities((6, V)))
    with pytest.raises(error, match=message):
        flooded_cross_entropy(random_logits(6, V, "cpu"), target, **kwargs)


def test_linear_loss_refuses_probability_targets_naming_the_target():
    with pytest.raises(TypeError, match="target.*flooded_cross_entropy"):
        linear_flooded_cross_entropy(torch.randn(4, 6), torch.randn(V, 6), random_probabilities((4, V)))


def test_torch_compile_fullgraph_without_recompiling_for_new_levels():
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    weight = torch.rand(V) + 0.25

    @torch.compile(fullgraph=True, backend=counter)
    def loss_fn(x, q, level):
        return flooded_cross_entropy(x, q, flood_level=level, weight=weight, label_smoothing=0.1, return_raw=True)

    x = random_logits(7, V, "cpu")
    q = random_probabilities((7, V))
    for value in (0.0, 50.0):
        leaf, eager_leaf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        loss, raw = loss_fn(leaf, q, torch.tensor(value))
        loss.backward()
        expected, expected_raw = flooded_cross_entropy(eager_leaf, q, flood_level=value, weight=weight,
                                                       label_smoothing=0.1, return_raw=True)
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(raw, expected_raw, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(leaf.grad, eager_leaf.grad, rtol=1e-6, atol=1e-7)
    assert counter.frame_count == 1
