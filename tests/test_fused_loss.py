"""The O(N) epilogue as one op (reduction, flood transform, d loss / d l_i) and the CPU backend's fused loss
op (flood_kernels::flooded_loss: the row kernels and the epilogue in one autograd node).

Each epilogue (the C++ CPU op; the Triton kernel, which the GPU backends use, on CUDA or in Triton's
interpreter) is checked against the composition of tensor ops it replaces (flood_kernels._flood,
differentiated by autograd); the whole loss against the float64 reference in test_kernels.py and
test_single_read.py, which run through these ops."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flood_kernels import _ops, available_backends, backends, flooded_cross_entropy
from flood_kernels._flood import mean_denominator, reduce_and_flood
from flood_kernels._ops import FLOOD_MODES

from helpers import random_logits, random_target, requires_cuda

ops = torch.ops.flood_kernels
HAS_FUSED_CPU = backends.has_fused_loss("cpu")
requires_fused_cpu = pytest.mark.skipif(not HAS_FUSED_CPU, reason="needs the C++ extension's CPU ops")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU, Triton's interpreter
TRITON_MARKS = [pytest.mark.gpu] if TRITON_DEVICE == "cuda" else []


def _epilogues():
    cases = []
    if HAS_FUSED_CPU:
        cases.append(pytest.param(("cpu", ops.flood_epilogue.default), id="cpu"))
    if "triton" in available_backends(TRITON_DEVICE):
        cases.append(pytest.param((TRITON_DEVICE, _ops.TRITON_OPS.flood_epilogue), id="triton", marks=TRITON_MARKS))
    return cases


EPILOGUES = _epilogues()

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


def _epilogue(epilogue, losses, target, weight, level, flood, reduction):
    """Run one epilogue implementation on its device; results back on the CPU."""
    device, op = epilogue
    moved = [None if t is None else t.to(device) for t in (losses, target, weight, level)]
    results = op(*moved, FLOOD_MODES[flood], reduction == "mean", -100)
    return tuple(r.cpu() for r in results)


@pytest.mark.parametrize("flood,reduction", FLOODS_AND_REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("per_sample_levels", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [50, 5000])  # one block iteration of the small configuration; two of the large
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_epilogue_matches_the_composition(epilogue, n, flood, reduction, weighted, per_sample_levels, dtype):
    if per_sample_levels and flood != "individual":
        pytest.skip("per-sample levels need flood='individual'")
    for seed in range(3):
        losses, target, weight = _row_losses(n, dtype, seed)
        weight = weight if weighted else None
        level = (torch.rand(n, dtype=dtype) * 4 if per_sample_levels
                 else torch.full((), (0.5, 2.0, 9.0)[seed], dtype=dtype))
        got = _epilogue(epilogue, losses, target, weight, level, flood, reduction)
        # Both sum in their own order: fp32 sums of n terms agree to ~sqrt(n) ulps.
        rtol = (1e-6 if n <= 50 else 1e-5) if dtype == torch.float32 else 1e-12
        tolerance = dict(rtol=rtol, atol=rtol)
        for value, expected in zip(got, _expected(losses, target, weight, level, flood, reduction)):
            assert value.dtype == dtype and value.shape == expected.shape
            torch.testing.assert_close(value, expected, **tolerance)


@pytest.mark.parametrize("flood", ["batch", "individual"])
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_epilogue_sign_is_zero_at_the_level(epilogue, flood):
    """Exact ties (values chosen so every sum is exact): the flood gradient is 0 there, as torch.sign's."""
    losses = torch.tensor([0.5, 1.25, 0.0, 2.25, 0.0])
    target = torch.tensor([1, 2, -100, 0, 3])  # the last row is a valid row with a zero loss
    level = torch.tensor(1.0) if flood == "batch" else torch.tensor([0.5, 2.0, 0.0, 1.0, 0.0])
    loss, raw, scale = _epilogue(epilogue, losses, target, None, level, flood, "mean")
    expected = _expected(losses, target, None, level, flood, "mean")
    assert raw.item() == 1.0
    torch.testing.assert_close((loss, raw, scale), expected, rtol=0, atol=0)
    assert (scale == 0).sum() >= (1 if flood == "individual" else 5)


