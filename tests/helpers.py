"""Shared test helpers: which (device, backend) pairs to test, the float64 reference and tolerances."""

from __future__ import annotations

import os
import random
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import pytest
import torch
from torch import Tensor

import flood_kernels
from flood_kernels import flooded_cross_entropy

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def backend_cases(with_reference: bool = False) -> List[Any]:
    """Every kernel backend usable here (and the reference, if asked), as pytest params ``(device, backend)``;
    the CUDA ones are marked ``gpu``."""
    cases = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for backend in flood_kernels.available_backends(device):
            if backend != "reference" or with_reference:
                marks = [pytest.mark.gpu] if device == "cuda" else []
                cases.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return cases


KERNEL_CASES = backend_cases()


def random_logits(n: int, v: int, device: str, dtype: torch.dtype = torch.float32, scale: float = 3.0,
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """Fresh random logits (never zeros), spread enough that probabilities are far from uniform."""
    return (torch.randn(n, v, generator=generator) * scale).to(device=device, dtype=dtype)


def random_target(n: int, v: int, device: str, ignore_fraction: float = 0.0, ignore_index: int = -100) -> Tensor:
    target = torch.randint(0, v, (n,))
    if ignore_fraction > 0:
        target[torch.rand(n) < ignore_fraction] = ignore_index
    return target.to(device)


def leaf_copy(x: Tensor) -> Tensor:
    """A leaf requiring grad with x's values, sizes, strides and storage offset: ``clone()`` would make a view
    with gaps (rows of a wider tensor) contiguous, and the kernels would never see the strided layout."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(x.shape, x.stride())) if x.numel() else 0
    storage = torch.empty(x.storage_offset() + span, dtype=x.dtype, device=x.device)
    return storage.as_strided(x.shape, x.stride(), x.storage_offset()).copy_(x.detach()).requires_grad_(True)


def loss_and_grad(x: Tensor, target: Tensor, grad_output: float = 1.0, **kwargs: Any) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, raw loss, d(grad_output * loss.sum())/dx) of ``flooded_cross_entropy`` on a leaf copy of x."""
    leaf = leaf_copy(x)
    loss, raw = flooded_cross_entropy(leaf, target, return_raw=True, **kwargs)
    (loss * grad_output).sum().backward()
    return loss.detach(), raw, leaf.grad


def reference64(x: Tensor, target: Tensor, grad_output: float = 1.0, **kwargs: Any) -> Tuple[Tensor, Tensor, Tensor]:
    """The float64 reference on exactly the same values as ``x`` (and float64 weights / levels)."""
    kwargs = dict(kwargs, backend="reference")
    for key in ("weight", "flood_level"):
        if isinstance(kwargs.get(key), Tensor):
            kwargs[key] = kwargs[key].double()
    return loss_and_grad(x.double(), target, grad_output, **kwargs)


def assert_loss_close(actual: Tensor, expected: Tensor, rtol: float = 1e-5) -> None:
    assert actual.dtype == (torch.float64 if expected.dtype == torch.float64 and actual.dtype == torch.float64
                            else torch.float32), actual.dtype
    # Absolute floor: a loss near 0 (V = 1, confident rows) is a difference of O(1) terms such as lse - z_y,
    # exact only to rtol of those terms in fp32 (the CPU kernel's vectorized exp is good to ~20 ulp).
    finite = expected[torch.isfinite(expected)]
    atol = rtol * max(finite.abs().max().item(), 1.0) if finite.numel() else 0.0
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol, equal_nan=True)


def row_term_scale(x: Tensor, target: Tensor, grad_output: float = 1.0, **kwargs: Any) -> float:
    """The size of the terms a logit's gradient is a difference of: ``max_i |d loss / d l_i|`` (grad_output,
    flood sign, denominator) times the largest coefficient of ``p`` in ``d l_i / d z``: the class weight, plus
    ``2 z_loss |lse|`` (z-loss) and ``reverse_ce * -reverse_ce_log_zero`` (reverse CE, whose ``p_y (p - e_y)``
    is up to 1). With ``p_y`` near 1 (V = 1, or a confident row) the gradient ``a p_y - b`` cancels to far below
    this, and fp32 leaves an error of a few ulps of it (GPU exp and division round differently again)."""
    from flood_kernels._flood import reduce_and_flood
    from flood_kernels._inputs import LossOptions
    from flood_kernels.reference import row_losses

    weight = kwargs.get("weight")
    level = kwargs.get("flood_level", 0.0)
    options = LossOptions(**{k: v for k, v in kwargs.items() if k not in ("weight", "flood_level", "backend")})
    weight64 = weight.double() if weight is not None else None
    losses = row_losses(x.double(), target, weight64, options.ignore_index, options.label_smoothing, options.z_loss,
                        options.softcap, options.reverse_ce, options.reverse_ce_log_zero).detach().requires_grad_()
    level64 = level.double() if isinstance(level, Tensor) else torch.tensor(float(level), dtype=torch.float64)
    loss, _ = reduce_and_flood(losses, target, weight64, options.ignore_index, options.reduction, options.flood,
                               level64.to(losses.device))
    (scale,) = torch.autograd.grad((loss * grad_output).sum(), losses)
    capped = x.double() if options.softcap is None else options.softcap * torch.tanh(x.double() / options.softcap)
    lse = torch.logsumexp(capped, dim=-1)
    lse_max = lse[torch.isfinite(lse)].abs().max().item() if torch.isfinite(lse).any() else 0.0
    coefficient = ((weight.max().item() if weight is not None else 1.0) + 2 * options.z_loss * lse_max
                   + options.reverse_ce * -options.reverse_ce_log_zero)
    return scale.abs().max().item() * coefficient


