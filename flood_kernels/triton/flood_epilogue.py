"""The O(N) epilogue of the loss as one Triton kernel: "mean" denominator, reduction, flood transform and
``d loss / d l_i`` from the per-row losses (the math of flood_kernels/_flood.py and csrc/cpu/flood_epilogue.cpp).

Written as tensor ops, the epilogue is ~8 kernel launches forward and ~5 backward (sum, divide, subtract,
abs, add; sign, multiply, divide, a copy): on a GPU each costs a launch (a few microseconds, also inside a CUDA
graph), which for a classifier's loss (N = 256, V = 1000: 1 MB of logits, ~1 us of memory traffic) is most of
the step. This kernel replaces them with one launch forward; backward is one multiply by the saved scale.

One program walks the rows twice (sums, then the per-row scale): ``~24 N`` bytes (losses, int64 targets, the
scale out). Its time is the latency of its block iterations, not bandwidth: a classifier's rows fit one
iteration of 4 warps; past 1024 rows, 16 warps take 4096 rows an iteration (16 per pass at the 65536 rows
flood_kernels.backends sends here, tens of microseconds by estimate, not yet measured); beyond that the tensor
ops' grid-wide reductions are faster and their launches are noise next to the N x V kernels.
"""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from .cross_entropy import _on_device

# (rows per block iteration, warps): one iteration of 4 warps for up to 1024 rows, else 4096 rows and 16 warps.
_SMALL, _LARGE = (1024, 4), (4096, 16)


@triton.jit
def _sign(x):
    """torch.sign: -1, 0, 1, and 0 for NaN (the sign autograd uses for |x|)."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)).to(x.dtype)


@triton.jit
def _flood_epilogue_kernel(
    loss_ptr, raw_ptr, row_scale_ptr,
    losses_ptr, target_ptr, weight_ptr, level_ptr,
    level_stride, n_rows, n_classes, ignore_index,
    FLOOD_MODE: tl.constexpr,  # 0 none, 1 batch, 2 individual (flood_kernels._ops.FLOOD_MODES)
    MEAN: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    dtype = losses_ptr.dtype.element_ty
    offsets = tl.arange(0, BLOCK)
    denominator_sum = tl.zeros([BLOCK], dtype)
    raw_sum = tl.zeros([BLOCK], dtype)
    flooded_sum = tl.zeros([BLOCK], dtype)
    for start in range(0, n_rows, BLOCK):
        rows = start + offsets
        in_bounds = rows < n_rows
        losses = tl.load(losses_ptr + rows, mask=in_bounds, other=0.0)
        target = tl.load(target_ptr + rows, mask=in_bounds, other=ignore_index)
        valid = in_bounds & (target != ignore_index)
        if HAS_WEIGHT:
            # A target outside [0, V) reads no weight (no out-of-bounds read, no device assert); its loss is
            # NaN from the row kernel, so the reduced loss is NaN anyway.
            in_range = (target >= 0) & (target < n_classes)
            denominator_sum += tl.load(weight_ptr + tl.where(in_range, target, 0), mask=valid & in_range, other=0.0)
        else:
            denominator_sum += valid.to(dtype)
        raw_sum += losses
        if FLOOD_MODE == 2:
            level = tl.load(level_ptr + rows * level_stride, mask=in_bounds, other=0.0)
            flooded_sum += tl.where(valid, tl.abs(losses - level) + level, 0.0)
    # d loss / d l_i = scale (batch, none) or [valid] sgn(l_i - b_i) * scale (individual).
    raw = tl.sum(raw_sum, axis=0)
    loss = tl.sum(flooded_sum, axis=0)
    scale = tl.full([], 1.0, dtype)
    if MEAN:
        denominator = tl.sum(denominator_sum, axis=0)
        raw = raw / denominator
        loss = loss / denominator
        scale = scale / denominator
    if FLOOD_MODE == 1:
        level = tl.load(level_ptr)
        loss = tl.abs(raw - level) + level
        scale = scale * _sign(raw - level)
    if FLOOD_MODE == 0:
        loss = raw
    tl.store(loss_ptr, loss)
    tl.store(raw_ptr, raw)
    for start in range(0, n_rows, BLOCK):
        rows = start + offsets
        in_bounds = rows < n_rows
        row_scale = tl.zeros([BLOCK], dtype) + scale
        if FLOOD_MODE == 2:
            losses = tl.load(losses_ptr + rows, mask=in_bounds, other=0.0)
            target = tl.load(target_ptr + rows, mask=in_bounds, other=ignore_index)
            level = tl.load(level_ptr + rows * level_stride, mask=in_bounds, other=0.0)
            row_scale = tl.where(target != ignore_index, _sign(losses - level) * scale, 0.0).to(dtype)
        tl.store(row_scale_ptr + rows, row_scale, mask=in_bounds)


def flood_epilogue(losses: Tensor, target: Tensor, weight: Optional[Tensor], flood_level: Tensor, flood_mode: int,
                   mean: bool, ignore_index: int, loss: Tensor, raw: Tensor, row_scale: Tensor) -> None:
    """Write the reduced (flooded) ``loss``, the unflooded ``raw`` (0-d) and ``row_scale = d loss / d losses``.

    ``losses`` ``(N,)`` contiguous in the loss dtype with 0 on ignored rows; ``target``
    contiguous int64; ``weight`` ``(V,)`` or None; ``flood_level`` 0-d, or ``(N,)`` with flood_mode 2.
    """
    n_rows = losses.shape[0]
    # Per-sample levels are read with stride 1 (a strided view is copied, O(N)): row * stride stays in int32.
    flood_level = flood_level.contiguous()
    block, num_warps = _SMALL if n_rows <= _SMALL[0] else _LARGE
    with _on_device(losses):
        _flood_epilogue_kernel[(1,)](
            loss, raw, row_scale,
            losses, target, weight if weight is not None else losses, flood_level,
            flood_level.stride(0) if flood_level.dim() == 1 else 0, n_rows,
            weight.shape[0] if weight is not None else 0, ignore_index,
            FLOOD_MODE=flood_mode,
            MEAN=mean,
            HAS_WEIGHT=weight is not None,
            BLOCK=block,
            num_warps=num_warps,
        )
