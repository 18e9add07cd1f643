"""grad_W += g.T @ h into a compensated (high, int8 low) pair, as one GEMM with the update as its epilogue.

The pair and its rounding are those of :mod:`flood_kernels.compensated_sum` (the spec). Fused into the GEMM,
the update costs no pass of its own: per chunk each program computes one ``BLOCK_C x BLOCK_F`` tile of the
product over the chunk's rows in float32 (``tl.dot``: wgmma on sm_90, mma on sm_80), then reads the tile's pair
(3 bytes per element), adds, and writes the pair back (3 bytes). A float32 accumulator updated by cuBLAS moves
8 bytes per element per chunk, one in the weight's dtype 4.

``finish_`` turns the pair into the gradient in place: ``high = (high + low * s) * scale``, one rounding, with
the backward's factor read on device (3 bytes read, 2 written per element).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import compensated_sum as spec
from .cross_entropy import _on_device

# (BLOCK_C, BLOCK_F, BLOCK_R, warps, stages, register cap) by compute capability, chosen by compiling (not yet by
# timing: no GPU run so far; scripts/check_triton_compile.py). On sm_90 the epilogue in two halves fits 128
# registers without spilling (triton 3.6 and 3.9), so two blocks share an SM and one's epilogue, memory-bound,
# overlaps the other's GEMM; 128 x 256 tiles, or 4 warps, need more than 128 (some spill). On sm_80 a 128 cap
# spills: 154-180 registers, one block per SM. The interpreter (CPU) takes small tiles so that small test shapes
# span several tiles and row blocks.
_TILES = {9: (128, 128, 64, 8, 3, 128), 8: (128, 128, 32, 8, 3, None)}
_INTERPRETER_TILES = (32, 32, 16, 1, 1, None)
_GROUP_C = 8
_FINISH_BLOCK = 2048


@triton.jit
def _low_unit(high, MANTISSA_BITS: tl.constexpr, MIN_UNIT_FIELD: tl.constexpr):
    """``s(high) = ulp(high) / 256`` (high as float32): a power of two from high's exponent field."""
    exponent_field = (high.to(tl.int32, bitcast=True) >> 23) & 0xFF
    field = tl.maximum(exponent_field - (MANTISSA_BITS + 8), MIN_UNIT_FIELD)
    return (field << 23).to(tl.float32, bitcast=True)


@triton.jit
def _round_to(x, MANTISSA_BITS: tl.constexpr, dtype: tl.constexpr):
    """float32 ``x`` rounded to nearest even at MANTISSA_BITS, as ``dtype``: the rounding done on the bits, so the
    conversion after it is exact (bfloat16; float16 within its normal range) whatever mode the converter uses
    (Triton's interpreter truncates). A NaN stays NaN (the bit rounding alone could turn it into an infinity)."""
    DROPPED: tl.constexpr = 23 - MANTISSA_BITS
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + ((1 << (DROPPED - 1)) - 1) + ((bits >> DROPPED) & 1)) & ~((1 << DROPPED) - 1)
    return tl.where(x == x, bits.to(tl.float32, bitcast=True), x).to(dtype)