@pytest.mark.parametrize("flood,reduction", FLOODS_AND_REDUCTIONS)
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_a_nan_loss_reaches_the_loss_and_its_rows_gradient(epilogue, flood, reduction):
    """The epilogue's sign at NaN is torch.sign's (0), as in the composition every other backend runs; the
    NaN still shows in the loss and in the gradient of the row it came from."""
    losses, target, weight = _row_losses(9, torch.float32, seed=4, ignore_fraction=0.0)
    losses[3] = float("nan")
    level = torch.tensor(1.0)
    got = _epilogue(epilogue, losses, target, weight, level, flood, reduction)
    assert torch.isnan(got[0]) and torch.isnan(got[1])
    torch.testing.assert_close(got, _expected(losses, target, weight, level, flood, reduction), equal_nan=True)
    device, op = epilogue
    x = random_logits(9, 7, device).requires_grad_(True)
    with torch.no_grad():
        x[3, 2] = float("nan")
    loss = flooded_cross_entropy(x, target.to(device), weight=weight.to(device), flood=flood, reduction=reduction,
                                 flood_level=1.0, backend="cpu" if op is ops.flood_epilogue.default else "triton")
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(x.grad[3]).all()


@pytest.mark.parametrize("flood,reduction", FLOODS_AND_REDUCTIONS)
@pytest.mark.parametrize("n", [0, 4])
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_epilogue_all_rows_ignored_or_none(epilogue, flood, reduction, n):
    """Like PyTorch: a mean over no rows is 0 / 0 = NaN, a sum is 0 (then flooded)."""
    losses, target = torch.zeros(n), torch.full((n,), -100)
    level = torch.tensor(0.5)
    got = _epilogue(epilogue, losses, target, None, level, flood, reduction)
    torch.testing.assert_close(got, _expected(losses, target, None, level, flood, reduction), equal_nan=True)


@requires_fused_cpu
@pytest.mark.parametrize("weighted", [False, True])
def test_mean_denominator(weighted):
    losses, target, weight = _row_losses(40, torch.float64, seed=5)
    weight = weight if weighted else None
    for dtype in (torch.float32, torch.float64):
        w = None if weight is None else weight.to(dtype)
        got = ops.mean_denominator(target, w, -100, dtype)
        assert got.dtype == dtype and got.shape == ()
        torch.testing.assert_close(got, mean_denominator(target, w, -100, dtype))


@requires_fused_cpu
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


@requires_fused_cpu
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


@requires_fused_cpu
@pytest.mark.parametrize("flood,reduction", FLOODS_AND_REDUCTIONS + [("individual", "none")])
def test_the_cpu_backend_takes_one_autograd_node(flood, reduction):
    x = random_logits(5, 12, "cpu").requires_grad_(True)
    loss = flooded_cross_entropy(x, random_target(5, 12, "cpu"), flood=flood, reduction=reduction, backend="cpu")
    assert ("FloodedLoss" in loss.grad_fn.name()) == (reduction != "none")


@requires_fused_cpu
@pytest.mark.parametrize("flood", ["batch", "individual", None])
def test_inference_mode_runs_the_op_without_autograd(flood):
    x = random_logits(7, 30, "cpu")
    target = random_target(7, 30, "cpu", ignore_fraction=0.3)
    with torch.no_grad():
        expected = flooded_cross_entropy(x, target, flood=flood, flood_level=2.0, return_raw=True, backend="cpu")
    with torch.inference_mode():
        got = flooded_cross_entropy(x, target, flood=flood, flood_level=2.0, return_raw=True, backend="cpu")
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@requires_fused_cpu
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


def _gpu_backend_cases():
    device = TRITON_DEVICE
    names = [b for b in available_backends(device) if b in ("triton", "cuda")]
    return [pytest.param(device, name, id=f"{device}-{name}", marks=TRITON_MARKS) for name in names]


@pytest.mark.parametrize("device,backend", _gpu_backend_cases())
@pytest.mark.parametrize("flood,reduction", FLOODS_AND_REDUCTIONS + [("individual", "none")])
def test_gpu_backends_run_the_epilogue_as_one_op(device, backend, flood, reduction, monkeypatch):
    """One autograd node for the reduction and flood (the Triton epilogue), on the two-pass and the
    single-read path; reduction="none" keeps the per-row tensor ops."""
    for single_read in ("0", "1"):
        monkeypatch.setenv("FLOOD_KERNELS_SINGLE_READ", single_read)
        x = random_logits(5, 12, device).requires_grad_(True)
        loss = flooded_cross_entropy(x, random_target(5, 12, device), flood=flood, reduction=reduction,
                                     backend=backend)
        takes_epilogue = reduction != "none" and (single_read == "0" or flood == "batch")
        assert ("flood_epilogue" in loss.grad_fn.name()) == takes_epilogue, loss.grad_fn.name()


