"""Triton kernels for the per-row cross-entropy of :mod:`flood_kernels.reference`, and their launchers.

Byte budget per call, for ``N x V`` logits of ``b`` bytes per element:

* forward: one read of the logits (``N V b``), online max / sum-exp over V in blocks, fp32 accumulators
  (fp64 for fp64 input); writes ``12 N`` bytes in fp32 (per-row loss, and log-sum-exp as shift and log_sum).
* backward: one read of the logits and one write of the gradient (``2 N V b``). The per-row scale
  ``d loss / d l_i`` (grad_output, the flood sign and the mean denominator folded together on device) is
  read from memory inside the kernel, so neither the sign nor a GradScaler costs an extra pass.
* loss_and_grad: the forward and the backward in one kernel, for a gradient known at forward time (the per-row
  scale is ``grad_scale`` times, under per-sample flooding, the sign of ``l_i - b_i``): one read of the logits and
  one write of the gradient (``2 N V b`` instead of ``3 N V b``). A row within ``_RESIDENT_ROW_BYTES`` (V up to
  16384 for fp32 / bf16 / fp16, 4096 for fp64, half that under softcap, a quarter for a row not 16-aligned, none
  for such an fp64 row) is loaded once and kept in registers: the statistics and the gradient come from
  that one load. A longer row is reduced in blocks, then re-read for the gradient last block first, so that the
  blocks read most recently come from L2; with hundreds of long rows in flight part of that re-read may come from
  HBM (to be measured: ncu's L2 hit rate).
* scale_grad_: multiplies a gradient in place by grad_output (``2 N V b``) unless grad_output is exactly 1,
  which each program checks on the device: then it costs one launch and no traffic, and no host sync.

The row kernels share their math (``_accumulate_stats``: a block's step of the online max / sum-exp;
``_row_loss``; ``_grad_coefficients`` and ``_block_grad``: the gradient) and run one program per row; rows are
addressed with 64-bit offsets, so ``N x V >= 2**31`` is safe. The class loops never hold more than ``BLOCK_V``
elements, so any V works without spilling; the row-resident variant holds the padded row, within a register
budget that scripts/check_triton_compile.py checks.
"""

from __future__ import annotations

import contextlib
import math
import struct
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

_TORCH_TO_TRITON_ACC = {torch.float64: tl.float64}


@triton.jit
def _option(value, rounding_error, ACC_DTYPE: tl.constexpr):
    """A float option in the accumulation dtype. A launch passes every Python float as float32, so the launcher
    splits each option into its float32 value and the float32 rounding of what that left out (:func:`_split`):
    float32 kernels use the first alone, as a plain float32 argument; float64 kernels add the two, within
    2**-48 of the option instead of float32's 2**-24."""
    if ACC_DTYPE == tl.float64:
        value = tl.full([], value, tl.float64) + tl.full([], rounding_error, tl.float64)
    return value


@triton.jit
def _tanh_with_derivative(u):
    """``(tanh(u), 1 - tanh(u)**2)`` accurate to a few ulp over the whole range (series near 0)."""
    a = tl.abs(u)
    t = tl.exp(-2.0 * a)
    if u.dtype == tl.float32:
        # fp32 division is div.full.f32 (a MUFU.RCP each): one reciprocal for both terms.
        r = 1.0 / (1.0 + t)
        far = (1.0 - t) * r
        far_derivative = 4.0 * t * r * r
    else:
        far = (1.0 - t) / (1.0 + t)
        far_derivative = 4.0 * t / ((1.0 + t) * (1.0 + t))
    a2 = a * a
    near = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    is_near = a < 0.125
    magnitude = tl.where(is_near, near, far)
    derivative = tl.where(is_near, 1.0 - near * near, far_derivative)
    return tl.where(u < 0.0, -magnitude, magnitude), derivative


@triton.jit
def _over_softcap(x, softcap):
    """``x / softcap``; in fp32 times the program's one reciprocal (no per-element MUFU.RCP)."""
    if x.dtype == tl.float32:
        return x * (1.0 / softcap)
    return x / softcap


@triton.jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    """``softcap * tanh(x / softcap)`` when HAS_SOFTCAP, else ``x``."""
    if HAS_SOFTCAP:
        th, _ = _tanh_with_derivative(_over_softcap(x, softcap))
        return softcap * th
    return x


@triton.jit
def _masked_capped(x, in_row, softcap, HAS_SOFTCAP: tl.constexpr):
    """``z``: the (soft-capped) logits, -inf outside the row, so that they add nothing to the sum-exp."""
    return tl.where(in_row, _capped(x, softcap, HAS_SOFTCAP), float("-inf"))


