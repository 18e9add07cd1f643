"""Probability ("soft") targets: a floating ``target`` of the input's shape, one class distribution per sample.

This is ``nn.CrossEntropyLoss``'s second target form (mixup / cutmix labels, distillation). Per sample ``i``
with logits ``z`` (softcapped when ``softcap`` is set), class weights ``w``, label smoothing ``eps`` over ``V``
classes and z-loss ``zeta``::

    q'_i = (1 - eps) * q_i + eps / V
    l_i  = -sum_c w_c * q'_ic * log_softmax(z_i)_c  +  zeta * lse_i**2

"mean" divides by the number of samples whatever the weights, and ``ignore_index`` does not apply (both as in
PyTorch). The rest of the loss (checks, backend, flood transform, reduction) is that of class-index targets in
:func:`flood_kernels.functional.flooded_cross_entropy_with_options`, with no target indices to mask rows.

These losses are PyTorch ops in the loss dtype on every backend, not the fused kernels: the per-row loss reads
the ``N x V`` targets next to the logits, and autograd's backward is a few passes over both (eager
``F.cross_entropy``'s cost; torch.compile fuses them). Gradients reach ``target`` too when it requires them, as
with ``F.cross_entropy``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from ._inputs import LossOptions, class_rows, input_rows, loss_dtype
from .reference import softcapped


def is_probability_target(target: Any) -> bool:
    """Whether ``target`` is given as class probabilities (a floating tensor) rather than class indices."""
    return isinstance(target, Tensor) and target.is_floating_point()


def check_options(options: LossOptions, inplace_backward: bool) -> None:
    """The class-index options that probability targets refuse, each naming itself."""
    if options.ignore_index != -100:
        raise ValueError(f"ignore_index={options.ignore_index} is not supported with probability targets (as in "
                         "nn.CrossEntropyLoss); leave it at -100, every sample counts")
    if options.reverse_ce != 0.0:
        raise ValueError("reverse_ce needs class-index targets: its 1 - p_y is defined for one target class")
    if inplace_backward:
        raise ValueError("inplace_backward needs class-index targets: probability targets go through PyTorch ops, "
                         "which have no in-place gradient")


def probability_rows(input: Tensor, target: Tensor) -> Tuple[Tensor, Tensor, torch.Size]:
    """``(rows, C)`` logits and probabilities with unit class stride, and the shape of the samples."""
    logits, row_shape = input_rows(input)
    if tuple(target.shape) != tuple(input.shape):
        raise ValueError(f"target of class probabilities must have the input's shape {tuple(input.shape)}, "
                         f"got {tuple(target.shape)}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    return logits, class_rows(target), row_shape


def row_losses(logits: Tensor, probabilities: Tensor, weight: Optional[Tensor], options: LossOptions) -> Tensor:
    """Per-row losses ``l_i`` of the module docstring in the loss dtype, differentiable by autograd."""
    dtype = loss_dtype(logits.dtype)
    z = softcapped(logits.to(dtype), options.softcap)
    targets = probabilities.to(dtype)
    if options.label_smoothing != 0.0:
        targets = targets * (1.0 - options.label_smoothing) + options.label_smoothing / logits.shape[1]
    if weight is not None:
        targets = targets * weight
    losses = -(targets * torch.log_softmax(z, dim=1)).sum(1)
    if options.z_loss != 0.0:
        losses = losses + options.z_loss * torch.logsumexp(z, dim=1).square()
    return losses

