"""Triton kernels for the per-row cross-entropy of :mod:`flood_kernels.reference`, and their launchers.

Byte budget per call, for ``N x V`` logits of ``b`` bytes per element:

* forward: one read of the logits (``N V b``), online max / sum-exp over V in blocks, fp32 accumulators
  (fp64 for fp64 input); writes ``8 N`` bytes (per-row loss and log-sum-exp).
* backward: one read of the logits and one write of the gradient (``2 N V b``). The per-row scale
  ``d loss / d l_i`` (grad_output, the flood sign and the mean denominator folded together on device) is
  read from memory inside the kernel, so neither the sign nor a GradScaler costs an extra pass.

One program per row; rows are addressed with 64-bit offsets, so ``N x V >= 2**31`` is safe, and the class
loop never holds more than ``BLOCK_V`` elements, so any V works without spilling.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

_TORCH_TO_TRITON_ACC = {torch.float64: tl.float64}


@triton.jit
def _tanh_with_derivative(u):
    """``(tanh(u), 1 - tanh(u)**2)`` accurate to a few ulp over the whole range (series near 0)."""
    a = tl.abs(u)
    t = tl.exp(-2.0 * a)
    far = (1.0 - t) / (1.0 + t)
    far_derivative = 4.0 * t / ((1.0 + t) * (1.0 + t))
    a2 = a * a
    near = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    is_near = a < 0.125
    magnitude = tl.where(is_near, near, far)
    derivative = tl.where(is_near, 1.0 - near * near, far_derivative)
    return tl.where(u < 0.0, -magnitude, magnitude), derivative


@triton.jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    """``softcap * tanh(x / softcap)`` when HAS_SOFTCAP, else ``x``."""
    if HAS_SOFTCAP:
        th, _ = _tanh_with_derivative(x / softcap)
        return softcap * th
    return x


@triton.jit
def _forward_kernel(
    # outputs: per-row loss and log-sum-exp, (N,)
    losses_ptr,
    lse_ptr,
    # inputs
    logits_ptr,  # (N, V), class stride 1
    target_ptr,  # (N,) int64
    weight_ptr,  # (V,) class weights (only read when HAS_WEIGHT)
    # strides and sizes
    logits_row_stride,
    n_classes,
    # scalar options
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    reverse_ce_coef,  # reverse_ce * (-reverse_ce_log_zero)
    # compile-time switches
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_logits_ptr = logits_ptr + row * logits_row_stride
    offsets = tl.arange(0, BLOCK_V)

    running_max = tl.full((), float("-inf"), ACC_DTYPE)
    running_shift = tl.zeros((), ACC_DTYPE)
    running_sum = tl.zeros((), ACC_DTYPE)
    smoothing_sum = tl.zeros((), ACC_DTYPE)  # sum_c w_c z_c (sum_c z_c without weights)
    weight_sum = tl.zeros((), ACC_DTYPE)
    for block_start in range(0, n_classes, BLOCK_V):
        cols = block_start + offsets
        in_row = cols < n_classes
        x = tl.load(row_logits_ptr + cols, mask=in_row, other=0.0).to(ACC_DTYPE)
        z = tl.where(in_row, _capped(x, softcap, HAS_SOFTCAP), float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        # An all -inf prefix (masked vocabulary) has an empty sum: it must neither give exp(-inf - -inf) = NaN
        # nor rescale its zero sum by an overflowing exp(0 - new_shift).
        new_shift = tl.where(new_max == float("-inf"), 0.0, new_max).to(ACC_DTYPE)
        rescaled_sum = tl.where(running_max == float("-inf"), 0.0, running_sum * tl.exp(running_shift - new_shift))
        running_sum = rescaled_sum + tl.sum(tl.exp(z - new_shift), axis=0)
        running_max = new_max
        running_shift = new_shift
        if HAS_SMOOTHING:
            z_in_row = tl.where(in_row, z, 0.0)
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC_DTYPE)
                smoothing_sum += tl.sum(w * z_in_row, axis=0)
                weight_sum += tl.sum(w, axis=0)
            else:
                smoothing_sum += tl.sum(z_in_row, axis=0)
    lse = running_shift + tl.log(running_sum)

    target = tl.load(target_ptr + row)
    in_range = (target >= 0) & (target < n_classes)
    safe_target = tl.where(in_range, target, 0)
    z_target = _capped(tl.load(row_logits_ptr + safe_target).to(ACC_DTYPE), softcap, HAS_SOFTCAP)
    if HAS_WEIGHT:
        w_target = tl.load(weight_ptr + safe_target).to(ACC_DTYPE)
    else:
        w_target = 1.0
    loss = (1.0 - label_smoothing) * w_target * (lse - z_target)
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            loss += label_smoothing / n_classes * (lse * weight_sum - smoothing_sum)
        else:
            loss += label_smoothing * (lse - smoothing_sum / n_classes)
    loss += z_loss * lse * lse
    loss += reverse_ce_coef * (1.0 - tl.exp(z_target - lse))
    loss = tl.where(in_range, loss, float("nan"))
    loss = tl.where(target == ignore_index, 0.0, loss)
    tl.store(losses_ptr + row, loss)
    tl.store(lse_ptr + row, lse)


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
    lse_ptr,  # (N,) from the forward
    # strides and sizes
    grad_row_stride,
    logits_row_stride,
    n_classes,
    # scalar options
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    reverse_ce_coef,
    # compile-time switches
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_REVERSE_CE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """d l_i / d z_c = a p_c - [c == y] b - eps / V w_c, with
    a = (1 - eps) w_y + eps / V sum(w) + 2 zeta lse + rho' p_y and b = (1 - eps) w_y + rho' p_y;
    times dz/dx = 1 - tanh^2 under softcap, times the row's scale. Only reverse CE needs the target logit."""
    row = tl.program_id(0).to(tl.int64)
    row_logits_ptr = logits_ptr + row * logits_row_stride
    row_grad_ptr = grad_ptr + row * grad_row_stride
    offsets = tl.arange(0, BLOCK_V)

    target = tl.load(target_ptr + row)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < n_classes)
    safe_target = tl.where(in_range, target, 0)
    lse = tl.load(lse_ptr + row).to(ACC_DTYPE)
    scale = tl.load(grad_losses_ptr + row).to(ACC_DTYPE)
    scale = tl.where(in_range, scale, float("nan"))
    if HAS_WEIGHT:
        w_target = tl.load(weight_ptr + safe_target).to(ACC_DTYPE)
    else:
        w_target = 1.0
    target_coef = (1.0 - label_smoothing) * w_target
    if HAS_REVERSE_CE:
        z_target = _capped(tl.load(row_logits_ptr + safe_target).to(ACC_DTYPE), softcap, HAS_SOFTCAP)
        target_coef += reverse_ce_coef * tl.exp(z_target - lse)
        # In place, the loop below overwrites the target logit: every warp must have read it first.
        tl.debug_barrier()
    smoothing_coef = label_smoothing / n_classes
    if HAS_SMOOTHING and HAS_WEIGHT:
        total_weight = tl.load(weight_sum_ptr).to(ACC_DTYPE)
    else:
        total_weight = n_classes
    prob_coef = target_coef + smoothing_coef * total_weight + 2.0 * z_loss * lse

    for block_start in range(0, n_classes, BLOCK_V):
        cols = block_start + offsets
        in_row = cols < n_classes
        x = tl.load(row_logits_ptr + cols, mask=in_row, other=0.0).to(ACC_DTYPE)
        if HAS_SOFTCAP:
            th, capped_derivative = _tanh_with_derivative(x / softcap)
            z = softcap * th
        else:
            z = x
        grad = prob_coef * tl.exp(z - lse) - tl.where(cols == target, target_coef, 0.0)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                grad -= smoothing_coef * tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(ACC_DTYPE)
            else:
                grad -= smoothing_coef
        if HAS_SOFTCAP:
            grad = grad * capped_derivative
        grad = tl.where(ignored, 0.0, grad * scale)
        tl.store(row_grad_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def _launch_config(n_classes: int, element_size: int) -> Tuple[int, int]:
    """(BLOCK_V, num_warps): 16 KB of logits per block iteration, 16-byte loads per thread."""
    block = min(triton.next_power_of_2(n_classes), 16384 // element_size)
    num_warps = max(1, min(16, block * element_size // 512))
    return block, num_warps


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
    """Write per-row losses and log-sum-exp of ``(N, V)`` logits (class stride 1) into ``losses``, ``lse``.

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
            ignore_index, label_smoothing, z_loss, softcap, reverse_ce * -reverse_ce_log_zero,
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
    """Write ``d loss / d logits`` into ``grad`` (a new tensor, or ``logits`` itself for in-place)."""
    n_rows, n_classes = logits.shape
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
            ignore_index, label_smoothing, z_loss, softcap, reverse_ce * -reverse_ce_log_zero,
            HAS_WEIGHT=weight is not None,
            HAS_SMOOTHING=has_smoothing,
            HAS_SOFTCAP=softcap > 0.0,
            HAS_REVERSE_CE=reverse_ce != 0.0,
            ACC_DTYPE=_acc_dtype(logits.dtype),
            BLOCK_V=block,
            num_warps=num_warps,
        )