def assert_grad_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, term_scale: float = 0.0) -> None:
    """fp32: 1e-5 relative; fp16 / bf16: within one ulp of the dtype.

    The absolute floor covers fp32 cancellation in ``p_y - 1`` (a few fp32 ulps of the largest gradient, or of
    ``term_scale`` when given: see :func:`row_term_scale`) and the dtype's subnormal spacing.
    """
    assert actual.dtype == dtype
    magnitude = 0.01 + max(expected.abs().max().item(), term_scale)
    if dtype in (torch.float16, torch.bfloat16):
        info = torch.finfo(dtype)
        rtol, atol = info.eps, info.smallest_normal * info.eps + 1e-6 * magnitude
    else:
        rtol = 1e-5 if dtype == torch.float32 else 1e-10
        atol = 0.1 * rtol * magnitude
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


OPTION_SETS: Dict[str, Dict[str, Any]] = {
    "plain": {},
    "weight": {"weight": "random"},
    "label_smoothing": {"label_smoothing": 0.15},
    "weight+smoothing": {"weight": "random", "label_smoothing": 0.3},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 4.0},
    "reverse_ce": {"reverse_ce": 0.7, "reverse_ce_log_zero": -3.0},
    "ignore_index=3": {"ignore_index": 3},
    "everything": {"weight": "random", "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0,
                   "reverse_ce": 0.5, "ignore_index": 1},
}


def materialize(options: Dict[str, Any], v: int, device: str) -> Dict[str, Any]:
    """Replace the placeholder ``weight: "random"`` with fresh positive class weights."""
    options = dict(options)
    if options.get("weight") == "random":
        options["weight"] = (torch.rand(v) + 0.25).to(device)
    return options


def random_row_options(rng: random.Random, gen: torch.Generator, v: int) -> Dict[str, Any]:
    """The per-row loss options of a random configuration, each drawn with probability 0.3 (class weights, label
    smoothing, z-loss, softcap, reverse CE), and an ignore_index."""
    options: Dict[str, Any] = {}
    if rng.random() < 0.3:
        options["weight"] = torch.rand(v, generator=gen) + 0.25
    if rng.random() < 0.3:
        options["label_smoothing"] = rng.choice([0.05, 0.3, 1.0])
    if rng.random() < 0.3:
        options["z_loss"] = rng.choice([1e-4, 1e-2, 0.5])
    if rng.random() < 0.3:
        options["softcap"] = rng.choice([0.5, 4.0, 30.0])
    if rng.random() < 0.3:
        options["reverse_ce"] = rng.choice([0.1, 1.0, 5.0])
        options["reverse_ce_log_zero"] = rng.choice([-4.0, -1.0, -7.0])
    options["ignore_index"] = rng.choice([-100, -100, 0, 2])
    return options


def random_seeds(default_count: int) -> List[int]:
    """Seeds for a test's random draws: fresh ones on every run, or FLOOD_KERNELS_RANDOM_SEED and the ones after it
    (to replay a failure); FLOOD_KERNELS_RANDOM_DRAWS overrides how many."""
    count = int(os.environ.get("FLOOD_KERNELS_RANDOM_DRAWS", default_count))
    first = int(os.environ.get("FLOOD_KERNELS_RANDOM_SEED", random.SystemRandom().randrange(2**40)))
    return [first + i for i in range(count)]


def error_summary(error: AssertionError) -> str:
    """An assertion's first line and torch.testing's values and absolute difference, on one line."""
    lines = str(error).strip().splitlines()
    details = [line.strip() for line in lines[1:] if line.startswith(("Greatest absolute", "Expected", "Absolute"))]
    return "; ".join(lines[:1] + details)


def assert_draws_pass(draws: Iterable[Tuple[str, Callable[[], None]]]) -> None:
    """Run every ``(description, check)`` of a test's random draws, then fail once, naming each failing draw (its
    description holds its seed) with :func:`error_summary` of what it failed."""
    failures = []
    for description, check in draws:
        try:
            check()
        except AssertionError as error:
            failures.append(f"{description}\n    {error_summary(error)}")
    assert not failures, f"{len(failures)} of the draws differ from the reference:\n" + "\n".join(failures)


def run_without_host_sync(step: Callable[[], Any]) -> None:
    """``step()`` once to warm up (compilation and caches may synchronize), then again under CUDA's sync debug
    mode, which raises on any call that synchronizes the host with the device."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
