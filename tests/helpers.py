"""Shared test helpers: which (device, backend) pairs to test, the float64 reference and tolerances."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
from torch import Tensor

import flood_kernels
from flood_kernels import flooded_cross_entropy

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def kernel_cases() -> List[Any]:
    """Every kernel backend (not the reference) usable here, as pytest params ``(device, backend)``."""
    cases = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for backend in flood_kernels.available_backends(device):
            if backend != "reference":
                marks = [pytest.mark.gpu] if device == "cuda" else []
                cases.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return cases


KERNEL_CASES = kernel_cases()


def random_logits(n: int, v: int, device: str, dtype: torch.dtype = torch.float32, scale: float = 3.0,
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """Fresh random logits (never zeros), spread enough that probabilities are far from uniform."""
    return (torch.randn(n, v, generator=generator) * scale).to(device=device, dtype=dtype)


def random_target(n: int, v: int, device: str, ignore_fraction: float = 0.0, ignore_index: int = -100) -> Tensor:
    target = torch.randint(0, v, (n,))
    if ignore_fraction > 0:
        target[torch.rand(n) < ignore_fraction] = ignore_index
    return target.to(device)


def loss_and_grad(x: Tensor, target: Tensor, grad_output: float = 1.0, **kwargs: Any) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, raw loss, d(grad_output * loss.sum())/dx) of ``flooded_cross_entropy`` on a leaf copy of x."""
    leaf = x.detach().clone().requires_grad_(True)
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
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol,
                               atol=rtol * expected.abs().max().item() if expected.numel() else 0.0, equal_nan=True)


def assert_grad_close(actual: Tensor, expected: Tensor, dtype: torch.dtype) -> None:
    """fp32: 1e-5 relative; fp16 / bf16: within one ulp of the dtype.

    The absolute floor covers fp32 cancellation in ``p_y - 1`` (a few fp32 ulps of the largest gradient)
    and the dtype's subnormal spacing.
    """
    assert actual.dtype == dtype
    magnitude = 0.01 + expected.abs().max().item()
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
