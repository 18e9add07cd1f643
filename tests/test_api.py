"""Public API: argument checking, the module, backend selection, return_raw and torch.compile."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch import nn

import flood_kernels
from flood_kernels import (FloodedCrossEntropyLoss, LinearFloodedCrossEntropyLoss, available_backends,
                           flooded_cross_entropy)
from flood_kernels._inputs import LossOptions

from helpers import backend_cases, random_logits, random_target


def _inputs(n=6, v=10):
    return random_logits(n, v, "cpu"), random_target(n, v, "cpu")


BAD_ARGUMENTS = [
    (dict(input=torch.randint(0, 3, (4, 10))), TypeError, "input"),
    (dict(target=torch.rand(6)), ValueError, "target"),  # probabilities need the input's shape
    (dict(target=torch.ones(6, dtype=torch.bool)), TypeError, "target"),
    (dict(target=torch.zeros(5, dtype=torch.long)), ValueError, "target"),
    (dict(input=torch.tensor(1.0)), ValueError, "input"),
    (dict(flood="sometimes"), ValueError, "flood"),
    (dict(reduction="max"), ValueError, "reduction"),
    (dict(reduction="none"), ValueError, "reduction='none'"),
    (dict(flood_level=-0.1), ValueError, "flood_level"),
    (dict(flood_level=float("inf")), ValueError, "flood_level"),
    (dict(flood_level=float("nan")), ValueError, "flood_level"),
    (dict(flood_level=torch.tensor(-1.0)), ValueError, "flood_level"),
    (dict(flood_level=torch.ones(6)), ValueError, "flood='individual'"),
    (dict(flood="individual", flood_level=torch.ones(5)), ValueError, "flood_level"),
    (dict(flood_level="high"), TypeError, "flood_level"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(reverse_ce=-1.0), ValueError, "reverse_ce"),
    (dict(reverse_ce_log_zero=0.5), ValueError, "reverse_ce_log_zero"),
    (dict(weight=torch.ones(9)), ValueError, "weight"),
    (dict(weight=torch.ones(10, dtype=torch.long)), TypeError, "weight"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(backend="tpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("override,error,message", BAD_ARGUMENTS, ids=[f"{i}" for i in range(len(BAD_ARGUMENTS))])
def test_bad_arguments_raise_naming_the_argument(override, error, message):
    x, target = _inputs()
    kwargs = dict(override)
    x = kwargs.pop("input", x)
    target = kwargs.pop("target", target)
    with pytest.raises(error, match=message.replace("(", r"\(").replace("'", ".")):
        flooded_cross_entropy(x, target, **kwargs)


def test_module_is_a_drop_in_for_cross_entropy_loss():
    x, target = _inputs(12, 7)
    target[3] = 2
    weight = torch.rand(7) + 0.5
    for kwargs in (dict(), dict(weight=weight, ignore_index=2, label_smoothing=0.2, reduction="sum"),
                   dict(reduction="none")):
        ours = FloodedCrossEntropyLoss(flood=None, **kwargs)(x, target)
        theirs = nn.CrossEntropyLoss(**kwargs)(x, target)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_module_records_raw_loss_and_floods():
    x, target = _inputs()
    loss_fn = FloodedCrossEntropyLoss(flood_level=100.0)
    loss = loss_fn(x.requires_grad_(True), target)
    raw = F.cross_entropy(x.detach(), target)
    torch.testing.assert_close(loss_fn.last_raw_loss, raw)
    assert not loss_fn.last_raw_loss.requires_grad
    torch.testing.assert_close(loss.detach(), 200.0 - raw)


def test_module_buffers_follow_the_module():
    level = torch.tensor(0.5)
    loss_fn = FloodedCrossEntropyLoss(flood_level=level, weight=torch.ones(10)).to(torch.float64)
    assert set(loss_fn.state_dict()) == {"weight", "flood_level"}
    loss_fn.flood_level.fill_(3.0)
    x, target = _inputs()
    raw = F.cross_entropy(x, target)
    torch.testing.assert_close(loss_fn(x, target), (raw.double() - 3.0).abs().float() + 3.0)


def test_return_raw():
    x, target = _inputs()
    loss, raw = flooded_cross_entropy(x, target, flood_level=50.0, return_raw=True)
    torch.testing.assert_close(raw, F.cross_entropy(x, target))
    torch.testing.assert_close(loss, 100.0 - raw)


@pytest.mark.gpu  # selected with the GPU tests (gpu_session.sh runs -m gpu); skipped where nothing is expected
def test_expected_backends_are_built():
    """FLOOD_KERNELS_EXPECT_BACKENDS="cuda:triton,cuda" (what benchmarks/gpu_session.sh sets) turns a backend
    that failed to build or load, whose test cases would otherwise just not be generated, into a failure."""
    expected = os.environ.get("FLOOD_KERNELS_EXPECT_BACKENDS")
    if not expected:
        pytest.skip("FLOOD_KERNELS_EXPECT_BACKENDS is not set")
    for item in expected.split(";"):
        device, names = item.split(":")
        missing = set(names.split(",")) - set(available_backends(device))
        assert not missing, f"backends {sorted(missing)} are not available for {device} tensors"


def test_available_backends_and_explicit_choice():
    cpu = available_backends("cpu")
    assert cpu[-1] != "auto" and "reference" in cpu
    assert ("triton" in cpu) == (os.environ.get("TRITON_INTERPRET") == "1" and flood_kernels._ops.TRITON_OPS is not None)
    x, target = _inputs()
    if "cpu" not in cpu:
        with pytest.raises(RuntimeError, match="pip install"):
            flooded_cross_entropy(x, target, backend="cpu")
    with pytest.raises(RuntimeError, match="cuda"):
        flooded_cross_entropy(x, target, backend="cuda")
    auto = flooded_cross_entropy(x, target, flood_level=0.3)
    reference = flooded_cross_entropy(x, target, flood_level=0.3, backend="reference")
    torch.testing.assert_close(auto, reference)


def _compile_cases():
    """(device, backend, compiler): every backend through AOT autograd, and "auto" through inductor."""
    cases = []
    for case in backend_cases(with_reference=True):
        device, backend = case.values
        cases.append(pytest.param(device, backend, "aot_eager", id=f"{case.id}-aot_eager", marks=case.marks))
        if backend == "reference":  # every device has it: "auto" once per device
            cases.append(pytest.param(device, "auto", "inductor", id=f"{device}-auto-inductor", marks=case.marks))
    return cases


@pytest.mark.parametrize("device,backend,compiler", _compile_cases())
def test_torch_compile_fullgraph_without_recompiling_for_new_levels(device, backend, compiler):
    """AOT autograd traces the ops through their fakes; a new level value in the tensor never recompiles."""
    torch._dynamo.reset()
    model = nn.Linear(8, 20).to(device)
    level = torch.tensor(0.0, device=device)
    counter = CompileCounterWithBackend(compiler)

    @torch.compile(fullgraph=True, backend=counter)
    def step(h, target, level):
        loss, raw = flooded_cross_entropy(model(h), target, flood_level=level, return_raw=True, backend=backend,
                                          inplace_backward=True)
        per_sample = flooded_cross_entropy(model(h), target, flood="individual", flood_level=level,
                                           reduction="none", backend=backend)
        total = flooded_cross_entropy(model(h), target, flood=None, reduction="sum", backend=backend)
        return loss, raw, per_sample, total

    h = torch.randn(16, 8, device=device)
    target = random_target(16, 20, device, ignore_fraction=0.2)
    for value in (0.0, 50.0):
        level.fill_(value)
        model.zero_grad()
        loss, raw, per_sample, total = step(h, target, level)
        (loss + per_sample.sum() + 0.1 * total).backward()
        compiled_grad = model.weight.grad.clone()
        model.zero_grad()
        expected = (F.cross_entropy(model(h), target) - value).abs() + value
        plain = F.cross_entropy(model(h), target, reduction="none")
        expected_per_sample = torch.where(target != -100, (plain - value).abs() + value, 0.0)
        expected_total = F.cross_entropy(model(h), target, reduction="sum")
        (expected + expected_per_sample.sum() + 0.1 * expected_total).backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(per_sample, expected_per_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled_grad, model.weight.grad, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.parametrize("device,backend", backend_cases(with_reference=True))
def test_torch_compile_dynamic_batch_size_compiles_once(device, backend):
    """Under dynamic shapes nothing in the op stack specializes on N (a new batch size never recompiles)."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(fullgraph=True, dynamic=True, backend=counter)
    def loss_fn(x, target, level):
        return flooded_cross_entropy(x, target, flood_level=level, inplace_backward=True, backend=backend)

    frames = []
    for n in (8, 16, 33):
        x = random_logits(n, 40, device).requires_grad_(True)
        target = random_target(n, 40, device)
        loss = loss_fn(x * 1.0, target, torch.tensor(1.5, device=device))
        loss.backward()
        expected = (F.cross_entropy(x.detach(), target) - 1.5).abs() + 1.5
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[-1] == frames[0]


