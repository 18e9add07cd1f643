"""The single-read path (flood_kernels/_single_read.py): loss and gradient in one pass for flood=None and
iFlood, against the float64 reference and against the two-pass path of the same backend."""

from __future__ import annotations

import pytest
import torch

from flood_kernels import _single_read, backends, flooded_cross_entropy
from flood_kernels._inputs import LossOptions
from flood_kernels.functional import flooded_cross_entropy_with_options

from helpers import (KERNEL_CASES, OPTION_SETS, assert_grad_close, assert_loss_close, leaf_copy, materialize,
                     random_logits, random_target, reference64, requires_cuda, row_term_scale)

CASES = [case for case in KERNEL_CASES if backends.has_single_read(case.values[1])]
pytestmark = pytest.mark.skipif(not CASES, reason="no backend with a single-read path usable here")
MODES = [(None, "mean"), (None, "sum"), ("individual", "mean"), ("individual", "sum")]


def run(x, target, single_read, backend, grad_output=1.0, flood=None, reduction="mean", flood_level=0.0,
        weight=None, **options):
    """(loss, raw, grad) through flooded_cross_entropy_with_options with the path forced."""
    leaf = leaf_copy(x)
    loss, raw = flooded_cross_entropy_with_options(
        leaf, target, LossOptions(flood=flood, reduction=reduction, **options), flood_level, weight, backend,
        single_read=single_read)
    (loss * grad_output).backward()
    return loss.detach(), raw, leaf.grad


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
@pytest.mark.parametrize("flood,reduction", MODES)
@pytest.mark.parametrize("grad_output", [1.0, -2.5])
def test_matches_reference_and_two_pass(device, backend, option_set, flood, reduction, grad_output):
    n, v = 13, 67
    options = materialize(OPTION_SETS[option_set], v, device)
    x = random_logits(n, v, device)
    target = random_target(n, v, device, ignore_fraction=0.2, ignore_index=options.get("ignore_index", -100))
    level = (torch.rand(n) * 8).to(device)  # per-sample levels, some above and some below l_i
    kwargs = dict(options, flood=flood, reduction=reduction, flood_level=level if flood else 0.0)
    loss, raw, grad = run(x, target, True, backend, grad_output, **kwargs)
    loss2, raw2, grad2 = run(x, target, False, backend, grad_output, **kwargs)
    ref_loss, ref_raw, ref_grad = reference64(x, target, grad_output, **kwargs)
    assert_loss_close(loss, ref_loss)
    assert_loss_close(raw, ref_raw)
    assert_grad_close(grad, ref_grad, torch.float32)
    torch.testing.assert_close(loss, loss2, rtol=1e-6, atol=1e-6)
    assert_grad_close(grad, grad2.double(), torch.float32)  # the paths compute p_c with different exps


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtypes(device, backend, dtype):
    """The gradient is rounded to the logits' dtype in the forward, then scaled by grad_output: the unscaled
    gradient is within the usual tolerance of the reference, and the scaled one is that gradient times
    grad_output rounded once more (exact for a power of two, a GradScaler's scale)."""
    n, v = 9, 300
    x = random_logits(n, v, device, dtype=dtype)
    target = random_target(n, v, device, ignore_fraction=0.2)
    kwargs = dict(flood="individual", flood_level=5.0, label_smoothing=0.1, z_loss=1e-3)
    loss, _, unscaled = run(x, target, True, backend, 1.0, **kwargs)
    ref_loss, _, ref_grad = reference64(x, target, 1.0, **kwargs)
    if dtype == torch.float64 and backend == "triton":
        # Triton passes the scalar options (here 1 - label_smoothing) as fp32 kernel arguments: ~1e-8.
        assert_loss_close(loss, ref_loss, rtol=1e-7)
        torch.testing.assert_close(unscaled, ref_grad, rtol=1e-7, atol=1e-7 * ref_grad.abs().max().item())
    else:
        assert_loss_close(loss, ref_loss, rtol=1e-5 if dtype != torch.float64 else 1e-10)
        assert_grad_close(unscaled, ref_grad.to(dtype), dtype)
    _, _, scaled = run(x, target, True, backend, 3.0, **kwargs)
    assert_grad_close(scaled, (unscaled.double() * 3.0).to(dtype), dtype)
    _, _, scaled = run(x, target, True, backend, 1024.0, **kwargs)
    torch.testing.assert_close(scaled, unscaled * 1024, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", CASES)
def test_sign_is_zero_at_the_level_and_nan_stays_nan(device, backend):
    n, v = 6, 40
    x = random_logits(n, v, device)
    x[4, 7] = float("nan")
    target = random_target(n, v, device)
    target[5] = -100
    with torch.no_grad():
        losses = flooded_cross_entropy(x, target, flood=None, reduction="none", backend=backend)
    level = losses.clone()
    level[1] += 1.0
    level[2] *= 0.5  # below the loss and still >= 0 (a loss under 1 minus 1 was a negative level: an error)
    level[4] = 0.0
    _, _, grad = run(x, target, True, backend, flood="individual", flood_level=level)
    _, _, plain = run(x, target, True, backend, flood=None)
    assert torch.equal(grad[0], torch.zeros_like(grad[0])) and torch.equal(grad[3], torch.zeros_like(grad[3]))
    torch.testing.assert_close(grad[1], -plain[1], rtol=0, atol=0)
    torch.testing.assert_close(grad[2], plain[2], rtol=0, atol=0)
    assert torch.isnan(grad[4]).all()
    assert torch.equal(grad[5], torch.zeros_like(grad[5]))  # ignored row: exact zeros


@pytest.mark.parametrize("device,backend", CASES)
def test_all_ignored_and_empty(device, backend):
    x = random_logits(4, 30, device)
    target = torch.full((4,), -100, device=device)
    for reduction in ("mean", "sum"):
        loss, _, grad = run(x, target, True, backend, reduction=reduction)
        ref_loss, _, ref_grad = reference64(x, target, reduction=reduction, flood=None)
        assert_loss_close(loss, ref_loss)
        assert torch.equal(grad, torch.zeros_like(grad)) and torch.equal(ref_grad, torch.zeros_like(ref_grad))
    loss, _, grad = run(random_logits(0, 30, device), target[:0], True, backend, reduction="sum")
    assert loss.item() == 0.0 and grad.shape == (0, 30)


@pytest.mark.parametrize("device,backend", CASES)
def test_strided_rows_and_class_dimension_layouts(device, backend):
    wide = random_logits(7, 90, device)
    x = wide[:, 5:77]  # row stride 90, V = 72
    target = random_target(7, 72, device)
    loss, _, grad = run(x, target, True, backend, flood="individual", flood_level=4.0)
    ref_loss, _, ref_grad = reference64(x, target, flood="individual", flood_level=4.0)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad.float(), torch.float32)
    images = random_logits(2 * 3 * 4, 5, device).reshape(2, 3, 4, 5).permute(0, 3, 1, 2)  # (N, C, d1, d2)
    pixel_target = random_target(2 * 3 * 4, 5, device).reshape(2, 3, 4)
    loss, _, grad = run(images, pixel_target, True, backend)
    ref_loss, _, ref_grad = reference64(images, pixel_target, flood=None)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad.float(), torch.float32)


