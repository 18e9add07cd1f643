"""The CPU backend's fused loss op (flood_kernels::flooded_loss): the row kernels and the O(N) epilogue in one
autograd node. The epilogue is checked against the composition of tensor ops it replaces
(flood_kernels._flood, differentiated by autograd); the whole loss against the float64 reference in
test_kernels.py and test_single_read.py, which run through this op on the cpu backend."""

from __future__ import annotations

import pytest
import torch

from flood_kernels import backends, flooded_cross_entropy
from flood_kernels._flood import mean_denominator, reduce_and_flood
from flood_kernels._ops import FLOOD_MODES

from helpers import random_logits, random_target

pytestmark = pytest.mark.skipif(not backends.has_fused_loss("cpu"), reason="needs the C++ extension's CPU ops")
ops = torch.ops.flood_kernels

FLOODS_AND_REDUCTIONS = [(flood, reduction) for flood in ("batch", "individual", None) for reduction in ("mean", "sum")]


def _row_losses(n, dtype, seed, ignore_fraction=0.25):
    """Per-row losses as the kernels give them (0 on ignored rows), their targets and class weights."""
    g = torch.Generator().manual_seed(seed)
    v = 7
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.rand(n, generator=g) < ignore_fraction] = -100
    losses = torch.where(target != -100, torch.rand(n, generator=g, dtype=torch.float64) * 4, 0.0).to(dtype)
    weight = (torch.rand(v, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return losses, target, weight


def _expected(losses, target, weight, level, flood, reduction):
    """(loss, raw, d loss / d losses) of the Python composition."""
    leaf = losses.clone().requires_grad_(True)
    loss, raw = reduce_and_flood(leaf, target, weight, -100, reduction, flood, level)
    (scale,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), raw, scale


def _epilogue(losses, target, weight, level, flood, reduction):
    return ops.flood_epilogue(losses, target, weight, level, FLOOD_MODES[flood], reduction == "mean", -100)


@pytest.mark.parametrize("flood,reduction", FLOODS_AND_REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("per_sample_levels", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_epilogue_matches_the_composition(flood, reduction, weighted, per_sample_levels, dtype):
    if per_sample_levels and flood != "individual":
        pytest.skip("per-sample levels need flood='individual'")
    for seed in range(3):
        losses, target, weight = _row_losses(50, dtype, seed)
        weight = weight if weighted else None
        level = (torch.rand(50, dtype=dtype) * 4 if per_sample_levels
                 else torch.full((), (0.5, 2.0, 9.0)[seed], dtype=dtype))
        got = _epilogue(losses, target, weight, level, flood, reduction)
        tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        for value, expected in zip(got, _expected(losses, target, weight, level, flood, reduction)):
            assert value.dtype == dtype and value.shape == expected.shape
            torch.testing.assert_close(value, expected, **tolerance)


@pytest.mark.parametrize("flood", ["batch", "individual"])
def test_epilogue_sign_is_zero_at_the_level(flood):
    """Exact ties (values chosen so every sum is exact): the flood gradient is 0 there, as torch.sign's."""
    losses = torch.tensor([0.5, 1.25, 0.0, 2.25, 0.0])
    target = torch.tensor([1, 2, -100, 0, 3])  # the last row is a valid row with a zero loss
    level = torch.tensor(1.0) if flood == "batch" else torch.tensor([0.5, 2.0, 0.0, 1.0, 0.0])
    loss, raw, scale = _epilogue(losses, target, None, level, flood, "mean")
    expected = _expected(losses, target, None, level, flood, "mean")
    assert raw.item() == 1.0
    torch.testing.assert_close((loss, raw, scale), expected, rtol=0, atol=0)
    assert (scale == 0).sum() >= (1 if flood == "individual" else 5)


@pytest.mark.parametrize("flood,reduction", FLOODS_AND_REDUCTIONS)
def test_a_nan_loss_reaches_the_loss_and_its_rows_gradient(flood, reduction):
    """The epilogue's sign at NaN is torch.sign's (0), as in the composition every other backend runs; the
    NaN still shows in the loss and in the gradient of the row it came from."""
    losses, target, weight = _row_losses(9, torch.float32, seed=4, ignore_fraction=0.0)
    losses[3] = float("nan")
    level = torch.tensor(1.0)
    got = _epilogue(losses, target, weight, level, flood, reduction)
    assert torch.isnan(got[0]) and torch.isnan(got[1])
    torch.testing.assert_close(got, _expected(losses, target, weight, level, flood, reduction), equal_nan=True)
    x = random_logits(9, 7, "cpu").requires_grad_(True)
    with torch.no_grad():
        x[3, 2] = float("nan")
    loss = flooded_cross_entropy(x, target, weight=weight, flood=flood, reduction=reduction, flood_level=1.0,
                                 backend="cpu")
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(x.grad[3]).all()


@pytest.mark.parametrize("flood,reduction", FLOODS_AND_REDUCTIONS)
@pytest.mark.parametrize("n", [0, 4])
def test_epilogue_all_rows_ignored_or_none(flood, reduction, n):
    """Like PyTorch: a mean over no rows is 0 / 0 = NaN, a sum is 0 (then flooded)."""
    losses, target = torch.zeros(n), torch.full((n,), -100)
    level = torch.tensor(0.5)
    got = _epilogue(losses, target, None, level, flood, reduction)
    torch.testing.assert_close(got, _expected(losses, target, None, level, flood, reduction), equal_nan=True)


@pytest.mark.parametrize("weighted", [False, True])
def test_mean_denominator(weighted):
    losses, target, weight = _row_losses(40, torch.float64, seed=5)
    weight = weight if weighted else None
    for dtype in (torch.float32, torch.float64):
        w = None if weight is None else weight.to(dtype)
        got = ops.mean_denominator(target, w, -100, dtype)
        assert got.dtype == dtype and got.shape == ()
        torch.testing.assert_close(got, mean_denominator(target, w, -100, dtype))


@pytest.mark.parametrize("call,error,message", [
    (lambda l, t, w, b: ops.flood_epilogue(l, t, w, b, 3, True, -100), RuntimeError, "flood_mode"),
    (lambda l, t, w, b: ops.flood_epilogue(l, t, w, b.expand(5).clone(), 1, True, -100), RuntimeError,
     "flood_level"),
    (lambda l, t, w, b: ops.flood_epilogue(l, t, w, b.double(), 1, True, -100), RuntimeError, "flood_level"),
    (lambda l, t, w, b: ops.flood_epilogue(l.reshape(5, 1), t, w, b, 1, True, -100), RuntimeError, "losses"),
    (lambda l, t, w, b: ops.flood_epilogue(l, t[:4], w, b, 1, True, -100), RuntimeError, "target"),
    (lambda l, t, w, b: ops.flood_epilogue(l, t, w.double(), b, 1, True, -100), RuntimeError, "weight"),
    (lambda l, t, w, b: ops.flood_epilogue(l, torch.tensor([0, 1, 9, 2, 3]), w, b, 1, True, -100), IndexError,
     "out of bounds"),
    (lambda l, t, w, b: ops.mean_denominator(t, w, -100, torch.float16), RuntimeError, "dtype"),
])
def test_epilogue_errors_name_the_argument(call, error, message):
    losses, target, weight = _row_losses(5, torch.float32, seed=6)
    with pytest.raises(error, match=message):
        call(losses, target, weight, torch.tensor(1.0))


@pytest.mark.parametrize("flood,single_read", [("batch", False), ("individual", False), ("individual", True),
                                               (None, False), (None, True)])
@pytest.mark.parametrize("mean", [True, False])
def test_ops_pass_opcheck(flood, single_read, mean):
    x = random_logits(6, 9, "cpu").requires_grad_(True)
    target = random_target(6, 9, "cpu")
    target[2] = -100
    weight = torch.rand(9) + 0.5
    level = torch.rand(6) * 3 if flood == "individual" else torch.tensor(1.5)
    args = (x, target, weight, level, FLOOD_MODES[flood], mean, -100, 0.1, 1e-3, 0.0, 0.2, -4.0, False, single_read)
    torch.library.opcheck(ops.flooded_loss.default, args)
    losses, _ = ops.forward(x.detach(), target, weight, -100, 0.1, 1e-3, 0.0, 0.2, -4.0, False)
    torch.library.opcheck(ops.flood_epilogue.default, (losses, target, weight, level, FLOOD_MODES[flood], mean, -100))
    torch.library.opcheck(ops.mean_denominator.default, (target, weight, -100, torch.float32))


@pytest.mark.parametrize("flood,reduction", FLOODS_AND_REDUCTIONS + [("individual", "none")])
def test_the_cpu_backend_takes_one_autograd_node(flood, reduction):
    x = random_logits(5, 12, "cpu").requires_grad_(True)
    loss = flooded_cross_entropy(x, random_target(5, 12, "cpu"), flood=flood, reduction=reduction, backend="cpu")
    assert ("FloodedLoss" in loss.grad_fn.name()) == (reduction != "none")


@pytest.mark.parametrize("flood", ["batch", "individual", None])
def test_inference_mode_runs_the_op_without_autograd(flood):
    x = random_logits(7, 30, "cpu")
    target = random_target(7, 30, "cpu", ignore_fraction=0.3)
    with torch.no_grad():
        expected = flooded_cross_entropy(x, target, flood=flood, flood_level=2.0, return_raw=True, backend="cpu")
    with torch.inference_mode():
        got = flooded_cross_entropy(x, target, flood=flood, flood_level=2.0, return_raw=True, backend="cpu")
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("single_read", ["0", "1"])
@pytest.mark.parametrize("flood", ["batch", "individual", None])
def test_the_gradient_is_handed_over_without_a_copy(single_read, flood, monkeypatch):
    """AccumulateGrad takes the kernel's gradient buffer as x.grad: no N x V copy after backward."""
    monkeypatch.setenv("FLOOD_KERNELS_SINGLE_READ", single_read)
    x = random_logits(16, 100, "cpu").requires_grad_(True)
    seen = []
    x.register_hook(lambda grad: seen.append(grad.data_ptr()))
    flooded_cross_entropy(x, random_target(16, 100, "cpu"), flood=flood, backend="cpu").backward()
    assert seen and x.grad.data_ptr() == seen[0]