@triton.jit
def _accumulate_kernel(
    high_ptr, low_ptr, grad_logits_ptr, input_ptr,
    n_classes, n_features, n_rows, grad_logits_row_stride, input_row_stride,
    MANTISSA_BITS: tl.constexpr, MIN_UNIT_FIELD: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_C: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,
):
    # Programs go down GROUP_C class tiles before the next feature tile: those tiles share their g columns in L2.
    program = tl.program_id(0)
    class_tiles = tl.cdiv(n_classes, BLOCK_C)
    feature_tiles = tl.cdiv(n_features, BLOCK_F)
    group = program // (GROUP_C * feature_tiles)
    first_class_tile = group * GROUP_C
    group_size = tl.minimum(class_tiles - first_class_tile, GROUP_C)
    class_tile = first_class_tile + (program % (GROUP_C * feature_tiles)) % group_size
    feature_tile = (program % (GROUP_C * feature_tiles)) // group_size

    classes = class_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    features = feature_tile * BLOCK_F + tl.arange(0, BLOCK_F)
    rows = tl.arange(0, BLOCK_R)
    # Edge tiles read wrapped (valid) columns instead of masking them: their results are never stored.
    g_step = grad_logits_row_stride.to(tl.int64) * BLOCK_R  # 64-bit: rows of any stride
    x_step = input_row_stride.to(tl.int64) * BLOCK_R
    g_ptrs = (grad_logits_ptr + rows[None, :].to(tl.int64) * grad_logits_row_stride
              + (classes % n_classes)[:, None])
    x_ptrs = input_ptr + rows[:, None].to(tl.int64) * input_row_stride + (features % n_features)[None, :]
    product = tl.zeros((BLOCK_C, BLOCK_F), dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_R):
        in_rows = rows < n_rows - start
        g = tl.load(g_ptrs, mask=in_rows[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=in_rows[:, None], other=0.0)
        if DOT_IN_FLOAT32:  # Triton's interpreter multiplies bfloat16 operands as their raw bits
            g, x = g.to(tl.float32), x.to(tl.float32)
        product = tl.dot(g, x, product)
        g_ptrs += g_step
        x_ptrs += x_step

    # The tile's first element in int64 once, offsets within the tile in int32 (BLOCK_C * n_features < 2**31):
    # per-element int64 offsets would take two registers each.
    tile_start = (class_tile * BLOCK_C).to(tl.int64) * n_features + feature_tile * BLOCK_F
    high_ptr += tile_start
    low_ptr += tile_start
    # The two halves of the tile's columns one after the other: half of the pair's registers live at a time (on
    # sm_90 128 registers instead of 174, so two blocks fit an SM and one's epilogue overlaps the other's GEMM).
    left, right = tl.split(tl.permute(tl.reshape(product, (BLOCK_C, 2, BLOCK_F // 2)), (0, 2, 1)))
    half_features = feature_tile * BLOCK_F + tl.arange(0, BLOCK_F // 2)
    _update_pair(high_ptr, low_ptr, left, classes, half_features, 0, n_classes, n_features,
                 MANTISSA_BITS, MIN_UNIT_FIELD, BLOCK_C, BLOCK_F // 2)
    _update_pair(high_ptr, low_ptr, right, classes, half_features + BLOCK_F // 2, BLOCK_F // 2, n_classes,
                 n_features, MANTISSA_BITS, MIN_UNIT_FIELD, BLOCK_C, BLOCK_F // 2)


@triton.jit
def _update_pair(high_ptr, low_ptr, product, classes, features, first_column, n_classes, n_features,
                 MANTISSA_BITS: tl.constexpr, MIN_UNIT_FIELD: tl.constexpr, ROWS: tl.constexpr, COLUMNS: tl.constexpr):
    """``(high, low) += product`` over ROWS x COLUMNS of the tile from its column ``first_column`` (pointers at the
    tile's first element); ``features`` the columns' indices in grad_W."""
    offsets = tl.arange(0, ROWS)[:, None] * n_features + first_column + tl.arange(0, COLUMNS)[None, :]
    inside = (classes[:, None] < n_classes) & (features[None, :] < n_features)
    high = tl.load(high_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    low = tl.load(low_ptr + offsets, mask=inside, other=0).to(tl.float32)
    total = high + low * _low_unit(high, MANTISSA_BITS, MIN_UNIT_FIELD) + product
    new_high = _round_to(total, MANTISSA_BITS, high_ptr.dtype.element_ty)
    rounded = new_high.to(tl.float32)
    residual = (total - rounded) / _low_unit(rounded, MANTISSA_BITS, MIN_UNIT_FIELD)
    finite = tl.abs(residual) < float("inf")
    residual = tl.minimum(tl.maximum(tl.floor(residual + 0.5), -127.0), 127.0)
    new_low = tl.where(finite, residual, 0.0).to(tl.int8)
    tl.store(high_ptr + offsets, new_high, mask=inside)
    tl.store(low_ptr + offsets, new_low, mask=inside)


@triton.jit
def _finish_kernel(high_ptr, low_ptr, scale_ptr, n_elements, HAS_SCALE: tl.constexpr,
                   MANTISSA_BITS: tl.constexpr, MIN_UNIT_FIELD: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n_elements
    high = tl.load(high_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    low = tl.load(low_ptr + offsets, mask=inside, other=0).to(tl.float32)
    total = high + low * _low_unit(high, MANTISSA_BITS, MIN_UNIT_FIELD)
    if HAS_SCALE:
        total = total * tl.load(scale_ptr).to(tl.float32)
    tl.store(high_ptr + offsets, _round_to(total, MANTISSA_BITS, high_ptr.dtype.element_ty), mask=inside)


def _tiles(device: torch.device) -> Tuple[int, int, int, int, int, Optional[int]]:
    if device.type != "cuda":
        return _INTERPRETER_TILES
    major, _ = torch.cuda.get_device_capability(device)
    return _TILES[9] if major >= 9 else _TILES[8]


def _check_pair(high: Tensor, low: Tensor) -> None:
    if high.dtype not in spec.HIGH_DTYPES:
        raise TypeError(f"high must be bfloat16 or float16, got {high.dtype}")
    if low.dtype != torch.int8 or low.shape != high.shape:
        raise ValueError(f"low must be int8 of high's shape {tuple(high.shape)}, got {low.dtype} {tuple(low.shape)}")
    if not (high.is_contiguous() and low.is_contiguous()):
        raise ValueError("high and low must be contiguous")


def accumulate_(high: Tensor, low: Tensor, grad_logits: Tensor, h: Tensor,
                tiles: Optional[Tuple[int, int, int, int, int, Optional[int]]] = None) -> None:
    """``(high, low) += grad_logits.T @ h``: high / low ``(V, D)`` contiguous, grad_logits ``(C, V)`` and h
    ``(C, D)`` in high's dtype with unit stride along V and D. ``tiles`` (BLOCK_C, BLOCK_F, BLOCK_R, warps,
    stages, register cap) replaces the device's (benchmarks/compensated_gemm.py compares them)."""
    _check_pair(high, low)
    (n_classes, n_features), n_rows = high.shape, h.shape[0]
    if grad_logits.shape != (n_rows, n_classes) or h.shape != (n_rows, n_features):
        raise ValueError(f"grad_logits {tuple(grad_logits.shape)} and h {tuple(h.shape)} do not make a "
                         f"{tuple(high.shape)} product")
    if grad_logits.dtype != high.dtype or h.dtype != high.dtype:
        raise TypeError(f"grad_logits ({grad_logits.dtype}) and h ({h.dtype}) must be high's dtype {high.dtype}")
    if high.numel() == 0 or n_rows == 0:
        return
    grad_logits = grad_logits if grad_logits.stride(1) == 1 else grad_logits.contiguous()
    h = h if h.stride(1) == 1 else h.contiguous()
    block_c, block_f, block_r, num_warps, num_stages, max_registers = tiles or _tiles(high.device)
    register_cap = {} if max_registers is None else {"maxnreg": max_registers}
    mantissa_bits, min_field = spec.HIGH_DTYPES[high.dtype]
    grid = (triton.cdiv(n_classes, block_c) * triton.cdiv(n_features, block_f),)
    with _on_device(high):
        _accumulate_kernel[grid](
            high, low, grad_logits, h,
            n_classes, n_features, n_rows, grad_logits.stride(0), h.stride(0),
            MANTISSA_BITS=mantissa_bits, MIN_UNIT_FIELD=min_field,
            BLOCK_C=block_c, BLOCK_F=block_f, BLOCK_R=block_r, GROUP_C=_GROUP_C,
            DOT_IN_FLOAT32=not high.is_cuda,
            num_warps=num_warps, num_stages=num_stages, **register_cap,
        )


def finish_(high: Tensor, low: Tensor, scale: Optional[Tensor]) -> Tensor:
    """``high = (high + low * s(high)) * scale`` in place, one rounding; ``scale`` one float32 element on high's
    device (read there: no host sync) or None for 1."""
    _check_pair(high, low)
    n_elements = high.numel()
    if n_elements:
        mantissa_bits, min_field = spec.HIGH_DTYPES[high.dtype]
        with _on_device(high):
            _finish_kernel[(triton.cdiv(n_elements, _FINISH_BLOCK),)](
                high, low, scale if scale is not None else high, n_elements, HAS_SCALE=scale is not None,
                MANTISSA_BITS=mantissa_bits, MIN_UNIT_FIELD=min_field, BLOCK=_FINISH_BLOCK, num_warps=4,
            )
    return high
