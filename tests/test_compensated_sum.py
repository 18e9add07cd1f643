"""The compensated (high, int8 low) sum of grad_W: the PyTorch spec against float64, and the Triton GEMM with the
update as its epilogue (the interpreter on CPU, the GPU where there is one) against the spec, bit for bit."""

from __future__ import annotations

import pytest
import torch

import flood_kernels  # noqa: F401  (registers the ops)
from flood_kernels import compensated_sum as spec
from flood_kernels.triton import compensated_sum as fused

from helpers import random_seeds, requires_cuda

DTYPES = [torch.bfloat16, torch.float16]
# (implementation, device): the spec runs on CPU; the Triton kernels on CPU tensors in the interpreter (small tiles,
# so that the shapes below span several tiles and row blocks) and on the GPU with the production tiles.
IMPLEMENTATIONS = [pytest.param(spec, "cpu", id="spec"), pytest.param(fused, "cpu", id="triton-cpu"),
                   pytest.param(fused, "cuda", id="triton-cuda", marks=[requires_cuda, pytest.mark.gpu])]
FUSED_DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[requires_cuda, pytest.mark.gpu])]


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at ``|x|`` (the ulp of the binade |x| rounds into), as float64."""
    a = x.abs().to(dtype)
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double()


def pair(shape, dtype, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=torch.int8, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_low_unit_is_a_256th_of_an_ulp(dtype):
    """Over the normal range of the dtype, both signs."""
    g = torch.Generator().manual_seed(random_seeds(1)[0])
    exponents = torch.randint(-14 if dtype == torch.float16 else -100, 15, (4096,), generator=g)
    x = ((torch.rand(4096, generator=g) + 1.0) * torch.pow(2.0, exponents.double())).to(dtype)
    x = torch.where(torch.rand(4096, generator=g) < 0.5, -x, x)
    torch.testing.assert_close(spec.low_unit(x).double() * 256, ulp(x, dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rounds_the_total_to_nearest_and_keeps_the_rest(dtype):
    """One addition to random pairs: high is the float32 total rounded to nearest (as torch rounds), and the pair
    is within one unit s(high) of that total (half a unit, or a unit where the clamp to +-127 cuts off 128)."""
    g = torch.Generator().manual_seed(random_seeds(1)[0])
    high = (torch.randn(8192, generator=g) * 100).to(dtype)
    low = torch.randint(-127, 128, (8192,), generator=g, dtype=torch.int8)
    addend = torch.randn(8192, generator=g) * torch.pow(10.0, torch.randint(-4, 3, (8192,), generator=g).float())
    total = spec.value(high, low) + addend
    spec.add_(high, low, addend)
    assert torch.equal(high, total.to(dtype))
    error = (spec.value(high, low).double() - total.double()).abs()
    assert bool((error <= spec.low_unit(high).double()).all()), float((error / spec.low_unit(high)).max())


@pytest.mark.parametrize("implementation, device", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_small_addends_do_not_stagnate(implementation, device, dtype):
    """1 + 512 chunks of 2**-10 (1/8 of an ulp of 1 in bfloat16, so a sum rounded to bfloat16 stays at 1): the
    pair holds every chunk and ends at exactly 1.5; the same sum in the weight's dtype is shown stuck."""
    high, low = pair((3, 2), dtype, device)
    high.fill_(1.0)
    rows = 16  # each chunk: 16 rows of 2**-7 * 2**-7, 2**-10 in all
    grad_logits = torch.full((rows, 3), 2.0 ** -7, dtype=dtype, device=device)
    h = torch.full((rows, 2), 2.0 ** -7, dtype=dtype, device=device)
    rounded = high.clone()
    for _ in range(512):
        implementation.accumulate_(high, low, grad_logits, h)
        rounded += (grad_logits.t().float() @ h.float()).to(dtype)
    implementation.finish_(high, low, None)
    assert bool((high == 1.5).all()), high
    if dtype == torch.bfloat16:
        assert bool((rounded == 1.0).all())


def random_chunks(count, rows, classes, features, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(rows, classes, generator=g) * 0.1).to(dtype).to(device),
             torch.randn(rows, features, generator=g).to(dtype).to(device)) for _ in range(count)]


