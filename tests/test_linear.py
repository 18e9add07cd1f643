"""linear_flooded_cross_entropy against F.linear + the float64 reference, on every available backend."""

from __future__ import annotations

import dataclasses
import functools
import random

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch.profiler import ProfilerActivity, profile

import flood_kernels
from flood_kernels import flooded_cross_entropy
from flood_kernels import linear
from flood_kernels._inputs import LossOptions
from flood_kernels.linear import LinearFloodedCrossEntropyLoss, default_chunk_size, linear_flooded_cross_entropy

from helpers import assert_draws_pass, random_seeds, requires_cuda, run_without_host_sync

CPU_BACKENDS = flood_kernels.available_backends("cpu")
KERNEL_BACKENDS = [name for name in CPU_BACKENDS if name != "reference"]
N, D, V = 13, 8, 11  # with chunk_size=4 the chunks are 4, 4, 4, 1 rows

# Option sets; "levels" stands for per-sample flood levels, "weights" for random class weights. With logits
# of a few units the mean loss J is about 2-4: level 0 floods below J (descent), 50 above (ascent), 2.4 splits
# the rows of iFlood between both signs.
CASES = {
    "batch": {},
    "batch-ascent": {"flood_level": 50.0},
    "batch-sum-ascent": {"reduction": "sum", "flood_level": 100.0},
    "plain-mean": {"flood": None},
    "plain-sum": {"flood": None, "reduction": "sum"},
    "plain-none": {"flood": None, "reduction": "none"},
    "iflood": {"flood": "individual", "flood_level": 2.4},
    "iflood-levels": {"flood": "individual", "flood_level": "levels"},
    "iflood-sum": {"flood": "individual", "reduction": "sum", "flood_level": 2.4},
    "iflood-none": {"flood": "individual", "reduction": "none", "flood_level": "levels"},
    "weights-smoothing": {"weight": "weights", "label_smoothing": 0.1, "flood_level": 50.0},
    "zloss-softcap": {"z_loss": 1e-2, "softcap": 3.0},
    "reverse-ce": {"reverse_ce": 0.5, "reverse_ce_log_zero": -3.0, "flood": "individual", "flood_level": 2.0},
    "everything": {"weight": "weights", "label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 2.5, "reverse_ce": 0.3,
                   "flood": "individual", "flood_level": "levels", "ignore_index": 3},
}


