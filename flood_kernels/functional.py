"""``flooded_cross_entropy``: cross-entropy with flooding (Ishida et al., 2020) or iFlood (Xie et al., 2022).

The N x V work is one fused kernel op per direction (see :mod:`flood_kernels._ops`); the flood transform
and the reduction are O(N) device ops (:mod:`flood_kernels._flood`), or, on the CPU backend, one epilogue
inside the same op and autograd node. No host synchronization.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _probability_targets, _single_read, backends, reference
from ._distributed import check_process_group
from ._flood import reduce_and_flood
from ._inputs import FloodLevel, LossOptions, as_rows, check_flood_level, check_weight, loss_dtype
from ._ops import FLOOD_MODES


def row_losses(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], options: LossOptions, backend: str,
    inplace_backward: bool = False,
) -> Tensor:
    """Per-row losses ``l_i`` of ``(N, V)`` logits on a resolved backend (0 on ignored rows)."""
    if backend == "reference":
        return reference.row_losses(
            logits, target, weight, options.ignore_index, options.label_smoothing, options.z_loss,
            options.softcap, options.reverse_ce, options.reverse_ce_log_zero,
        )
    losses, _ = backends.kernel_ops(backend).forward(
        logits, target, weight, options.ignore_index, options.label_smoothing, options.z_loss,
        options.softcap or 0.0, options.reverse_ce, options.reverse_ce_log_zero, inplace_backward,
    )
    return losses


def flood_row_losses(
    losses: Tensor, target: Optional[Tensor], weight: Optional[Tensor], options: LossOptions, level: Tensor,
    row_shape: torch.Size, backend: str = "reference", process_group: Optional[Any] = None,
) -> Tuple[Tensor, Tensor]:
    """Reduce and flood per-row losses (over the ranks of ``process_group`` when given); ``(loss, raw_loss)``
    with ``reduction='none'`` output reshaped. ``target`` None: probability targets (every row counts). GPU backends run the epilogue as one kernel
    (:func:`flood_kernels.backends.epilogue_op`)."""
    loss, raw = reduce_and_flood(losses, target, weight, options.ignore_index, options.reduction, options.flood,
                                 level, epilogue=backends.epilogue_op(backend, losses.shape[0]),
                                 process_group=process_group)
    if options.reduction == "none":
        return loss.reshape(row_shape), raw.reshape(row_shape)
    return loss, raw


def flooded_cross_entropy(
    input: Tensor,
    target: Tensor,
    *,
    flood_level: FloodLevel = 0.0,
    flood: Optional[str] = "batch",
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    reverse_ce: float = 0.0,
    reverse_ce_log_zero: float = -4.0,
    inplace_backward: bool = False,
    backend: str = "auto",
    return_raw: bool = False,
    process_group: Optional[Any] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Flooded cross-entropy of logits ``input`` against class indices ``target`` (or class probabilities).

    Per sample, ``l_i`` is ``F.cross_entropy(..., reduction="none")`` (weights, label smoothing, ignore_index)
    on ``softcap * tanh(input / softcap)`` when softcap is set, plus ``z_loss * lse_i**2`` and
    ``reverse_ce * (-reverse_ce_log_zero) * (1 - p_y)`` (symmetric cross-entropy). Then:

    * ``flood="batch"``: ``|J - b| + b`` with ``J`` the mean or sum of ``l_i`` (Ishida et al., 2020);
    * ``flood="individual"``: ``|l_i - b_i| + b_i`` per sample, then the reduction (iFlood); ``flood_level``
      may be a float, a 0-d tensor or per-sample levels of the target's shape;
    * ``flood=None``: plain cross-entropy.

    Layouts are those of ``nn.CrossEntropyLoss``, including its probability targets (a floating ``target`` of
    the input's shape: PyTorch ops in the loss dtype instead of the fused kernels, see
    :mod:`flood_kernels._probability_targets`; no ``ignore_index``, ``reverse_ce`` or ``inplace_backward``). The
    loss is float32 for every input dtype (float64 for float64 input). ``inplace_backward=True`` overwrites
    ``input`` with its gradient during backward (saves N x V memory; ``input`` must not be used afterwards).
    ``return_raw=True`` also returns the unflooded loss, detached, computed in the same pass.
    ``process_group`` (a ``torch.distributed`` group, e.g. ``torch.distributed.group.WORLD``) floods the loss
    of the whole data-parallel batch: the sums and the "mean" denominator are summed over the group before the
    flood transform, every rank gets the global loss, and its gradient is scaled for DDP / FSDP gradient
    averaging (:mod:`flood_kernels._distributed`).
    """
    options = LossOptions(flood, ignore_index, reduction, label_smoothing, z_loss, softcap, reverse_ce,
                          reverse_ce_log_zero)
    loss, raw = flooded_cross_entropy_with_options(input, target, options, flood_level, weight, backend,
                                                   inplace_backward, process_group=process_group)
    return (loss, raw) if return_raw else loss


def flooded_cross_entropy_with_options(
    input: Tensor, target: Tensor, options: LossOptions, flood_level: FloodLevel, weight: Optional[Tensor],
    backend: str, inplace_backward: bool = False, single_read: Optional[bool] = None,
    process_group: Optional[Any] = None,
) -> Tuple[Tensor, Tensor]:
    """``flooded_cross_entropy`` with validated options (what the module holds): ``(loss, raw_loss)``.

    ``single_read`` forces (True) or forbids (False) the single-read path where it applies (see
    :mod:`flood_kernels._single_read`); None follows ``FLOOD_KERNELS_SINGLE_READ``. With a ``process_group``
    the per-row losses come from the two-pass kernels and the epilogue sums over the group.
    """
    check_process_group(process_group, options.reduction)
    probabilities = _probability_targets.is_probability_target(target)
    if probabilities:  # flat_target: (rows, C) class probabilities instead of (rows,) indices
        _probability_targets.check_options(options, inplace_backward)
        logits, flat_target, row_shape = _probability_targets.probability_rows(input, target)
    else:
        logits, flat_target, row_shape = as_rows(input, target)
    dtype = loss_dtype(logits.dtype)
    weight = check_weight(weight, logits.shape[1], logits.device, dtype)
    level = check_flood_level(flood_level, options.flood, logits.shape[0], row_shape, logits.device, dtype)
    name = backends.resolve(backend, logits.device)
    if probabilities:  # PyTorch ops on every backend; every row counts
        losses = _probability_targets.row_losses(logits, flat_target, weight, options)
        return flood_row_losses(losses, None, weight, options, level, row_shape, process_group=process_group)
    if process_group is None:
        single_read = _single_read.eligible(logits, options, level, name, inplace_backward, single_read)
        if options.reduction != "none" and backends.has_fused_loss(name):
            return backends.kernel_ops(name).flooded_loss(
                logits, flat_target, weight, level, FLOOD_MODES[options.flood], options.reduction == "mean",
                options.ignore_index, options.label_smoothing, options.z_loss, options.softcap or 0.0,
                options.reverse_ce, options.reverse_ce_log_zero, inplace_backward, single_read,
            )
        if single_read:
            return _single_read.SingleReadCrossEntropy.apply(logits, flat_target, weight, level, options, name)
    losses = row_losses(logits, flat_target, weight, options, name, inplace_backward)
    return flood_row_losses(losses, flat_target, weight, options, level, row_shape, name, process_group)