@pytest.mark.parametrize("device,backend", CASES)
def test_backward_twice_raises_and_two_pass_does_not(device, backend):
    x = random_logits(5, 20, device).requires_grad_(True)
    target = random_target(5, 20, device)
    options = LossOptions(flood=None)
    loss, _ = flooded_cross_entropy_with_options(x, target, options, 0.0, None, backend, single_read=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot backward twice"):
        loss.backward()
    loss, _ = flooded_cross_entropy_with_options(x, target, options, 0.0, None, backend, single_read=False)
    loss.backward(retain_graph=True)
    loss.backward()


@pytest.mark.parametrize("device,backend", CASES)
def test_when_the_path_applies(device, backend):
    x = random_logits(3, 10, device)
    level = torch.zeros((), device=device)
    leaf = x.clone().requires_grad_(True)
    assert _single_read.eligible(leaf, LossOptions(flood=None), level, backend, False, True)
    assert _single_read.eligible(leaf, LossOptions(flood="individual", reduction="sum"), level, backend, False, True)
    assert not _single_read.eligible(leaf, LossOptions(flood="batch"), level, backend, False, True)
    assert not _single_read.eligible(leaf, LossOptions(flood=None, reduction="none"), level, backend, False, True)
    assert not _single_read.eligible(leaf, LossOptions(flood=None), level, backend, True, True)  # in-place asked
    assert not _single_read.eligible(x, LossOptions(flood=None), level, backend, False, True)  # no grad needed
    half = x.half().requires_grad_(True)  # float16 gradients would underflow before a GradScaler's scale
    assert not _single_read.eligible(half, LossOptions(flood=None), level, backend, False, True)
    assert not _single_read.eligible(leaf, LossOptions(flood=None), level.clone().requires_grad_(True), backend,
                                     False, True)
    assert not _single_read.eligible(leaf, LossOptions(flood=None), level, backend, False, False)
    with torch.no_grad():
        assert not _single_read.eligible(leaf, LossOptions(flood=None), level, backend, False, True)


def test_environment_policy(monkeypatch):
    leaf = torch.randn(3, 10, requires_grad=True)
    level = torch.zeros(())
    options = LossOptions(flood=None)
    monkeypatch.setenv("FLOOD_KERNELS_SINGLE_READ", "auto")
    assert _single_read.eligible(leaf, options, level, "cpu", False)
    assert not _single_read.eligible(leaf, options, level, "triton", False)  # not measured faster yet
    monkeypatch.setenv("FLOOD_KERNELS_SINGLE_READ", "1")
    assert _single_read.eligible(leaf, options, level, "triton", False)
    assert _single_read.eligible(leaf, options, level, "cuda", False) == backends.has_single_read("cuda")
    assert not _single_read.eligible(leaf, options, level, "reference", False)
    monkeypatch.setenv("FLOOD_KERNELS_SINGLE_READ", "0")
    assert not _single_read.eligible(leaf, options, level, "cpu", False)
    monkeypatch.setenv("FLOOD_KERNELS_SINGLE_READ", "yes")
    with pytest.raises(ValueError, match="FLOOD_KERNELS_SINGLE_READ"):
        _single_read.eligible(leaf, options, level, "cpu", False)


@pytest.mark.parametrize("device,backend", CASES)
def test_scale_grad_skips_the_pass_at_one(device, backend):
    ops = backends.kernel_ops(backend)
    for dtype in (torch.float32, torch.bfloat16):
        grad = torch.full((3, 50), float("nan"), device=device, dtype=dtype)
        grad[1] = 2.0
        ops.scale_grad_(grad, torch.ones((), device=device))
        assert torch.isnan(grad[0]).all() and (grad[1] == 2.0).all()
        ops.scale_grad_(grad, torch.tensor(-1.5, device=device))
        assert torch.isnan(grad[0]).all() and (grad[1] == -3.0).all()
    empty = torch.empty(0, 7, device=device)
    ops.scale_grad_(empty, torch.tensor(2.0, device=device))


@pytest.mark.parametrize("device,backend", CASES)
def test_scale_grad_covers_more_blocks_than_programs(device, backend):
    """The Triton kernel runs a few programs per SM that stride over the blocks: a gradient of more blocks than
    programs (and a ragged last block) is scaled everywhere, once (by -2: exact in every dtype and rounding)."""
    from flood_kernels.triton import cross_entropy as triton_ce

    ops = backends.kernel_ops(backend)
    for dtype in (torch.float32, torch.bfloat16):
        block, _ = triton_ce._launch_config(1 << 30, torch.tensor([], dtype=dtype).element_size())
        n_elements = 2 * triton_ce._resident_programs(torch.device(device)) * block + 1234
        grad = torch.randn(n_elements, device=device).to(dtype)
        expected = grad * -2.0
        ops.scale_grad_(grad, torch.tensor(-2.0, device=device))
        assert torch.equal(grad, expected), dtype


@pytest.mark.parametrize("device,backend", CASES)
def test_ops_pass_opcheck(device, backend):
    ops = backends.kernel_ops(backend)
    n, v = 5, 37
    x = random_logits(n, v, device)
    target = random_target(n, v, device, ignore_fraction=0.3)
    weight = (torch.rand(v) + 0.5).to(device)
    level = (torch.rand(n) * 4).to(device)
    scalars = (-100, 0.1, 1e-3, 3.0, 0.2, -4.0)
    torch.library.opcheck(ops.loss_and_grad, (x, target, weight, level, torch.tensor(0.25, device=device), True)
                          + scalars)
    torch.library.opcheck(ops.scale_grad_, (random_logits(n, v, device), torch.tensor(0.5, device=device)))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("flood", [None, "individual"])
def test_compiles_without_graph_breaks(device, backend, flood):
    x = random_logits(8, 33, device)
    target = random_target(8, 33, device, ignore_fraction=0.2)
    level = torch.full((8,), 3.0, device=device) if flood else torch.zeros((), device=device)

    def loss_fn(logits, labels):
        options = LossOptions(flood=flood)
        return flooded_cross_entropy_with_options(logits, labels, options, level, None, backend,
                                                  single_read=True)[0] * 2.0

    compiled = torch.compile(loss_fn, fullgraph=True)
    leaf = x.clone().requires_grad_(True)
    compiled(leaf, target).backward()
    ref_loss, _, ref_grad = reference64(x, target, 2.0, flood=flood, flood_level=level)
    assert_grad_close(leaf.grad, ref_grad.float(), torch.float32)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("v", [9000, 20000])
def test_masked_classes_and_infinite_logits(device, backend, v):
    """-inf classes over several chunks of the row give the reference's finite values; +inf, or a NaN among
    the -inf, gives NaN rows, as the two-pass path does. Triton: a row kept in registers (9000) and one read
    in blocks (20000)."""
    n = 4
    x = random_logits(n, v, device)
    x[:, : v - 40] = float("-inf")
    x[1, 5000:5010] = -120.0  # after a fully masked chunk: exp underflows, must not rescale 0 by inf
    target = torch.randint(v - 40, v, (n,), device=device)
    kwargs = dict(flood="individual", flood_level=0.5, z_loss=1e-3, label_smoothing=0.0)
    loss, _, grad = run(x, target, True, backend, **kwargs)
    ref_loss, _, ref_grad = reference64(x, target, **kwargs)
    assert torch.isfinite(loss)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad.float(), torch.float32)
    x[3, v - 1] = float("inf")
    x[2, 10] = float("nan")
    _, _, grad = run(x, target, True, backend, **kwargs)
    _, _, grad2 = run(x, target, False, backend, **kwargs)
    assert torch.isnan(grad[2:]).all() and torch.isfinite(grad[:2]).all()
    torch.testing.assert_close(grad, grad2, equal_nan=True, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("v", [1, 2, 4097, 8195, 300000])
def test_vocabulary_sizes(device, backend, v):
    """V = 1, just past one and two blocks / chunks, and past the CPU kernel's kept-exps limit (2**18)."""
    n = 3
    for dtype in (torch.float32, torch.bfloat16):
        x = random_logits(n, v, device, dtype=dtype)
        target = random_target(n, v, device)
        kwargs = dict(flood="individual", flood_level=4.0, label_smoothing=0.1)
        loss, _, grad = run(x, target, True, backend, **kwargs)
        ref_loss, _, ref_grad = reference64(x, target, **kwargs)
        assert_loss_close(loss, ref_loss)
        assert_grad_close(grad, ref_grad.to(dtype), dtype)


# (logits dtype, softcap, the most classes whose row Triton's loss_and_grad keeps in registers), written out
# so that a change of the budget shows here.
RESIDENT_LIMITS = [(torch.float32, False, 16384), (torch.bfloat16, False, 16384), (torch.float16, False, 16384),
                   (torch.float64, False, 4096), (torch.float32, True, 8192), (torch.bfloat16, True, 8192),
                   (torch.float16, True, 8192), (torch.float64, True, 2048)]


@pytest.mark.parametrize("dtype,softcap,limit", RESIDENT_LIMITS)
def test_triton_keeps_rows_up_to_the_register_budget(dtype, softcap, limit):
    """The configuration loss_and_grad launches with: the whole padded row in one block up to the budget, with
    at most 128 bytes of accumulators per thread, and the blocked online kernel past it."""
    triton = pytest.importorskip("triton")
    from flood_kernels.triton import cross_entropy as triton_ce

    accumulator_size = 8 if dtype == torch.float64 else 4
    for v in (1, 67, limit // 2 + 1, limit):
        row_resident, block, num_warps = triton_ce._loss_and_grad_config(v, dtype, softcap)
        assert row_resident and block == triton.next_power_of_2(v) and 1 <= num_warps <= 16, v
        assert block // (32 * num_warps) * accumulator_size <= 128, v
    for v in (limit + 1, 300000):
        row_resident, block, num_warps = triton_ce._loss_and_grad_config(v, dtype, softcap)
        assert not row_resident and (block, num_warps) == triton_ce._launch_config(v, dtype.itemsize), v
    # Rows that are not 16-aligned load element by element: a quarter of the budget (the compile check's spills);
    # none for fp64.
    unaligned_limit = 0 if dtype == torch.float64 else limit // 4
    if unaligned_limit:
        assert triton_ce._loss_and_grad_config(unaligned_limit - 1, dtype, softcap, aligned=False)[0]
    row_resident, block, num_warps = triton_ce._loss_and_grad_config(unaligned_limit + 1, dtype, softcap, False)
    assert not row_resident and (block, num_warps) == triton_ce._launch_config(unaligned_limit + 1, dtype.itemsize)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("v,option_set", [(16384, "weight+smoothing"), (16385, "weight+smoothing"),
                                          (8192, "everything"), (8193, "everything")])
def test_sizes_at_the_register_budget(device, backend, v, option_set):
    """The largest row Triton keeps in registers for fp32 and bf16 (without softcap, and with it) and one class
    more, which goes through the online kernel, against the reference; an ignored row's gradient is zero."""
    n = 3
    for dtype in (torch.float32, torch.bfloat16):
        options = dict(materialize(OPTION_SETS[option_set], v, device), z_loss=1e-3)
        x = random_logits(n, v, device, dtype=dtype)
        target = random_target(n, v, device)
        target[1] = options.get("ignore_index", -100)
        kwargs = dict(options, flood="individual", flood_level=4.0)
        loss, _, grad = run(x, target, True, backend, **kwargs)
        ref_loss, _, ref_grad = reference64(x, target, **kwargs)
        assert_loss_close(loss, ref_loss)
        assert_grad_close(grad, ref_grad.to(dtype), dtype)
        assert torch.equal(grad[1], torch.zeros_like(grad[1]))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("device,backend", [case for case in CASES if case.values[0] == "cuda"])
@pytest.mark.parametrize("dtype,v", [
    (torch.float32, 16384), (torch.float32, 16385), (torch.float32, 40001), (torch.float32, 131072),
    (torch.float32, 131073), (torch.bfloat16, 32769), (torch.bfloat16, 128256), (torch.bfloat16, 256000),
    (torch.bfloat16, 262145),
])
@pytest.mark.parametrize("strided", [False, True])
def test_resident_rows_at_cluster_boundaries(device, backend, dtype, v, strided):
    """The CUDA single-read kernel holds a row in the registers of one block (512 threads x 8 packs of 16 bytes:
    16384 fp32 / 32768 bf16 classes), or on sm_90 of a cluster of 2, 4 or 8 blocks that exchange their totals
    through distributed shared memory, and re-reads longer rows: V at and just past those sizes, odd V (rows not
    16-byte aligned), rows of a wider tensor (the gradient's alignment differs from the logits'), every option,
    ignored rows and per-sample levels on both sides of l_i; against the reference and the two-pass path."""
    n = 5
    options = materialize(OPTION_SETS["everything"], v, device)
    weight = options.pop("weight")
    level = torch.tensor([0.0, 30.0, 4.0, 0.0, 30.0], device=device)
    wide = random_logits(n, v + 3 if strided else v, device, dtype=dtype)
    target = random_target(n, v, device)
    target[3] = options["ignore_index"]  # a whole cluster skips its row: exact zeros
    losses, grads = [], []
    for single_read in (True, False):
        leaf = wide.detach().clone().requires_grad_(True)
        loss, _ = flooded_cross_entropy_with_options(
            leaf[:, -v:], target, LossOptions(flood="individual", **options),  # pylint: disable=unexpected-keyword-arg
            level, weight, backend, single_read=single_read)  # (pylint misses the pop of "weight" above)
        loss.backward()
        losses.append(loss.detach())
        grads.append(leaf.grad[:, -v:])
    x = wide[:, -v:]
    ref_loss, _, ref_grad = reference64(x, target, flood="individual", flood_level=level, weight=weight, **options)
    assert_loss_close(losses[0], ref_loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    term_scale = row_term_scale(x, target, flood="individual", flood_level=level, weight=weight, **options)
    assert_grad_close(grads[0], ref_grad.to(dtype), dtype, term_scale)
    assert_grad_close(grads[0], grads[1].double(), dtype, term_scale)
    assert torch.equal(grads[0][3], torch.zeros_like(grads[0][3]))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.skipif("cuda" not in backends.available_backends("cuda"), reason="needs the CUDA extension")
@pytest.mark.parametrize("dtype,v", [(torch.bfloat16, 65536), (torch.bfloat16, 262144), (torch.float32, 131072)])
def test_cuda_long_rows_run_in_clusters_on_sm90(dtype, v):
    """Rows longer than one block holds take the resident kernel in a cluster on sm_90 (the profiler names the
    kernel), not a silent fallback to the two-pass kernel that the results alone could not tell apart."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    x = random_logits(4, v, "cuda", dtype=dtype)
    target = random_target(4, v, "cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run(x, target, True, "cuda", flood="individual", flood_level=1.0)
        torch.cuda.synchronize()
    kernels = [event.key for event in prof.key_averages()]
    assert any("loss_and_grad_resident_kernel" in name for name in kernels), kernels
    assert not any("loss_and_grad_block_kernel" in name for name in kernels), kernels


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", [c.values[1] for c in CASES if c.values[0] == "cuda"])
def test_cuda_graph_capture(backend):
    """No host synchronization: the single-read forward and the on-device grad_output test replay inside a
    CUDA graph, with per-sample levels and grad_output changed between replays (1 skips the scaling pass)."""
    n, v = 64, 3000
    x = random_logits(n, v, "cuda").requires_grad_(True)
    target = random_target(n, v, "cuda", ignore_fraction=0.1)
    level = torch.zeros(n, device="cuda")
    grad_output = torch.ones((), device="cuda")
    options = LossOptions(flood="individual")

    def step():
        loss, _ = flooded_cross_entropy_with_options(x, target, options, level, None, backend, single_read=True)
        loss.backward(grad_output)
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        loss = step()
    for scale, levels in ((1.0, 0.0), (-3.0, 9.0)):
        grad_output.fill_(scale)
        level.copy_(torch.rand(n, device="cuda") * levels)
        graph.replay()
        torch.cuda.synchronize()
        ref_loss, _, ref_grad = reference64(x.detach(), target, scale, flood="individual", flood_level=level)
        assert_loss_close(loss.detach(), ref_loss)
        assert_grad_close(x.grad, ref_grad.float(), torch.float32)
