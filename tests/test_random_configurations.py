"""Random configurations against the float64 reference: every option, flood mode, level kind, reduction, layout,
dtype, stride, grad_output and in-place backward drawn together.

The parametrized tests take each option alone and a few fixed combinations; this test walks the rest of the space a
little at a time, with fresh draws on every run. A failure names the seed of each failing draw; rerun one with
``FLOOD_KERNELS_RANDOM_SEED=<seed> FLOOD_KERNELS_RANDOM_DRAWS=1``. ``FLOOD_KERNELS_RANDOM_DRAWS=<n>`` runs n draws
per backend instead of the default (fewer under Triton's interpreter, which is slow).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any, Dict

import pytest
import torch
from torch import Tensor

from flood_kernels import flooded_cross_entropy

from helpers import (KERNEL_CASES, assert_draws_pass, assert_grad_close, assert_loss_close, leaf_copy,
                     random_row_options, random_seeds, reference64, row_term_scale)

pytestmark = pytest.mark.skipif(not KERNEL_CASES, reason="no kernel backend usable on this machine")


@dataclass
class Draw:
    """One configuration: the logits and target, the loss options and what the caller does with the loss."""
    logits: Tensor
    target: Tensor
    options: Dict[str, Any]
    grad_output: float
    inplace_backward: bool
    description: str


def draw(seed: int, device: str) -> Draw:
    """The configuration of ``seed``. Flood levels are never 0: a V = 1 row's loss is exactly 0 in float64 and a
    rounding away from it in float32, and the flood sign at the level is a discontinuity, not an error."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n = rng.choice([1, 2, 3, 7, 16, 33])
    v = rng.choice([1, 2, 3, 5, 8, 17, 31, 64, 100, 257])
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64])
    options = random_row_options(rng, gen, v)
    options["flood"] = rng.choice([None, "batch", "individual"])
    options["reduction"] = rng.choice(["mean", "sum"] + (["none"] if options["flood"] != "batch" else []))

    layout = rng.choice(["(N, C)", "(N, C)", "(N, C, d)", "(C,)"])
    scale = rng.choice([0.5, 3.0, 8.0])
    rows = (n, 3) if layout == "(N, C, d)" else (n,)
    wide_rows = False
    target = torch.randint(0, v, rows, generator=gen)
    ignore_fraction = rng.choice([0.0, 0.3, 1.0])
    target[torch.rand(rows, generator=gen) < ignore_fraction] = options["ignore_index"]
    if layout == "(N, C, d)":
        x = torch.randn(n, v, 3, generator=gen) * scale
    else:
        x = torch.randn(n, v, generator=gen) * scale
        wide_rows = rng.random() < 0.3 and v > 1
        if wide_rows:  # rows of a wider buffer: row stride V + 5
            wide = torch.randn(n, v + 5, generator=gen)
            wide[:, 2:2 + v] = x
            x = wide[:, 2:2 + v]
        if layout == "(C,)":
            x, target = x[0], target[0]
    level_kinds = ["float", "0-d tensor"] + (["per sample"] if options["flood"] == "individual" else [])
    level_kind = rng.choice(level_kinds)
    level_value = rng.choice([0.5, 2.0, 5.0, 50.0])
    if level_kind == "float":
        options["flood_level"] = level_value
    elif level_kind == "0-d tensor":
        options["flood_level"] = torch.tensor(level_value)
    else:
        options["flood_level"] = torch.rand(target.shape, generator=gen) * 4 + 0.1

    options = {key: value.to(device) if isinstance(value, Tensor) else value for key, value in options.items()}
    grad_output = rng.choice([1.0, 1.0, -0.7, 3.0])
    inplace_backward = rng.random() < 0.2
    shown = {key: (f"tensor{tuple(value.shape)}" if isinstance(value, Tensor) else value)
             for key, value in options.items()}
    description = (f"seed {seed}: N={n} V={v} {dtype} {layout}{' rows of a wider buffer' if wide_rows else ''} "
                   f"logit scale {scale}, level {level_kind}, grad_output {grad_output}, inplace {inplace_backward}, "
                   f"{shown}")
    return Draw(x.to(device=device, dtype=dtype), target.to(device), options, grad_output, inplace_backward,
                description)


def rows_and_classes(x: Tensor, target: Tensor, level: Any) -> tuple:
    """The (N, C) view of any layout (class dimension last), with its targets and per-row levels, for
    :func:`row_term_scale`."""
    if x.dim() == 1:
        x, target = x[None], target[None]
    elif x.dim() == 3:
        x = x.movedim(1, -1).reshape(-1, x.shape[1])
    if isinstance(level, Tensor) and level.dim() > 0:
        level = level.reshape(-1)
    return x, target.reshape(-1), level


def check(d: Draw, backend: str) -> None:
    """Loss, raw loss and gradient of ``backend`` against the float64 reference on the same values."""
    leaf = leaf_copy(d.logits)
    given = leaf.clone() if d.inplace_backward else leaf  # in place, the gradient overwrites a copy
    loss, raw = flooded_cross_entropy(given, d.target, return_raw=True, backend=backend,
                                      inplace_backward=d.inplace_backward, **d.options)
    (loss * d.grad_output).sum().backward()
    ref_loss, ref_raw, ref_grad = reference64(d.logits, d.target, d.grad_output, **d.options)
    rtol = 1e-10 if d.logits.dtype == torch.float64 else 1e-5
    assert_loss_close(loss.detach(), ref_loss, rtol)
    assert_loss_close(raw, ref_raw, rtol)
    x, target, level = rows_and_classes(d.logits, d.target, d.options["flood_level"])
    term_scale = row_term_scale(x, target, d.grad_output, **dict(d.options, flood_level=level))
    assert_grad_close(leaf.grad, ref_grad, d.logits.dtype, term_scale)


# Draws per run: fewer for Triton, whose interpreter is slow and whose every new kernel variant on a GPU is a
# compilation of a second or so.
DRAWS = {("cpu", "triton"): 40, ("cuda", "triton"): 30, ("cuda", "cuda"): 200}


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_random_configurations_match_the_reference(device, backend):
    draws = (draw(seed, device) for seed in random_seeds(DRAWS.get((device, backend), 400)))
    assert_draws_pass((d.description, functools.partial(check, d, backend)) for d in draws)