@pytest.mark.parametrize("implementation, device", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_many_chunks_end_within_an_ulp_of_the_exact_sum(implementation, device, dtype):
    """24 chunks of random products. Each addition errs by at most a unit s = ulp / 256 of the running total,
    at most 2**-15 (bfloat16; float16 2**-18) of it, and the finished gradient by half an ulp more. So the
    gradient is within an ulp of the exact (float64) sum plus 2**-15 (2**-18) of the sum of the exact running
    totals' magnitudes, plus 2**-20 of the sum of |products| for float32 roundings. Sums rounded to the weight's
    dtype after every chunk (2**-8 per chunk for bfloat16) miss that bound (shown)."""
    seed = random_seeds(1)[0]
    classes, features, rows = 70, 45, 37  # odd sizes: edge tiles and a partial row block
    chunks = random_chunks(24, rows, classes, features, dtype, seed, device)
    high, low = pair((classes, features), dtype, device)
    rounded = torch.zeros(classes, features, dtype=dtype)
    exact = torch.zeros(classes, features, dtype=torch.float64)
    magnitude = torch.zeros_like(exact)
    running = torch.zeros_like(exact)
    for grad_logits, h in chunks:
        implementation.accumulate_(high, low, grad_logits, h)
        g64, h64 = grad_logits.double().cpu(), h.double().cpu()
        exact += g64.t() @ h64
        magnitude += g64.abs().t() @ h64.abs()
        running += exact.abs()
        rounded += (g64.t() @ h64).to(dtype)
    implementation.finish_(high, low, None)
    unit = 2.0 ** -(spec.HIGH_DTYPES[dtype][0] + spec.LOW_BITS)
    bound = ulp(exact, dtype) + running * unit + magnitude * 2.0 ** -20
    error = (high.double().cpu() - exact).abs()
    assert bool((error <= bound).all()), f"seed {seed}: {float((error / bound).max()):.2f} of the bound"
    assert bool(((rounded.double() - exact).abs() > bound).any())


def integer_chunks(count, rows, classes, features, dtype, seed, device):
    """Small integers: every product and every float32 sum of them is exact, whatever the summation order."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(-7, 8, (rows, classes), generator=g).to(dtype).to(device),
             torch.randint(-63, 64, (rows, features), generator=g).to(dtype).to(device)) for _ in range(count)]


@pytest.mark.parametrize("device", FUSED_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_gemm_matches_the_spec_bit_for_bit(device, dtype):
    """With exact products the GEMM's epilogue is the spec's update: the same high and low bits after each chunk
    (totals past 256 / 2048 round in bfloat16 / float16, so low is used), on strided inputs (rows of wider
    buffers), edge tiles and a partial row block; nothing past the pair is written; finish_ with a scale on the
    device gives the same bits too."""
    seed = random_seeds(1)[0]
    classes, features, rows = 70, 45, 37
    padded_high = torch.full((classes * features + 64,), float("nan"), dtype=dtype, device=device)
    padded_low = torch.full((classes * features + 64,), 99, dtype=torch.int8, device=device)
    high = padded_high[:classes * features].view(classes, features).zero_()
    low = padded_low[:classes * features].view(classes, features).zero_()
    expected_high, expected_low = pair((classes, features), dtype)
    for grad_logits, h in integer_chunks(8, rows, classes, features, dtype, seed, device):
        wide_grad = torch.zeros(rows, classes + 5, dtype=dtype, device=device)
        wide_h = torch.zeros(rows, features + 3, dtype=dtype, device=device)
        wide_grad[:, 2:classes + 2], wide_h[:, :features] = grad_logits, h
        fused.accumulate_(high, low, wide_grad[:, 2:classes + 2], wide_h[:, :features])
        spec.accumulate_(expected_high, expected_low, grad_logits.cpu(), h.cpu())
        assert torch.equal(high.cpu(), expected_high) and torch.equal(low.cpu(), expected_low), f"seed {seed}"
    assert bool(expected_low.ne(0).any())
    scale = torch.tensor([-0.37], device=device)
    fused.finish_(high, low, scale)
    spec.finish_(expected_high, expected_low, scale.cpu())
    assert torch.equal(high.cpu(), expected_high)
    assert bool(padded_high[classes * features:].isnan().all()) and bool((padded_low[classes * features:] == 99).all())


@pytest.mark.parametrize("implementation, device", IMPLEMENTATIONS)
def test_nan_and_infinity_are_kept(implementation, device):
    """A NaN in one chunk's gradient makes its class's row NaN for good; a float16 sum past its range is inf and
    stays inf; low is 0 there (never an undefined conversion of NaN)."""
    high, low = pair((4, 3), torch.float16, device)
    grad_logits = torch.ones(2, 4, dtype=torch.float16, device=device)
    h = torch.ones(2, 3, dtype=torch.float16, device=device)
    grad_logits[1, 2] = float("nan")
    implementation.accumulate_(high, low, grad_logits, h)
    grad_logits[1, 2] = 1.0
    grad_logits[:, 0] = 30000.0
    for _ in range(2):
        implementation.accumulate_(high, low, grad_logits, h)
    assert bool(high[2].isnan().all()) and bool(high[0].isinf().all())
    assert bool((low[0] == 0).all()) and bool((low[2] == 0).all())
    torch.testing.assert_close(high[1].float().cpu(), torch.full((3,), 6.0))
    implementation.finish_(high, low, torch.tensor([0.5], device=device))
    assert bool(high[2].isnan().all()) and bool(high[0].isinf().all())


@pytest.mark.parametrize("device", FUSED_DEVICES)
def test_fused_argument_errors(device):
    high, low = pair((4, 3), torch.bfloat16, device)
    grad_logits = torch.ones(2, 4, dtype=torch.bfloat16, device=device)
    h = torch.ones(2, 3, dtype=torch.bfloat16, device=device)
    with pytest.raises(TypeError, match="high must be bfloat16 or float16"):
        fused.accumulate_(high.float(), low, grad_logits, h)
    with pytest.raises(ValueError, match="low must be int8 of high's shape"):
        fused.accumulate_(high, low.short(), grad_logits, h)
    with pytest.raises(ValueError, match="must be contiguous"):
        fused.finish_(high.t(), low.t(), None)
    with pytest.raises(ValueError, match="do not make a"):
        fused.accumulate_(high, low, grad_logits[:, :3], h)
    with pytest.raises(TypeError, match="must be high's dtype"):
        fused.accumulate_(high, low, grad_logits.half(), h)


@pytest.mark.parametrize("device", FUSED_DEVICES)
def test_ops_pass_opcheck(device):
    """The two mutating torch.library ops the fused linear loss calls (schemas, fakes, no undeclared mutation)."""
    seed = random_seeds(1)[0]
    (grad_logits, h), = integer_chunks(1, 9, 7, 5, torch.bfloat16, seed, device)
    high, low = pair((7, 5), torch.bfloat16, device)
    torch.library.opcheck(torch.ops.flood_kernels.compensated_accumulate_, (high, low, grad_logits, h))
    torch.library.opcheck(torch.ops.flood_kernels.compensated_finish_,
                          (high, low, torch.tensor([0.5], device=device)))
    torch.library.opcheck(torch.ops.flood_kernels.compensated_finish_, (high, low, None))