@pytest.mark.skipif("triton" not in available_backends(TRITON_DEVICE), reason="needs Triton")
@pytest.mark.parametrize("flood", [pytest.param(flood, marks=TRITON_MARKS) for flood in ("batch", "individual", None)])
def test_triton_epilogue_passes_opcheck(flood):
    losses, target, weight = _row_losses(40, torch.float32, seed=7)
    level = torch.rand(40) * 3 if flood == "individual" else torch.tensor(1.5)
    args = [t.to(TRITON_DEVICE) for t in (losses, target, weight, level)]
    args[0].requires_grad_(True)
    torch.library.opcheck(_ops.TRITON_OPS.flood_epilogue, (*args, FLOOD_MODES[flood], True, -100))


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_epilogue_reads_per_sample_levels_with_their_stride(epilogue):
    """Levels that are a column of a wider tensor (strided) give what their contiguous copy gives."""
    losses, target, weight = _row_losses(3000, torch.float32, seed=8)
    levels = torch.rand(3000, 7) * 4
    got = _epilogue(epilogue, losses, target, weight, levels[:, 3], "individual", "mean")
    expected = _expected(losses, target, weight, levels[:, 3].contiguous(), "individual", "mean")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.gpu
def test_triton_epilogue_reads_levels_past_2_31_elements():
    """Per-sample levels that are a column of a (65536, 40000) float32 tensor (10.5 GB), whose last rows lie past
    2**31 elements from the first: with their stride, ``row * stride`` in int32 wrapped to a negative offset, which
    the launcher avoids by making the levels contiguous (O(N)); this checks the whole path end to end."""
    rows, stride = 1 << 16, 40000
    if torch.cuda.mem_get_info()[0] < rows * stride * 4 * 1.25:
        pytest.skip("needs about 13 GB of free GPU memory")
    wide = torch.empty(rows, stride, device="cuda")
    levels = wide[:, stride - 1]
    levels.copy_(torch.rand(rows, device="cuda") * 4)
    losses, target, weight = _row_losses(rows, torch.float32, seed=9)
    got = _epilogue(("cuda", _ops.TRITON_OPS.flood_epilogue), losses, target, weight, levels, "individual", "mean")
    expected = _expected(losses, target, weight, levels.cpu(), "individual", "mean")
    del wide, levels
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.gpu
def test_epilogue_row_limit():
    """Beyond one program's comfortable row count the GPU backends go back to the tensor ops."""
    assert backends.epilogue_op("triton", 1 << 16) is not None
    assert backends.epilogue_op("triton", (1 << 16) + 1) is None
    assert backends.epilogue_op("reference", 10) is None


class _RecordOps(TorchDispatchMode):
    """The ops that reach a backend (views and aliases excluded): on a GPU, each is a kernel launch."""

    _VIEWS = ("view", "expand", "detach", "as_strided", "alias", "t", "reshape", "_unsafe_view")

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if not (name.startswith("aten::") and name.split("::")[1] in self._VIEWS):
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def _ops_per_step(device, backend, flood):
    x = random_logits(64, 300, device).requires_grad_(True)
    target = random_target(64, 300, device, ignore_fraction=0.2)
    with _RecordOps() as record:
        flooded_cross_entropy(x, target, flood=flood, flood_level=0.5, backend=backend).backward()
    return record.names


@pytest.mark.parametrize("device,backend", _gpu_backend_cases())
@pytest.mark.parametrize("flood", ["batch", "individual", None])
def test_a_training_step_is_six_device_ops_on_gpu_backends(device, backend, flood, monkeypatch):
    """The level, the row kernel, the epilogue; grad_output, its product with the saved scale, the gradient
    kernel (it was 12 to 23 with the epilogue as tensor ops). A launch-bound classifier pays for each."""
    monkeypatch.setenv("FLOOD_KERNELS_SINGLE_READ", "0")
    names = _ops_per_step(device, backend, flood)
    prefix = "flood_kernels::triton_" if backend == "triton" else "flood_kernels::"
    assert names == ["aten::full", prefix + "forward", "flood_kernels::triton_flood_epilogue", "aten::ones_like",
                     "aten::mul", prefix + "backward"], names


@requires_fused_cpu
@pytest.mark.parametrize("flood", ["batch", "individual", None])
def test_a_training_step_is_a_few_ops_on_the_cpu_backend(flood, monkeypatch):
    monkeypatch.setenv("FLOOD_KERNELS_SINGLE_READ", "0")
    assert _ops_per_step("cpu", "cpu", flood) == [
        "aten::full", "flood_kernels::forward", "flood_kernels::flood_epilogue", "aten::ones_like", "aten::mul",
        "flood_kernels::backward"]
    if flood != "batch":  # the single-read path: the gradient is written in forward
        monkeypatch.setenv("FLOOD_KERNELS_SINGLE_READ", "1")
        assert _ops_per_step("cpu", "cpu", flood) == [
            "aten::full", "flood_kernels::mean_denominator", "aten::reciprocal", "flood_kernels::loss_and_grad",
            "flood_kernels::flood_epilogue", "aten::ones_like", "flood_kernels::scale_grad_"]