def make_inputs(rows=(N,), d=D, v=V, dtype=torch.float32, bias=True, ignored=2, ignore_index=-100, seed=0):
    """Random hidden states, head and targets (logits of a few units), ``ignored`` targets set to ignore_index."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*rows, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 2.0 / d ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, v, rows, generator=g)
    if ignore_index >= 0:  # a class id as ignore_index: avoid accidental extra ignored rows
        y = torch.where(y == ignore_index, (y + 1) % v, y)
    y.view(-1)[torch.randperm(y.numel(), generator=g)[:ignored]] = ignore_index
    return h, w, b, y


def resolve(options, rows, v, seed=1):
    """Replace the "levels" / "weights" placeholders of a case with random tensors."""
    g = torch.Generator().manual_seed(seed)
    options = dict(options)
    if options.get("flood_level") == "levels":
        options["flood_level"] = torch.rand(rows, generator=g) * 5.0
    if options.get("weight") == "weights":
        options["weight"] = torch.rand(v, generator=g) + 0.5
    return options


def reference(h, w, b, y, grad_output, **options):
    """Loss and gradients of flooded_cross_entropy(F.linear(...)) in float64 on the reference backend."""
    leaves = [t.detach().double().requires_grad_() for t in (h, w, b) if t is not None]
    logits = F.linear(leaves[0].reshape(-1, h.shape[-1]), leaves[1], leaves[2] if b is not None else None)
    for key in ("flood_level", "weight"):
        if isinstance(options.get(key), torch.Tensor):
            options[key] = options[key].double().reshape(-1)
    loss = flooded_cross_entropy(logits, y.reshape(-1), backend="reference", **options)
    loss = loss.reshape(y.shape) if options.get("reduction") == "none" else loss
    return loss, torch.autograd.grad(loss, leaves, grad_output.double())


def ours(h, w, b, y, grad_output, **options):
    loss = linear_flooded_cross_entropy(h, w, y, linear_bias=b, **options)
    leaves = [t for t in (h, w, b) if t is not None and t.requires_grad]
    return loss, torch.autograd.grad(loss, leaves, grad_output.to(loss.dtype))


def grad_output_for(options, shape, value=1.0, seed=2):
    if options.get("reduction") == "none":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=g, dtype=torch.float64) * 10.0
    return torch.tensor(value, dtype=torch.float64)


def assert_matches(h, w, b, y, grad_output, rtol, atol, options, **settings):
    """``settings`` (backend, chunk_size, grad_weight_accumulator) go to linear_flooded_cross_entropy only."""
    expected_loss, expected_grads = reference(h, w, b, y, grad_output, **options)
    loss, grads = ours(h, w, b, y, grad_output, **options, **settings)
    loss_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    assert loss.dtype == loss_dtype and loss.shape == expected_loss.shape
    torch.testing.assert_close(loss.double(), expected_loss, rtol=rtol, atol=atol, equal_nan=True)
    scale = max(1.0, float(grad_output.abs().max()))
    for grad, expected, leaf in zip(grads, expected_grads, [t for t in (h, w, b) if t is not None]):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
        torch.testing.assert_close(grad.double(), expected, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("chunk_size", [4, None])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_reference(backend, case, chunk_size):
    options = resolve(CASES[case], N, V)
    h, w, b, y = make_inputs(bias=list(CASES).index(case) % 2 == 0, ignore_index=options.get("ignore_index", -100))
    assert_matches(h, w, b, y, grad_output_for(options, (N,)), rtol=1e-4, atol=1e-6, backend=backend,
                   chunk_size=chunk_size, options=options)


@pytest.mark.parametrize("grad_output", [1.0, -0.7, 1e3])
@pytest.mark.parametrize("case", ["batch", "batch-ascent", "iflood-levels", "plain-sum"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_output_and_bias(backend, bias, case, grad_output):
    options = resolve(CASES[case], N, V)
    h, w, b, y = make_inputs(bias=bias)
    assert_matches(h, w, b, y, grad_output_for(options, (N,), grad_output), rtol=1e-4, atol=1e-6,
                   backend=backend, chunk_size=5, options=options)


@pytest.mark.parametrize("case", ["batch", "iflood-none", "everything"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64(backend, case):
    """Tight tolerance (the Triton softcap's tanh series is accurate to ~1e-9 in float64)."""
    options = resolve(CASES[case], N, V)
    h, w, b, y = make_inputs(dtype=torch.float64, ignore_index=options.get("ignore_index", -100))
    assert_matches(h, w, b, y, grad_output_for(options, (N,), -3.0), rtol=1e-7, atol=1e-9, backend=backend,
                   chunk_size=3, options=options)


@pytest.mark.parametrize("case", ["batch", "iflood-levels", "iflood-none"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_leading_dimensions(backend, case):
    rows = (2, 7)
    options = resolve(CASES[case], rows, V)
    h, w, b, y = make_inputs(rows=rows)
    assert_matches(h, w, b, y, grad_output_for(options, rows), rtol=1e-4, atol=1e-6, backend=backend,
                   chunk_size=4, options=options)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_single_sample_input(backend):
    h, w, b, y = make_inputs(rows=(), ignored=0)
    assert y.dim() == 0
    assert_matches(h, w, b, y, torch.tensor(1.0, dtype=torch.float64), rtol=1e-4, atol=1e-6, options={},
                   backend=backend)


@pytest.mark.parametrize("chunk_size", [1, 13, 64])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_chunk_sizes(backend, chunk_size):
    h, w, b, y = make_inputs()
    assert_matches(h, w, b, y, torch.tensor(1.0, dtype=torch.float64), rtol=1e-4, atol=1e-6, options={},
                   backend=backend, chunk_size=chunk_size)


@pytest.mark.parametrize("case", ["batch", "plain-sum", "iflood", "plain-none"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_ignored(backend, case):
    """Like PyTorch: NaN for a mean over no rows, 0 for sum; the gradients are zero either way."""
    options = resolve(CASES[case], N, V)
    h, w, b, y = make_inputs(ignored=N)
    assert_matches(h, w, b, y, grad_output_for(options, (N,)), rtol=1e-4, atol=1e-6, backend=backend,
                   chunk_size=4, options=options)


@pytest.mark.parametrize("accumulator", linear.GRAD_WEIGHT_ACCUMULATORS)
@pytest.mark.parametrize("case", ["batch", "iflood-none"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bfloat16(backend, case, accumulator):
    options = resolve(CASES[case], N, V)
    h, w, b, y = make_inputs(dtype=torch.bfloat16)
    assert_matches(h, w, b, y, grad_output_for(options, (N,)), rtol=2e-2, atol=2e-2, backend=backend,
                   chunk_size=4, grad_weight_accumulator=accumulator, options=options)


def assert_compensated_grad_weight_as_accurate_as_float32(device, backend, flood_level=0.5):
    """grad_W of bfloat16 inputs over 64 one-row chunks, per accumulator, its error norm relative to the float64
    gradient of the same values: the compensated pair's within 5% of float32 accumulation's, bfloat16 rounding
    after every chunk at least twice that."""
    rows, d, v = 64, 24, 40
    h, w, b, y = make_inputs(rows=(rows,), d=d, v=v, dtype=torch.bfloat16, bias=False, ignored=0)
    h, w, y = (t.to(device) for t in (h, w, y))
    _, (_, expected) = reference(h, w, None, y, torch.tensor(1.0, dtype=torch.float64), flood_level=flood_level)
    errors = {}
    for accumulator in linear.GRAD_WEIGHT_ACCUMULATORS:
        w_leaf = w.detach().requires_grad_()
        linear_flooded_cross_entropy(h.detach(), w_leaf, y, flood_level=flood_level, backend=backend, chunk_size=1,
                                     grad_weight_accumulator=accumulator).backward()
        errors[accumulator] = float((w_leaf.grad.double() - expected).norm() / expected.norm())
    assert errors["compensated"] <= 1.05 * errors["float32"], errors
    assert errors["weight_dtype"] >= 2.0 * errors["float32"], errors


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compensated_grad_weight_is_as_accurate_as_float32(backend):
    """64 chunks: grad_W summed in the compensated pair (1 byte per weight) has the error of float32 accumulation
    (4 bytes), which is the rounding of the bfloat16 gradient chunks themselves; rounded to bfloat16 after every
    chunk the error is several times that."""
    assert_compensated_grad_weight_as_accurate_as_float32("cpu", backend)


@pytest.mark.parametrize("case", ["batch", "plain-none"])
@pytest.mark.parametrize("frozen", ["input", "linear_weight"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_frozen_input_or_weight(backend, frozen, case):
    options = resolve(CASES[case], N, V)
    h, w, b, y = make_inputs()
    (h if frozen == "input" else w).requires_grad_(False)
    grad_output = grad_output_for(options, (N,))
    expected_loss, expected_grads = reference(h, w, b, y, grad_output, **options)
    loss, grads = ours(h, w, b, y, grad_output, backend=backend, chunk_size=4, **options)
    assert len(grads) == 2
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-4, atol=1e-6)
    expected = expected_grads[1:] if frozen == "input" else expected_grads[::2]
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_grad_forward(backend):
    h, w, b, y = make_inputs()
    with torch.no_grad():
        loss = linear_flooded_cross_entropy(h, w, y, linear_bias=b, flood_level=50.0, backend=backend, chunk_size=4)
    expected, _ = reference(h, w, b, y, torch.tensor(1.0, dtype=torch.float64), flood_level=50.0)
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tied_embeddings(backend):
    """The head is also the input embedding: both uses contribute to its gradient."""
    g = torch.Generator().manual_seed(3)
    emb = (torch.randn(V, D, generator=g) / D ** 0.5).requires_grad_()
    proj = (torch.randn(D, D, generator=g)).requires_grad_()
    ids, y = torch.randint(0, V, (N,), generator=g), torch.randint(0, V, (N,), generator=g)

    def run(e, p, loss_fn):
        loss = loss_fn(torch.tanh(e[ids] @ p), e, y)
        return loss, torch.autograd.grad(loss, (e, p))

    loss, grads = run(emb, proj, lambda h, e, t: linear_flooded_cross_entropy(
        h, e, t, flood_level=1.0, backend=backend, chunk_size=4))
    expected_loss, expected_grads = run(emb.detach().double().requires_grad_(), proj.detach().double().requires_grad_(),
                                        lambda h, e, t: flooded_cross_entropy(F.linear(h, e), t, flood_level=1.0,
                                                                              backend="reference"))
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-6)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["batch", "iflood-none"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_uninitialized_memory_never_leaks(backend, case, monkeypatch):
    """Every buffer from torch.empty / empty_like is NaN: each element must be written before it is read."""
    options = resolve(CASES[case], N, V)
    h, w, b, y = make_inputs()
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(float("nan")))
    assert_matches(h, w, b, y, grad_output_for(options, (N,)), rtol=1e-4, atol=1e-6, backend=backend,
                   chunk_size=4, options=options)


@pytest.mark.parametrize("case", ["batch-ascent", "batch-sum-ascent", "iflood-levels", "iflood-none"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph(backend, case):
    """Kernel backends trace without graph breaks (the reference backend's torch.autograd.grad does not)."""
    torch._dynamo.reset()
    compiled = torch.compile(linear_flooded_cross_entropy, fullgraph=True, backend="aot_eager")
    assert_step_matches(compiled, *make_inputs(), resolve(CASES[case], N, V), backend)


def assert_step_matches(loss_fn, h, w, b, y, options, backend):
    """Loss and gradients of ``loss_fn`` (linear_flooded_cross_entropy, compiled) at grad_output -1.5 (per row for
    reduction="none"), chunks of 4 rows, against the float64 reference."""
    grad_output = grad_output_for(options, y.shape, value=-1.5)
    loss = loss_fn(h, w, y, linear_bias=b, backend=backend, chunk_size=4, **options)
    grads = torch.autograd.grad(loss, (h, w, b), grad_output.to(loss.dtype))
    expected_loss, expected_grads = reference(h, w, b, y, grad_output, **options)
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-6)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device, backend", [pytest.param("cpu", name, id=f"cpu-{name}") for name in KERNEL_BACKENDS]
                         + [pytest.param("cuda", "triton", id="cuda-triton", marks=[requires_cuda, pytest.mark.gpu])])
def test_torch_compile_fullgraph_compensated(device, backend):
    """bfloat16 with the compensated grad_W: its two ops trace without graph breaks, and the compiled step gives
    the eager step's bits."""
    torch._dynamo.reset()
    h, w, b, y = (t.to(device) for t in make_inputs(dtype=torch.bfloat16))
    h, w, b = (t.detach().requires_grad_() for t in (h, w, b))
    settings = {"linear_bias": b, "backend": backend, "chunk_size": 4, "grad_weight_accumulator": "compensated",
                "flood_level": 50.0}
    compiled = torch.compile(linear_flooded_cross_entropy, fullgraph=True, backend="aot_eager")
    results = [(loss, torch.autograd.grad(loss, (h, w, b))) for loss in (fn(h, w, y, **settings) for fn in
                                                                          (linear_flooded_cross_entropy, compiled))]
    (eager_loss, eager_grads), (loss, grads) = results
    assert torch.equal(loss, eager_loss)
    for grad, expected in zip(grads, eager_grads):
        assert torch.equal(grad, expected)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("case", ["batch", "iflood-none"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast(backend, case, compiled):
    """Under autocast the head runs in autocast's dtype as ``F.linear`` does: float32 operands, bfloat16 matmuls,
    a float32 loss and float32 gradients, those of the bfloat16-rounded operands."""
    if compiled and backend == "reference":
        pytest.skip("the reference backend's torch.autograd.grad breaks the graph")
    torch._dynamo.reset()
    options = resolve(CASES[case], N, V)
    h, w, b, y = make_inputs()
    grad_output = grad_output_for(options, (N,))
    loss_fn = linear_flooded_cross_entropy
    if compiled:
        loss_fn = torch.compile(linear_flooded_cross_entropy, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(h, w, y, linear_bias=b, backend=backend, chunk_size=4, **options)
    grads = torch.autograd.grad(loss, (h, w, b), grad_output.to(loss.dtype))
    rounded = [t.detach().to(torch.bfloat16) for t in (h, w, b)]
    expected_loss, expected_grads = reference(*rounded, y, grad_output, **options)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected_loss, rtol=2e-2, atol=2e-2)
    scale = max(1.0, float(grad_output.abs().max()))
    for grad, expected in zip(grads, expected_grads):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad.double(), expected, rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.parametrize("case", ["batch-ascent", "iflood-levels", "iflood-none"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_dynamic_rows_compiles_once(backend, case):
    """Under dynamic shapes a new number of rows never recompiles (the chunk loops run inside the two ops, not in
    the graph), on the fused path and on reduction="none"'s recomputing backward, and each size is right."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(linear_flooded_cross_entropy, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for rows in (5, 13, 22):  # 2, 4 and 6 chunks of up to 4 rows, the last one partial
        h, w, b, y = make_inputs(rows=(rows,), seed=rows)
        options = resolve(CASES[case], rows, V, seed=rows)
        if rows == 5:  # an eager call first: the backends' lookup tables fill on first use
            linear_flooded_cross_entropy(h, w, y, linear_bias=b, backend=backend, chunk_size=4, **options)
        assert_step_matches(compiled, h, w, b, y, options, backend)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[-1] == frames[0]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_chunked_passes(backend, reduction):
    """torch.library.opcheck of the two chunked ops: schema, fake tensors (dynamic shapes included) and
    AOT dispatch, with every gradient, with only grad_W and with the compensated accumulator."""
    h, w, b, y = (t.detach() for t in make_inputs())
    options = dataclasses.replace(LossOptions(), flood="individual", reduction=reduction, label_smoothing=0.1)
    level = torch.rand(N) * 5.0
    for needs, accumulator, dtype in (([True, True, True], "float32", torch.float32),
                                      ([False, True, False], "float32", torch.float32),
                                      ([True, True, True], "compensated", torch.bfloat16)):
        hd, wd, bd = (t.to(dtype) for t in (h, w, b))
        arguments = linear._op_arguments(options, backend, 4, accumulator, needs)
        assert arguments == dataclasses.astuple(options) + (backend, 4, accumulator, needs)  # the ops' order
        forward_args = (hd, wd, bd, y, None, level, *arguments)
        torch.library.opcheck(torch.ops.flood_kernels.linear_chunked_forward.default, forward_args)
        if reduction == "none":
            lse = torch.ops.flood_kernels.linear_chunked_forward(*forward_args)[1]
            lse = lse if lse.numel() else None
            backward_args = (hd, wd, bd, y, None, lse, torch.randn(N), *arguments)
            torch.library.opcheck(torch.ops.flood_kernels.linear_chunked_backward.default, backward_args)


def test_second_backward_raises_unless_recomputed():
    h, w, b, y = make_inputs()
    loss = linear_flooded_cross_entropy(h, w, y, linear_bias=b, chunk_size=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    rows = linear_flooded_cross_entropy(h, w, y, flood=None, reduction="none", chunk_size=4)
    first = torch.autograd.grad(rows.sum(), h, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(rows.sum(), h)[0], first)


def test_module_matches_function_and_logs_raw_loss():
    h, w, b, y = make_inputs()
    levels = torch.rand(N) * 5.0
    module = LinearFloodedCrossEntropyLoss(flood_level=levels, flood="individual", label_smoothing=0.1, chunk_size=4)
    assert list(module.parameters()) == [] and "chunk_size=4" in repr(module)
    loss = module(h, w, y, b)
    expected, raw = linear_flooded_cross_entropy(h, w, y, linear_bias=b, flood_level=levels, flood="individual",
                                                 label_smoothing=0.1, chunk_size=4, return_raw=True)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(module.last_raw_loss, raw)
    assert not module.last_raw_loss.requires_grad


def test_default_chunk_size():
    assert default_chunk_size(128256, 2) == 1024
    assert default_chunk_size(256000, 2) == 512
    assert default_chunk_size(128256, 4) == 512
    assert default_chunk_size(1 << 30, 4) == 1
    assert default_chunk_size(V, 4) & (default_chunk_size(V, 4) - 1) == 0
    # Near a full GPU: half the free memory, as a power of two of rows, never below one row.
    assert default_chunk_size(128256, 2, free_bytes=1 << 40) == 1024
    assert default_chunk_size(128256, 2, free_bytes=100 * 2**20) == 128
    assert default_chunk_size(128256, 2, free_bytes=0) == 1
    assert default_chunk_size(128256, 2, free_bytes=-5) == 1


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("accumulator, sum_bytes", [("float32", 4), ("compensated", 3), ("weight_dtype", 2)])
def test_cuda_default_chunk_size_follows_the_free_memory(accumulator, sum_bytes, monkeypatch):
    """A chunk may use what the driver reports free plus what torch's allocator holds unused, less the buffers
    still to come: grad_W's sum (bf16 weight: float32 4 bytes, compensated 2 + 1, weight_dtype 2), a float32 V and
    the bf16 grad_input. The driver's answers are recorded, so other processes (parallel test workers) cannot
    move the expectation."""
    h = torch.empty(8192, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.empty(128256, 64, device="cuda", dtype=torch.bfloat16)
    driver_free, query = [], torch.cuda.mem_get_info

    def recorded_query(*args):
        answer = query(*args)
        driver_free.append(answer[0])
        return answer

    monkeypatch.setattr(torch.cuda, "mem_get_info", recorded_query)
    unused = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    buffers = w.numel() * sum_bytes + w.shape[0] * 4 + h.numel() * 2
    assert linear._free_bytes_for_chunks(h, w, accumulator) == driver_free[-1] + unused - buffers
    chunk = linear._check_chunk_size(None, h, w, accumulator)
    assert chunk == default_chunk_size(128256, 2, driver_free[-1] + unused - buffers) and chunk > 1


def _peak_cpu_bytes(fn) -> int:
    """Peak of the bytes held by torch's CPU allocator during ``fn()``, from the profiler's alloc/free events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def test_peak_memory_stays_below_the_logits():
    rows, d, v = 512, 16, 4096
    h, w, b, y = make_inputs(rows=(rows,), d=d, v=v)
    logits_bytes = rows * v * 4

    def fused():
        linear_flooded_cross_entropy(h, w, y, linear_bias=b, backend="reference", chunk_size=16).backward()

    def eager():
        flooded_cross_entropy(F.linear(h, w, b), y, backend="reference").backward()

    assert _peak_cpu_bytes(eager) >= logits_bytes  # the measurement sees the logits when they exist
    assert _peak_cpu_bytes(fused) < logits_bytes / 4


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the C++ extension's kernels")
@pytest.mark.parametrize("compiler", [None, "aot_eager", "inductor"])
@pytest.mark.parametrize("case", ["batch", "plain-none"])
def test_peak_memory_is_one_chunk_of_logits(case, compiler):
    """The kernel writes the gradient over the chunk's logits, and a chunk is freed before the next one exists:
    beyond the gradients, one chunk of logits (and vectors of N or V) at a time; under torch.compile too, where
    the chunk loops run inside the ops (unrolled into the graph, all 16 chunks' logits were alive at once)."""
    rows, d, v, chunk = 512, 16, 4096, 32
    options = resolve(CASES[case], rows, v)
    h, w, b, y = make_inputs(rows=(rows,), d=d, v=v)
    grad_output = grad_output_for(options, (rows,)).float()
    torch._dynamo.reset()
    loss_fn = linear_flooded_cross_entropy
    if compiler is not None:
        loss_fn = torch.compile(linear_flooded_cross_entropy, fullgraph=True, backend=compiler)

    def fused():
        loss_fn(h, w, y, linear_bias=b, backend="cpu", chunk_size=chunk, **options).backward(grad_output)

    fused()  # compiled before the measurement

    gradients_bytes = (h.numel() + w.numel() + b.numel()) * 4
    chunk_bytes = chunk * v * 4
    assert _peak_cpu_bytes(fused) - gradients_bytes < 1.25 * chunk_bytes


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the C++ extension's kernels")
@pytest.mark.parametrize("accumulator, weight_bytes, backward_weight_bytes", [
    ("float32", 4, 2), ("compensated", 3, 0), ("weight_dtype", 2, 0)])
def test_cpu_peak_memory_is_one_chunk_and_the_accumulators(accumulator, weight_bytes, backward_weight_bytes,
                                                           monkeypatch):
    """The CUDA test's accounting on CPU, for bfloat16 weights: forward holds grad_W's sum and grad_b, grad_input and
    one chunk of logits; backward adds only the bfloat16 grad_W returned from a float32 sum. CPU has no
    mixed-precision GEMM or in-kernel casts, so its float32 products and elementwise steps go a slice at a time;
    the slices are shrunk here (a 256 KiB product, 16 Ki elements) so that the slack, 1 byte per weight (measured
    use: 0.5 to 0.6), holds them and the kernel's buffers, and a temporary of the whole grad_W (4 to 20 bytes per
    weight before the slicing) fails."""
    monkeypatch.setattr(linear.compensated_sum, "_VOCAB_SLICE_BYTES", 1 << 18)
    monkeypatch.setattr(linear.compensated_sum, "_ELEMENTWISE_SLICE", 1 << 14)
    rows, d, v, chunk = 128, 256, 4096, 32
    h, w, b, y = make_inputs(rows=(rows,), d=d, v=v, dtype=torch.bfloat16)
    losses = []

    def forward():
        losses.append(linear_flooded_cross_entropy(h, w, y, linear_bias=b, backend="cpu", chunk_size=chunk,
                                                   grad_weight_accumulator=accumulator))

    slack = w.numel()
    forward_extra = _peak_cpu_bytes(forward)
    accumulators_bytes = w.numel() * weight_bytes + b.numel() * 4
    assert forward_extra <= accumulators_bytes + h.numel() * 2 + chunk * v * 2 + slack
    assert _peak_cpu_bytes(losses[0].backward) <= w.numel() * backward_weight_bytes + slack


@pytest.mark.parametrize("case, match, error", [
    ({"linear_weight": torch.randn(V, D + 1)}, r"linear_weight must have shape \(V, 8\)", ValueError),
    ({"linear_weight": torch.randn(D)}, "linear_weight must have shape", ValueError),
    ({"linear_weight": torch.randn(V, D, dtype=torch.float64)}, "linear_weight has dtype", TypeError),
    ({"linear_weight": torch.randn(V, D, device="meta")}, "linear_weight is on meta", ValueError),
    ({"linear_weight": [[1.0]]}, "linear_weight must be a tensor", TypeError),
    ({"linear_bias": torch.randn(V + 1)}, r"linear_bias must have shape \(11,\)", ValueError),
    ({"linear_bias": torch.randn(V, dtype=torch.float64)}, "linear_bias has dtype", TypeError),
    ({"linear_bias": 1.0}, "linear_bias must be a tensor", TypeError),
    ({"input": torch.ones(N, D, dtype=torch.int64)}, "input must be a floating-point", TypeError),
    ({"input": torch.tensor(1.0)}, "input must have shape", ValueError),
    ({"target": torch.zeros(N + 1, dtype=torch.int64)}, "target has shape", ValueError),
    ({"target": torch.zeros(N)}, "target must hold integer", TypeError),
    ({"chunk_size": 0}, "chunk_size must be >= 1", ValueError),
    ({"chunk_size": 2.0}, "chunk_size must be an int", TypeError),
    ({"chunk_size": True}, "chunk_size must be an int", TypeError),
    ({"grad_weight_accumulator": True}, "grad_weight_accumulator must be one of", ValueError),
    ({"grad_weight_accumulator": "fp32"}, "grad_weight_accumulator must be one of", ValueError),
    ({"reduction": "avg"}, "reduction must be one of", ValueError),
    ({"reduction": "none"}, "reduction='none' is undefined with flood='batch'", ValueError),
    ({"flood_level": -1.0}, "flood_level must be >= 0", ValueError),
    ({"flood_level": torch.ones(N)}, "needs flood='individual'", ValueError),
    ({"weight": torch.ones(V + 1)}, r"weight must have shape \(11,\)", ValueError),
    ({"label_smoothing": 1.5}, "label_smoothing must be in", ValueError),
    ({"backend": "gpu"}, "backend must be one of", ValueError),
])
def test_validation_errors(case, match, error):
    h, w, b, y = make_inputs()
    arguments = {"input": h, "linear_weight": w, "target": y, "linear_bias": b, **case}
    with pytest.raises(error, match=match):
        linear_flooded_cross_entropy(arguments.pop("input"), arguments.pop("linear_weight"), arguments.pop("target"),
                                     **arguments)


def to_cuda(tensors):
    return [t.detach().cuda().requires_grad_(t.requires_grad) if t.is_floating_point() else t.cuda() for t in tensors]


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["batch", "iflood-levels", "iflood-none", "everything"])
def test_cuda_triton_bfloat16(case):
    rows, d, v = 1000, 256, 32000
    options = resolve(CASES[case], rows, v)
    options = {k: x.cuda() if isinstance(x, torch.Tensor) else x for k, x in options.items()}
    h, w, b, y = to_cuda(make_inputs(rows=(rows,), d=d, v=v, dtype=torch.bfloat16, ignored=50,
                                     ignore_index=options.get("ignore_index", -100)))
    grad_output = grad_output_for(options, (rows,)).cuda()
    assert_matches(h, w, b, y, grad_output, rtol=2e-2, atol=2e-3, backend="triton", chunk_size=384, options=options)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("accumulator, weight_bytes, backward_weight_bytes", [
    ("float32", 4, 2), ("compensated", 3, 0), ("weight_dtype", 2, 0)])
def test_cuda_peak_memory_is_one_chunk_and_the_accumulators(accumulator, weight_bytes, backward_weight_bytes):
    """Forward (which computes the gradients) holds grad_W's sum (float32: 4 bytes per weight; compensated: the
    bfloat16 gradient and the int8 low part; weight_dtype: the gradient), grad_b in float32 (in bfloat16 for
    weight_dtype, counted as 4 bytes), grad_input and one chunk of logits; backward adds only the bfloat16 grad_W
    it returns from a float32 sum (the others finish in place). 8 MiB of slack: vectors of N or V and the
    allocator's rounding."""
    rows, d, v, chunk = 4096, 512, 32000, 512
    h, w, b, y = to_cuda(make_inputs(rows=(rows,), d=d, v=v, dtype=torch.bfloat16))

    def forward():
        return linear_flooded_cross_entropy(h, w, y, linear_bias=b, backend="triton", chunk_size=chunk,
                                            grad_weight_accumulator=accumulator)

    forward().backward()  # warm-up: the cuBLAS workspace and the kernels' compilation stay out of the measurement
    h.grad = w.grad = b.grad = None
    slack = 8 << 20
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = forward()
    torch.cuda.synchronize()
    forward_extra = torch.cuda.max_memory_allocated() - base
    accumulators_bytes = w.numel() * weight_bytes + b.numel() * 4
    assert forward_extra <= accumulators_bytes + h.numel() * 2 + chunk * v * 2 + slack
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss.backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= w.numel() * backward_weight_bytes + slack


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_compensated_grad_weight_is_as_accurate_as_float32(backend):
    """The fused Triton GEMM's pair against cuBLAS's float32 accumulator, as on CPU."""
    if backend not in flood_kernels.available_backends("cuda"):
        pytest.skip(f"the {backend} backend is not available")
    assert_compensated_grad_weight_as_accurate_as_float32("cuda", backend)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("accumulator", ["float32", "compensated"])
@pytest.mark.parametrize("case", ["batch", "iflood", "plain-none"])
def test_cuda_no_host_synchronization(case, accumulator):
    """Chunking, the row factors and the backward's scale stay on the device (sync debug mode raises on any
    synchronizing call), with the usual Python-number level."""
    rows, d, v = 300, 64, 1000
    options = resolve(CASES[case], rows, v)
    h, w, b, y = to_cuda(make_inputs(rows=(rows,), d=d, v=v, dtype=torch.bfloat16, ignored=20))
    grad_output = grad_output_for(options, (rows,)).float().cuda()

    def step():
        loss = linear_flooded_cross_entropy(h, w, y, linear_bias=b, chunk_size=128, grad_weight_accumulator=accumulator,
                                            **options)
        loss.backward(grad_output)

    run_without_host_sync(step)


def draw_linear_case(seed: int):
    """A random configuration of the fused linear loss: leading shape, D, V, dtype, every option, flood mode and
    level kind, bias, chunk size, fp32 accumulation and grad_output; levels never 0 (see
    tests/test_random_configurations.py). V >= 2: at V = 1 every gradient is a cancellation to exactly 0, whose
    float32 rounding scales with the option coefficients, not with any tolerance of the values (the row kernels'
    V = 1 cases are in tests/test_kernels.py)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    rows = rng.choice([(1,), (5,), (13,), (2, 7), (3, 1, 4)])
    n = int(torch.Size(rows).numel())
    d, v = rng.choice([1, 3, 8, 16]), rng.choice([2, 5, 17, 40])
    dtype = rng.choice([torch.float32, torch.float32, torch.float64])
    options = {"ignore_index": rng.choice([-100, 0]), "flood": rng.choice([None, "batch", "individual"])}
    options["reduction"] = rng.choice(["mean", "sum"] + (["none"] if options["flood"] != "batch" else []))
    if rng.random() < 0.3:
        options["weight"] = (torch.rand(v, generator=g) + 0.25).to(dtype)
    if rng.random() < 0.3:
        options["label_smoothing"] = rng.choice([0.05, 0.3])
    if rng.random() < 0.3:
        options["z_loss"] = rng.choice([1e-3, 0.1])
    if rng.random() < 0.3:
        options["softcap"] = rng.choice([1.0, 5.0])
    if rng.random() < 0.3:
        options["reverse_ce"] = rng.choice([0.3, 2.0])
    if options["flood"] == "individual" and rng.random() < 0.5:
        options["flood_level"] = (torch.rand(rows, generator=g) * 3 + 0.1).to(dtype)
    else:
        options["flood_level"] = rng.choice([0.5, 1.0, 3.0, 30.0])
    settings = {"chunk_size": rng.choice([None, 1, 2, 3, n, n + 2]),
                "grad_weight_accumulator": rng.choice(linear.GRAD_WEIGHT_ACCUMULATORS)}
    h, w, b, y = make_inputs(rows=rows, d=d, v=v, dtype=dtype, bias=rng.random() < 0.5,
                             ignored=rng.choice([0, 0, 1, n]), ignore_index=options["ignore_index"], seed=seed)
    grad_output = grad_output_for(options, rows, rng.choice([1.0, -0.5, 2.0]), seed=seed)
    shown = {key: (f"tensor{tuple(value.shape)}" if isinstance(value, torch.Tensor) else value)
             for key, value in options.items()}
    description = f"seed {seed}: rows {rows} D={d} V={v} {dtype} bias {b is not None} {settings} {shown}"
    return h, w, b, y, grad_output, options, settings, description


def check_linear_case(case, backend: str) -> None:
    """A :func:`draw_linear_case` against F.linear + the float64 reference: each result within rtol of itself or a
    tenth of rtol of its tensor's largest value (the random options, reverse CE coefficients up to 8 and sums over
    rows, make some elements small differences of large terms)."""
    h, w, b, y, grad_output, options, settings, _ = case
    rtol = 1e-7 if h.dtype == torch.float64 else 1e-4
    expected_loss, expected_grads = reference(h, w, b, y, grad_output, **options)
    loss, grads = ours(h, w, b, y, grad_output, backend=backend, **options, **settings)
    assert [t.dtype for t in grads] == [t.dtype for t in (h, w, b) if t is not None]
    for got, want in zip((loss.detach(), *grads), (expected_loss.detach(), *expected_grads)):
        magnitude = max(1.0, float(torch.nan_to_num(want, nan=0.0).abs().max()))
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0.1 * rtol * magnitude, equal_nan=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_random_configurations(backend):
    """Random configurations, fresh every run (the seed of each failing draw is in the message;
    FLOOD_KERNELS_RANDOM_SEED / FLOOD_KERNELS_RANDOM_DRAWS replay one)."""
    cases = (draw_linear_case(seed) for seed in random_seeds(20 if backend == "triton" else 150))
    assert_draws_pass((case[-1], functools.partial(check_linear_case, case, backend)) for case in cases)