@pytest.mark.parametrize("module_class", [FloodedCrossEntropyLoss, LinearFloodedCrossEntropyLoss])
def test_loss_options_are_attributes_like_nn_cross_entropy_loss(module_class):
    """Code that reads ``criterion.ignore_index`` or sets ``criterion.reduction`` works as with nn.CrossEntropyLoss;
    an assignment is validated like the constructor's arguments, and a refused one changes nothing."""
    ours = module_class(flood=None, ignore_index=3, reduction="sum", label_smoothing=0.2)
    theirs = nn.CrossEntropyLoss(ignore_index=3, reduction="sum", label_smoothing=0.2)
    for name in ("ignore_index", "reduction", "label_smoothing"):
        assert getattr(ours, name) == getattr(theirs, name)
    ours.reduction, ours.z_loss, ours.flood = "mean", 1e-3, "individual"
    assert ours.options == LossOptions(flood="individual", ignore_index=3, reduction="mean", label_smoothing=0.2,
                                       z_loss=1e-3)
    with pytest.raises(ValueError, match="reduction"):
        ours.reduction = "max"
    with pytest.raises(ValueError, match="reduction='none'"):
        module_class(flood="batch").reduction = "none"
    assert ours.reduction == "mean"


def test_assigned_reduction_is_the_one_used():
    x, target = _inputs()
    loss_fn, plain = FloodedCrossEntropyLoss(flood=None), nn.CrossEntropyLoss()
    for reduction in ("sum", "none"):
        loss_fn.reduction = plain.reduction = reduction
        torch.testing.assert_close(loss_fn(x, target), plain(x, target), rtol=1e-5, atol=1e-6)
