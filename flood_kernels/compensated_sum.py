"""A running sum held as a pair: ``high`` in a 16-bit float dtype plus an int8 ``low`` count of ``s(high)``.

The fused linear loss adds one chunk's ``g.T @ h`` to grad_W per chunk. Summed in bf16, each addition rounds the
running total to 8 significant bits (the known cause of divergence in fused-linear CE); summed in float32 it costs
4 bytes per weight element (2.1 GB at V = 128256, D = 4096). Here the total is ``high + low * s(high)``:

* ``high`` is the gradient itself, in the weight's dtype (bfloat16 or float16), rounded to nearest;
* ``s(high) = ulp(high) / 256``, a power of two read off high's exponent, so ``low`` in [-127, 127] holds what
  ``high`` could not: the pair keeps 8 more bits than ``high`` (within one unit ``s``: 2**-15 relative for
  bfloat16, 2**-18 for float16), for 1 byte per element.

Each addition rounds the pair, not the weight's dtype (half an ulp, 2**-8 relative for bfloat16). Measured on
CPU, bfloat16 grad_W summed over 8 to 128 chunks: the same error norm as float32 accumulation (1.66e-3, that of the
exact sum rounded to bfloat16), 0.4-1.4% of the elements an ulp away from the exact sum rounded, where sums
rounded to bfloat16 after each chunk were off in 45-82% of the elements with 2-10x the error norm. Values below
``2**-111`` (bfloat16; float16: the subnormals) keep only high's precision, as ``s`` stops at float32's (float16's)
smallest unit.

This module is the executable spec in PyTorch and the CPU implementation; the CUDA implementation is the GEMM
with this update as its epilogue, in :mod:`flood_kernels.triton.compensated_sum`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional

import torch
from torch import Tensor

# Mantissa bits of high, and the float32 exponent field of the smallest unit s may take: 2**-126 for bfloat16
# (float32's smallest normal), ulp(float16 subnormal) / 256 = 2**-32 for float16.
HIGH_DTYPES: Dict[torch.dtype, tuple] = {torch.bfloat16: (7, 1), torch.float16: (10, 127 - 32)}
LOW_BITS = 8
LOW_LIMIT = 127
_VOCAB_SLICE_BYTES = 1 << 26
_ELEMENTWISE_SLICE = 1 << 20


def uses_low_part(dtype: torch.dtype) -> bool:
    """Whether a sum in ``dtype`` needs the int8 low part (16-bit floats), or is accurate on its own."""
    return dtype in HIGH_DTYPES


def low_unit(high: Tensor) -> Tensor:
    """``s(high) = ulp(high) / 2**LOW_BITS`` as float32: a power of two from the float32 exponent field of high."""
    mantissa_bits, min_field = HIGH_DTYPES[high.dtype]
    exponent_field = (high.float().view(torch.int32) >> 23) & 0xFF
    field = (exponent_field - (mantissa_bits + LOW_BITS)).clamp_min(min_field)
    return (field << 23).view(torch.float32)


def value(high: Tensor, low: Tensor) -> Tensor:
    """The pair's sum in float32."""
    return high.float() + low.float() * low_unit(high)


def add_(high: Tensor, low: Tensor, addend: Tensor) -> None:
    """``(high, low) += addend`` (float32): the new total is rounded to nearest in high, the rest in low.

    The residual ``total - high`` is exact in float32 and at most ulp(high) / 2, so at most 128 units; it is
    rounded to the nearest unit (half up) and clamped to +-127, so the pair is within one unit of the float32
    total. Where high is NaN or infinite (a NaN, or a float16 overflow) low is 0: high shows it, nothing hides it.
    """
    total = value(high, low) + addend
    high.copy_(total)
    residual = (total - high.float()) / low_unit(high)
    finite = residual.abs() < float("inf")
    low.copy_(torch.where(finite, torch.floor(residual + 0.5).clamp(-LOW_LIMIT, LOW_LIMIT), 0.0))


def finish_(high: Tensor, low: Tensor, scale: Optional[Tensor]) -> Tensor:
    """``high = (high + low * s(high)) * scale`` rounded once, in place; scale a float32 tensor of one element
    (the backward's factor, on device) or None for 1. A slice of rows at a time (:func:`row_slices`)."""
    for rows in row_slices(high):
        total = value(high[rows], low[rows])
        high[rows].copy_(total if scale is None else total * scale)
    return high


def row_slices(tensor: Tensor) -> Iterator[Any]:
    """Indices of ``tensor``'s slices along its first dimension, each of at most ``_ELEMENTWISE_SLICE`` elements
    (one row at least; a 0-d tensor is one slice). Elementwise steps in float32 on CPU go a slice at a time: their
    temporaries (up to ~20 bytes per element in :func:`add_`) stay within ~20 MiB instead of growing with V x D."""
    if tensor.dim() == 0:
        yield ...
        return
    step = max(1, _ELEMENTWISE_SLICE // max(1, tensor[:1].numel()))
    for start in range(0, tensor.shape[0], step):
        yield slice(start, start + step)


def add_float32_products(grad_logits: Tensor, h: Tensor, add: Callable[[slice, Tensor], None]) -> None:
    """``add(classes, (grad_logits.T @ h)[classes])`` with the product in float32 from 16-bit operands, on CPU (which
    has no mixed-precision GEMM): a slice of the vocabulary at a time, each product freed when ``add`` returns
    (before the next exists), so the float32 temporaries stay within 64 MiB beyond ``h``."""
    h32 = h.float()
    step = max(1, _VOCAB_SLICE_BYTES // (4 * max(1, h.shape[1] + grad_logits.shape[0])))
    for start in range(0, grad_logits.shape[1], step):
        classes = slice(start, start + step)
        add(classes, torch.mm(grad_logits[:, classes].t().float(), h32))


def accumulate_(high: Tensor, low: Tensor, grad_logits: Tensor, h: Tensor) -> None:
    """``(high, low) += grad_logits.T @ h`` on CPU, the product in float32."""
    def add_rows(classes: slice, product: Tensor) -> None:
        for rows in row_slices(product):
            add_(high[classes][rows], low[classes][rows], product[rows])

    add_float32_products(grad_logits, h, add_rows)