@triton.jit
def _empty_stats(ACC_DTYPE: tl.constexpr):
    """The running statistics of :func:`_accumulate_stats` before any class: ``(max, shift, sum-exp, smoothing
    sum, weight sum) = (-inf, 0, 0, 0, 0)``."""
    zero = tl.zeros((), ACC_DTYPE)
    return tl.full((), float("-inf"), ACC_DTYPE), zero, zero, zero, zero


@triton.jit
def _accumulate_stats(
    z, cols, in_row, weight_ptr, running_max, running_shift, running_sum, smoothing_sum, weight_sum,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Fold a block of :func:`_masked_capped` logits ``z`` (classes ``cols``, the valid ones ``in_row``) into
    the running statistics: the online max and ``running_sum = sum_c exp(z_c - running_shift)``, and for label
    smoothing ``smoothing_sum = sum_c w_c z_c`` (``sum_c z_c`` without weights) and ``weight_sum = sum_c w_c``."""
    new_max = tl.maximum(running_max, tl.max(z, axis=0))
    # An all -inf prefix (masked vocabulary) has an empty sum: it must neither give exp(-inf - -inf) = NaN
    # nor rescale its zero sum by an overflowing exp(0 - new_shift). That sum is kept as it is, not reset:
    # the max skips NaN (maxnum), so a NaN among the prefix's -inf lives only in the sum.
    new_shift = tl.where(new_max == float("-inf"), 0.0, new_max).to(ACC_DTYPE)
    rescaled_sum = tl.where(running_max == float("-inf"), running_sum,
                            running_sum * tl.exp(running_shift - new_shift))
    running_sum = rescaled_sum + tl.sum(tl.exp(z - new_shift), axis=0)
    if HAS_SMOOTHING:
        z_in_row = tl.where(in_row, z, 0.0)
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC_DTYPE)
            smoothing_sum += tl.sum(w * z_in_row, axis=0)
            weight_sum += tl.sum(w, axis=0)
        else:
            smoothing_sum += tl.sum(z_in_row, axis=0)
    return new_max, new_shift, running_sum, smoothing_sum, weight_sum


@triton.jit
def _row_stats(
    row_logits_ptr, weight_ptr, n_classes, softcap,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One online pass over a row in blocks of ``BLOCK_V``: ``(shift, log_sum, smoothing_sum, weight_sum)``, the
    row's log-sum-exp as ``shift + log_sum`` (see :func:`_row_loss`)."""
    offsets = tl.arange(0, BLOCK_V)
    running_max, running_shift, running_sum, smoothing_sum, weight_sum = _empty_stats(ACC_DTYPE)
    for block_start in range(0, n_classes, BLOCK_V):
        cols = block_start + offsets
        in_row = cols < n_classes
        x = tl.load(row_logits_ptr + cols, mask=in_row, other=0.0).to(ACC_DTYPE)
        running_max, running_shift, running_sum, smoothing_sum, weight_sum = _accumulate_stats(
            _masked_capped(x, in_row, softcap, HAS_SOFTCAP), cols, in_row, weight_ptr,
            running_max, running_shift, running_sum, smoothing_sum, weight_sum, HAS_WEIGHT, HAS_SMOOTHING, ACC_DTYPE)
    return running_shift, tl.log(running_sum), smoothing_sum, weight_sum


@triton.jit
def _resident_row_stats(
    z, cols, in_row, weight_ptr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """``(shift, sum_exp, smoothing_sum, weight_sum)`` of a row held whole in registers as :func:`_masked_capped`
    ``z``: the online pass's one step; ``shift`` is the row's max (0 for an all -inf row), with which the
    statistics took ``sum_exp = sum exp(z - shift)``."""
    running_max, running_shift, running_sum, smoothing_sum, weight_sum = _empty_stats(ACC_DTYPE)
    _, shift, sum_exp, smoothing_sum, weight_sum = _accumulate_stats(
        z, cols, in_row, weight_ptr, running_max, running_shift, running_sum, smoothing_sum, weight_sum,
        HAS_WEIGHT, HAS_SMOOTHING, ACC_DTYPE)
    return shift, sum_exp, smoothing_sum, weight_sum


@triton.jit
def _prob(z, shift, log_sum):
    """``p = exp(z - lse)`` from the row's log-sum-exp as ``shift + log_sum`` (:func:`_row_loss`), never rounded
    into one float (``LogSumExp::log_prob`` in csrc/flood_ce_math.h)."""
    return tl.exp((z - shift) - log_sum)


@triton.jit
def _row_loss(
    row_logits_ptr, weight_ptr, target, shift, log_sum, smoothing_sum, weight_sum,
    n_classes, ignore_index, label_smoothing, z_loss, softcap, reverse_ce_coef,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """The row's loss ``l_i`` from its statistics and target: NaN for an out-of-range target, 0 when ignored.

    The log-sum-exp comes as ``shift + log_sum`` (the row's max and ``log sum exp(z - shift)``), not rounded into
    one float: a confident row's ``lse - z_y = (shift - z_y) + log_sum`` and ``p_y = exp((z_y - shift) - log_sum)``
    then keep their own precision, where one float lse leaves an error of an ulp of ``|lse|`` in both."""
    in_range = (target >= 0) & (target < n_classes)
    safe_target = tl.where(in_range, target, 0)
    z_target = _capped(tl.load(row_logits_ptr + safe_target).to(ACC_DTYPE), softcap, HAS_SOFTCAP)
    if HAS_WEIGHT:
        w_target = tl.load(weight_ptr + safe_target).to(ACC_DTYPE)
    else:
        w_target = 1.0
    lse = shift + log_sum
    loss = (1.0 - label_smoothing) * w_target * ((shift - z_target) + log_sum)
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            loss += label_smoothing / n_classes * (lse * weight_sum - smoothing_sum)
        else:
            loss += label_smoothing * (lse - smoothing_sum / n_classes)
    loss += z_loss * lse * lse
    loss += reverse_ce_coef * (1.0 - _prob(z_target, shift, log_sum))
    loss = tl.where(in_range, loss, float("nan"))
    return tl.where(target == ignore_index, 0.0, loss)


@triton.jit
def _grad_coefficients(
    row_logits_ptr, weight_ptr, weight_sum_ptr, target, shift, log_sum, scale,
    n_classes, ignore_index, label_smoothing, z_loss, softcap, reverse_ce_coef,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_REVERSE_CE: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """The row's constants of its gradient, ``(target_col, ignored, scale, a, b, eps / V)``:

    d l_i / d z_c = a p_c - [c == y] b - eps / V w_c, with
    a = (1 - eps) w_y + eps / V sum(w) + 2 zeta lse + rho' p_y and b = (1 - eps) w_y + rho' p_y;
    ``scale`` is NaN for an out-of-range target. Only reverse CE reads the target logit (and takes p_y as
    :func:`_row_loss` does, so that a kernel computes it once)."""
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < n_classes)
    safe_target = tl.where(in_range, target, 0)
    # A 32-bit class index for the compares: exact in range, and an out-of-range row is all NaN anyway.
    target_col = safe_target.to(tl.int32)
    scale = tl.where(in_range, scale, float("nan"))
    if HAS_WEIGHT:
        w_target = tl.load(weight_ptr + safe_target).to(ACC_DTYPE)
    else:
        w_target = 1.0
    target_coef = (1.0 - label_smoothing) * w_target
    if HAS_REVERSE_CE:
        z_target = _capped(tl.load(row_logits_ptr + safe_target).to(ACC_DTYPE), softcap, HAS_SOFTCAP)
        target_coef += reverse_ce_coef * _prob(z_target, shift, log_sum)
    smoothing_coef = label_smoothing / n_classes
    if HAS_SMOOTHING and HAS_WEIGHT:
        total_weight = tl.load(weight_sum_ptr).to(ACC_DTYPE)
    else:
        total_weight = n_classes
    prob_coef = target_coef + smoothing_coef * total_weight + 2.0 * z_loss * (shift + log_sum)
    return target_col, ignored, scale, prob_coef, target_coef, smoothing_coef


@triton.jit
def _block_grad(
    x, p, cols, in_row, weight_ptr, target_col, ignored, scale, prob_coef, target_coef, smoothing_coef,
    softcap, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """``scale * d l_i / d x_c`` for a block of logits ``x`` (classes ``cols``) and their probabilities
    ``p`` (:func:`_prob`): ``d l_i / d z_c`` from the constants of :func:`_grad_coefficients`, times
    ``dz/dx = 1 - tanh^2`` under softcap (from ``x``; only then is ``x`` read); exact zeros when the row is
    ignored."""
    if HAS_SOFTCAP:
        _, capped_derivative = _tanh_with_derivative(_over_softcap(x, softcap))
    grad = prob_coef * p - tl.where(cols == target_col, target_coef, 0.0)
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            grad -= smoothing_coef * tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC_DTYPE)
        else:
            grad -= smoothing_coef
    if HAS_SOFTCAP:
        grad = grad * capped_derivative
    return tl.where(ignored, 0.0, grad * scale)


@triton.jit
def _store_row_grad(
    row_grad_ptr, row_logits_ptr, weight_ptr, weight_sum_ptr, target, shift, log_sum, scale,
    n_classes, ignore_index, label_smoothing, z_loss, softcap, reverse_ce_coef,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_REVERSE_CE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Write the row's ``scale * d l_i / d x`` (may overwrite the row's logits) in blocks of ``BLOCK_V``, each
    read again: exact zeros when the row is ignored, NaN for an out-of-range target."""
    target_col, ignored, scale, prob_coef, target_coef, smoothing_coef = _grad_coefficients(
        row_logits_ptr, weight_ptr, weight_sum_ptr, target, shift, log_sum, scale,
        n_classes, ignore_index, label_smoothing, z_loss, softcap, reverse_ce_coef,
        HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, HAS_REVERSE_CE, ACC_DTYPE)
    if HAS_REVERSE_CE:
        # In place, the loop below overwrites the target logit: every warp must have read it first.
        tl.debug_barrier()
    offsets = tl.arange(0, BLOCK_V)
    # Last block first: the statistics pass read it last, so it is the likeliest still in L2.
    last_start = (tl.cdiv(n_classes, BLOCK_V) - 1) * BLOCK_V
    for block_index in range(0, n_classes, BLOCK_V):
        cols = (last_start - block_index) + offsets
        in_row = cols < n_classes
        x = tl.load(row_logits_ptr + cols, mask=in_row, other=0.0).to(ACC_DTYPE)
        p = _prob(_capped(x, softcap, HAS_SOFTCAP), shift, log_sum)
        grad = _block_grad(x, p, cols, in_row, weight_ptr, target_col, ignored, scale, prob_coef, target_coef,
                           smoothing_coef, softcap, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_DTYPE)
        tl.store(row_grad_ptr + cols, grad.to(row_grad_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _forward_kernel(
    # outputs: per-row loss (N,) and log-sum-exp (N, 2) as [shift, log_sum]
    losses_ptr,
    lse_ptr,
    # inputs
    logits_ptr,  # (N, V), class stride 1
    target_ptr,  # (N,) int64
    weight_ptr,  # (V,) class weights (only read when HAS_WEIGHT)
    # strides and sizes
    logits_row_stride,
    n_classes,
    # scalar options; each float one also as the float32 rounding error of its value (see _option)
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    reverse_ce_coef,  # reverse_ce * (-reverse_ce_log_zero)
    label_smoothing_lo,
    z_loss_lo,
    softcap_lo,
    reverse_ce_coef_lo,
    # compile-time switches
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    softcap = _option(softcap, softcap_lo, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    row_logits_ptr = logits_ptr + row * logits_row_stride
    shift, log_sum, smoothing_sum, weight_sum = _row_stats(
        row_logits_ptr, weight_ptr, n_classes, softcap, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_DTYPE, BLOCK_V)
    # The other options only now: a float64 kernel holds them in registers from here on, not across the row.
    label_smoothing = _option(label_smoothing, label_smoothing_lo, ACC_DTYPE)
    z_loss = _option(z_loss, z_loss_lo, ACC_DTYPE)
    reverse_ce_coef = _option(reverse_ce_coef, reverse_ce_coef_lo, ACC_DTYPE)
    target = tl.load(target_ptr + row)
    loss = _row_loss(
        row_logits_ptr, weight_ptr, target, shift, log_sum, smoothing_sum, weight_sum,
        n_classes, ignore_index, label_smoothing, z_loss, softcap, reverse_ce_coef,
        HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_DTYPE)
    tl.store(losses_ptr + row, loss)
    tl.store(lse_ptr + 2 * row, shift)
    tl.store(lse_ptr + 2 * row + 1, log_sum)


@triton.jit
def _backward_kernel(
    # output: d loss / d logits, (N, V); may alias the logits (in-place backward)
    grad_ptr,
    # inputs
    grad_losses_ptr,  # (N,) d loss / d l_i: grad_output * flood sign / denominator
    logits_ptr,  # (N, V), class stride 1
    target_ptr,  # (N,) int64
    weight_ptr,  # (V,) class weights (only read when HAS_WEIGHT)
    weight_sum_ptr,  # () sum of the class weights (only read when HAS_WEIGHT and HAS_SMOOTHING)
    lse_ptr,  # (N, 2) contiguous, from the forward: [shift, log_sum]
    # strides and sizes
    grad_row_stride,
    logits_row_stride,
    n_classes,
    # scalar options; each float one also as the float32 rounding error of its value (see _option)
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    reverse_ce_coef,
    label_smoothing_lo,
    z_loss_lo,
    softcap_lo,
    reverse_ce_coef_lo,
    # compile-time switches
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_REVERSE_CE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    label_smoothing = _option(label_smoothing, label_smoothing_lo, ACC_DTYPE)
    z_loss = _option(z_loss, z_loss_lo, ACC_DTYPE)
    softcap = _option(softcap, softcap_lo, ACC_DTYPE)
    reverse_ce_coef = _option(reverse_ce_coef, reverse_ce_coef_lo, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row)
    shift = tl.load(lse_ptr + 2 * row).to(ACC_DTYPE)
    log_sum = tl.load(lse_ptr + 2 * row + 1).to(ACC_DTYPE)
    scale = tl.load(grad_losses_ptr + row).to(ACC_DTYPE)
    _store_row_grad(
        grad_ptr + row * grad_row_stride, logits_ptr + row * logits_row_stride, weight_ptr, weight_sum_ptr,
        target, shift, log_sum, scale, n_classes, ignore_index, label_smoothing, z_loss, softcap, reverse_ce_coef,
        HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, HAS_REVERSE_CE, ACC_DTYPE, BLOCK_V)


@triton.jit
def _loss_and_grad_kernel(
    # outputs: per-row loss (N,) and d loss / d logits (N, V), never aliasing the logits
    losses_ptr,
    grad_ptr,
    # inputs
    logits_ptr,  # (N, V), class stride 1
    target_ptr,  # (N,) int64
    weight_ptr,  # (V,) class weights (only read when HAS_WEIGHT)
    weight_sum_ptr,  # () sum of the class weights (only read when HAS_WEIGHT and HAS_SMOOTHING)
    flood_level_ptr,  # (N,) per-row flood levels (only read when FLOOD_ROWS)
    grad_scale_ptr,  # () d loss / d l_i before the flood sign: grad_output / denominator
    # strides and sizes
    grad_row_stride,
    logits_row_stride,
    flood_level_stride,  # 0 for one level broadcast to every row
    n_classes,
    # scalar options; each float one also as the float32 rounding error of its value (see _option)
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    reverse_ce_coef,
    label_smoothing_lo,
    z_loss_lo,
    softcap_lo,
    reverse_ce_coef_lo,
    # compile-time switches
    FLOOD_ROWS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_REVERSE_CE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ROW_RESIDENT: tl.constexpr,  # BLOCK_V covers the row (see _RESIDENT_ROW_BYTES)
):
    """The forward's loss and the backward's gradient in one program per row. ROW_RESIDENT: the row is loaded
    once and kept in registers, the statistics and the gradient both come from that one load. Else the
    statistics pass reads the row from memory in blocks, the gradient pass reads it again from cache."""
    softcap = _option(softcap, softcap_lo, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    row_logits_ptr = logits_ptr + row * logits_row_stride
    row_grad_ptr = grad_ptr + row * grad_row_stride
    if ROW_RESIDENT:
        cols = tl.arange(0, BLOCK_V)
        in_row = cols < n_classes
        x = tl.load(row_logits_ptr + cols, mask=in_row, other=0.0).to(ACC_DTYPE)
        z = _masked_capped(x, in_row, softcap, HAS_SOFTCAP)
        shift, sum_exp, smoothing_sum, weight_sum = _resident_row_stats(
            z, cols, in_row, weight_ptr, HAS_WEIGHT, HAS_SMOOTHING, ACC_DTYPE)
        log_sum = tl.log(sum_exp)
    else:
        shift, log_sum, smoothing_sum, weight_sum = _row_stats(
            row_logits_ptr, weight_ptr, n_classes, softcap, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_DTYPE,
            BLOCK_V)
    # The other options only now: a float64 kernel holds them in registers from here on, not across the row.
    label_smoothing = _option(label_smoothing, label_smoothing_lo, ACC_DTYPE)
    z_loss = _option(z_loss, z_loss_lo, ACC_DTYPE)
    reverse_ce_coef = _option(reverse_ce_coef, reverse_ce_coef_lo, ACC_DTYPE)
    target = tl.load(target_ptr + row)
    loss = _row_loss(
        row_logits_ptr, weight_ptr, target, shift, log_sum, smoothing_sum, weight_sum,
        n_classes, ignore_index, label_smoothing, z_loss, softcap, reverse_ce_coef,
        HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_DTYPE)
    tl.store(losses_ptr + row, loss)

    scale = tl.load(grad_scale_ptr).to(ACC_DTYPE)
    if FLOOD_ROWS:
        # d |l - b| / d l = sgn(l - b): +1, -1, 0 at the level, NaN for a NaN loss.
        excess = loss - tl.load(flood_level_ptr + row * flood_level_stride).to(ACC_DTYPE)
        sign = tl.where(excess > 0.0, 1.0, tl.where(excess < 0.0, -1.0, tl.where(excess == 0.0, 0.0, float("nan"))))
        scale = sign * scale
    if ROW_RESIDENT:
        target_col, ignored, scale, prob_coef, target_coef, smoothing_coef = _grad_coefficients(
            row_logits_ptr, weight_ptr, weight_sum_ptr, target, shift, log_sum, scale,
            n_classes, ignore_index, label_smoothing, z_loss, softcap, reverse_ce_coef,
            HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, HAS_REVERSE_CE, ACC_DTYPE)
        if ACC_DTYPE == tl.float32:
            # p_c = exp(z_c - shift) / sum_exp: the statistics' exps again (CSE), a multiply instead of an exp.
            p = tl.exp(z - shift) * (1.0 / sum_exp)
        else:
            # Recomputed from one float64 lse (within 2**-52 |lse|): a kept row of float64 exps would spill.
            p = tl.exp(z - (shift + log_sum))
        grad = _block_grad(x, p, cols, in_row, weight_ptr, target_col, ignored, scale, prob_coef, target_coef,
                           smoothing_coef, softcap, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_DTYPE)
        tl.store(row_grad_ptr + cols, grad.to(row_grad_ptr.dtype.element_ty), mask=in_row)
    else:
        _store_row_grad(
            row_grad_ptr, row_logits_ptr, weight_ptr, weight_sum_ptr,
            target, shift, log_sum, scale, n_classes, ignore_index, label_smoothing, z_loss, softcap, reverse_ce_coef,
            HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, HAS_REVERSE_CE, ACC_DTYPE, BLOCK_V)


@triton.jit
def _scale_grad_kernel(grad_ptr, grad_output_ptr, n_elements, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """``grad *= grad_output``, the programs striding over the blocks, unless grad_output is exactly 1: then
    each program reads that one scalar and no gradient memory is touched (a few programs per SM, not one per
    block, so that the skip costs a launch and not a wave of programs per 16 KB)."""
    scale = tl.load(grad_output_ptr).to(ACC_DTYPE)
    if scale != 1.0:
        first = tl.program_id(0).to(tl.int64) * BLOCK
        stride = tl.num_programs(0).to(tl.int64) * BLOCK
        for block_start in range(first, n_elements, stride):
            offsets = block_start + tl.arange(0, BLOCK)
            mask = offsets < n_elements
            grad = tl.load(grad_ptr + offsets, mask=mask).to(ACC_DTYPE)
            tl.store(grad_ptr + offsets, (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)


def _warps_for(block_bytes: int) -> int:
    """512 bytes of a block per warp (16-byte accesses per thread), at most 16 warps."""
    return max(1, min(16, block_bytes // 512))


def _launch_config(n_classes: int, element_size: int) -> Tuple[int, int]:
    """(BLOCK_V, num_warps): 16 KB of logits per block iteration, 16-byte loads per thread."""
    block = min(triton.next_power_of_2(n_classes), 16384 // element_size)
    return block, _warps_for(block * element_size)


_RESIDENT_ROW_BYTES = 64 * 1024
"""Register budget of loss_and_grad's row-resident variant: the padded row (``next_power_of_2(V)`` classes) as
accumulator values (fp32; fp64 for fp64 logits), counted twice under softcap. At 16 warps it is 32 of the 128
registers a thread gets (512 threads share an SM's 64K), the rest being temporaries: the largest power of two
at which no variant spills (scripts/check_triton_compile.py). Under softcap the compiler keeps tanh's terms
from the statistics for the gradient, a second row-long array; a bf16 row of 32768 (64 KB of logits, 128 KB
of fp32) spills with weighted label smoothing, whose weights the gradient loads while the row is held."""


def _resident_classes(dtype: torch.dtype, has_softcap: bool, aligned: bool = True) -> int:
    """The most classes (a power of two) whose row loss_and_grad keeps in registers. A row that is not
    16-aligned (length, stride or start: Triton then cannot specialize the loads as 16-byte vectors) loads
    element by element, with more registers of addresses and masks: a quarter of the budget (at half, some
    variants spill on sm_80 or reach the 128-register cap on sm_90). fp64 rows, whose float64 scalars (options,
    the two terms of the log-sum-exp) take two registers each and whose divisions are slow-path calls, get half
    the budget when aligned (at the full one a softcapped variant with weighted smoothing needed a stack frame)
    and none when not (at a quarter or an eighth some variants did, with triton 3.6 or 3.9): fp64 is for
    checking, not for speed."""
    if not aligned and dtype == torch.float64:
        return 0
    accumulator_size = _acc_dtype(dtype).primitive_bitwidth // 8
    fp64_share = 2 if dtype == torch.float64 else 1
    return _RESIDENT_ROW_BYTES // (accumulator_size * (2 if has_softcap else 1) * (1 if aligned else 4) * fp64_share)


def _loss_and_grad_config(n_classes: int, dtype: torch.dtype, has_softcap: bool,
                          aligned: bool = True) -> Tuple[bool, int, int]:
    """(ROW_RESIDENT, BLOCK_V, num_warps) of loss_and_grad: the whole padded row in one block when it fits
    :func:`_resident_classes` (at most 128 bytes of accumulators per thread), else :func:`_launch_config`'s
    blocks."""
    padded = triton.next_power_of_2(n_classes)
    if padded <= _resident_classes(dtype, has_softcap, aligned):
        return True, padded, _warps_for(padded * dtype.itemsize)
    return (False, *_launch_config(n_classes, dtype.itemsize))


_PROGRAMS_PER_SM = 4  # 512-thread programs: 4 fill an SM's 2048 threads


def _resident_programs(device: torch.device) -> int:
    """How many 512-thread programs the device runs at once (a fixed 64 for the CPU interpreter); torch keeps
    the device properties, so this reads no device state."""
    if device.type != "cuda":
        return 64
    return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _acc_dtype(dtype: torch.dtype):
    return _TORCH_TO_TRITON_ACC.get(dtype, tl.float32)


def _on_device(tensor: Tensor):
    """Triton launches on the current CUDA device and stream: make them the tensor's (multi-GPU callers)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _check_targets_on_cpu(target: Tensor, n_classes: int, ignore_index: int) -> None:
    """On CPU a bad target raises like PyTorch; on GPU the kernels give that row NaN (no host sync)."""
    if target.device.type == "cpu":
        bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
        if bool(bad.any()):
            raise IndexError(f"target {int(target[bad][0])} is out of bounds for {n_classes} classes")


def _split(*options: float) -> Tuple[float, ...]:
    """The float options as a launch passes them (see :func:`_option`): each rounded to float32, then each one's
    rounding error rounded to float32 (0 for an option beyond float32's range, which becomes infinite)."""
    rounded = [_to_float32(option) for option in options]
    errors = [_to_float32(option - value) if math.isfinite(value) else 0.0 for option, value in zip(options, rounded)]
    return (*rounded, *errors)


def _to_float32(value: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def forward(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reverse_ce: float,
    reverse_ce_log_zero: float,
    losses: Tensor,
    lse: Tensor,
) -> None:
    """Write per-row losses and log-sum-exp of ``(N, V)`` logits (class stride 1) into ``losses`` ``(N,)`` and
    ``lse`` ``(N, 2)`` contiguous (``[shift, log_sum]`` per row, see :func:`_row_loss`).

    ``softcap == 0`` means no softcap.
    """
    n_rows, n_classes = logits.shape
    _check_targets_on_cpu(target, n_classes, ignore_index)
    if n_rows == 0:
        return
    block, num_warps = _launch_config(n_classes, logits.element_size())
    with _on_device(logits):
        _forward_kernel[(n_rows,)](
            losses, lse,
            logits, target, weight if weight is not None else losses,
            logits.stride(0), n_classes,
            ignore_index, *_split(label_smoothing, z_loss, softcap, reverse_ce * -reverse_ce_log_zero),
            HAS_WEIGHT=weight is not None,
            HAS_SMOOTHING=label_smoothing > 0.0,
            HAS_SOFTCAP=softcap > 0.0,
            ACC_DTYPE=_acc_dtype(logits.dtype),
            BLOCK_V=block,
            num_warps=num_warps,
        )


def backward(
    grad_losses: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reverse_ce: float,
    reverse_ce_log_zero: float,
    grad: Tensor,
) -> None:
    """Write ``d loss / d logits`` into ``grad`` (a new tensor, or ``logits`` itself for in-place), from the
    forward's ``lse``."""
    n_rows, n_classes = logits.shape
    if lse.shape != (n_rows, 2) or not lse.is_contiguous():
        raise ValueError(f"triton backward: lse must be a contiguous ({n_rows}, 2) tensor (each row's shift and "
                         f"log_sum, as the forward returns it), got shape {tuple(lse.shape)}, strides {lse.stride()}")
    if n_rows == 0:
        return
    has_smoothing = label_smoothing > 0.0
    weight_sum = weight.sum() if weight is not None and has_smoothing else lse
    block, num_warps = _launch_config(n_classes, logits.element_size())
    with _on_device(logits):
        _backward_kernel[(n_rows,)](
            grad,
            grad_losses, logits, target, weight if weight is not None else lse, weight_sum, lse,
            grad.stride(0), logits.stride(0), n_classes,
            ignore_index, *_split(label_smoothing, z_loss, softcap, reverse_ce * -reverse_ce_log_zero),
            HAS_WEIGHT=weight is not None,
            HAS_SMOOTHING=has_smoothing,
            HAS_SOFTCAP=softcap > 0.0,
            HAS_REVERSE_CE=reverse_ce != 0.0,
            ACC_DTYPE=_acc_dtype(logits.dtype),
            BLOCK_V=block,
            num_warps=num_warps,
        )


def loss_and_grad(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    flood_level: Optional[Tensor],
    grad_scale: Tensor,
    flood_rows: bool,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reverse_ce: float,
    reverse_ce_log_zero: float,
    losses: Tensor,
    grad: Tensor,
) -> None:
    """Write the per-row losses into ``losses`` and the gradient of ``sum_i s_i l_i`` into ``grad`` in one pass.

    ``s_i = grad_scale * sgn(l_i - flood_level[i])`` when ``flood_rows`` (per-sample flooding; ``flood_level``
    is ``(N,)``, stride 0 for one level), else ``s_i = grad_scale`` (``flood_level`` unused, may be None).
    ``grad_scale`` is a 0-d tensor in the loss dtype (1 / denominator for a mean); ``grad`` is a new contiguous
    ``(N, V)`` tensor of the logits' dtype. The losses are the forward's, the gradient is the backward's.
    """
    n_rows, n_classes = logits.shape
    _check_targets_on_cpu(target, n_classes, ignore_index)
    if n_rows == 0:
        return
    has_smoothing = label_smoothing > 0.0
    weight_sum = weight.sum() if weight is not None and has_smoothing else grad_scale
    aligned = n_classes % 16 == 0 and logits.stride(0) % 16 == 0 and logits.data_ptr() % 16 == 0
    row_resident, block, num_warps = _loss_and_grad_config(n_classes, logits.dtype, softcap > 0.0, aligned)
    with _on_device(logits):
        _loss_and_grad_kernel[(n_rows,)](
            losses, grad,
            logits, target, weight if weight is not None else losses, weight_sum,
            flood_level if flood_rows else losses, grad_scale,
            grad.stride(0), logits.stride(0), flood_level.stride(0) if flood_rows else 0, n_classes,
            ignore_index, *_split(label_smoothing, z_loss, softcap, reverse_ce * -reverse_ce_log_zero),
            FLOOD_ROWS=flood_rows,
            HAS_WEIGHT=weight is not None,
            HAS_SMOOTHING=has_smoothing,
            HAS_SOFTCAP=softcap > 0.0,
            HAS_REVERSE_CE=reverse_ce != 0.0,
            ACC_DTYPE=_acc_dtype(logits.dtype),
            BLOCK_V=block,
            ROW_RESIDENT=row_resident,
            num_warps=num_warps,
        )


def scale_grad_(grad: Tensor, grad_output: Tensor) -> None:
    """Multiply the contiguous ``grad`` in place by the 0-d ``grad_output`` (loss dtype), unless it is exactly 1.

    The check happens on the device, in every program, so there is no host synchronization; at 1 the kernel
    reads one scalar per program and neither reads nor writes ``grad``.
    """
    n_elements = grad.numel()
    if n_elements == 0:
        return
    block, num_warps = _launch_config(n_elements, grad.element_size())
    programs = min(triton.cdiv(n_elements, block), _resident_programs(grad.device))
    with _on_device(grad):
        _scale_grad_kernel[(programs,)](
            grad, grad_output, n_elements,
            ACC_DTYPE=_acc_dtype(grad.dtype),
            BLOCK=block,
            num_warps=num_warps,
        )
