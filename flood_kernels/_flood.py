"""The flood transform and the reduction, applied to per-row losses on device.

These are O(N) tensor ops traced by autograd, so the gradient that reaches the per-row losses is exactly
``grad_output * sign(J - b) / denominator`` (batch flooding) or ``grad_output * sign(l_i - b_i) /
denominator`` (iFlood). The kernels' backward reads that per-row scale from device memory: the flood sign
and grad_output cost no extra pass over the N x V gradient, and nothing here synchronizes with the host.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor

from ._distributed import group_sums
from ._ops import FLOOD_MODES


def mean_denominator(target: Tensor, weight: Optional[Tensor], ignore_index: int, dtype: torch.dtype) -> Tensor:
    """PyTorch's "mean" denominator: the summed class weight (or the count) of the non-ignored rows.

    A target outside ``[0, V)`` reads no weight (on GPU an out-of-bounds gather would be a device assert that
    ends the process's CUDA context; a negative one would wrap): its row's loss is NaN, and so is the mean."""
    valid = target != ignore_index
    if weight is None:
        return valid.sum(dtype=dtype)
    in_range = valid & (target >= 0) & (target < weight.shape[0])
    safe_target = torch.where(in_range, target, 0)
    return torch.where(in_range, weight.to(dtype)[safe_target], 0.0).sum()


def flood(loss: Tensor, level: Tensor) -> Tensor:
    """``|loss - level| + level`` (Ishida et al., 2020): its gradient is ``sign(loss - level)``, 0 at equality."""
    return (loss - level).abs() + level


def reduce_and_flood(
    losses: Tensor,
    target: Optional[Tensor],
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    flood_mode: Optional[str],
    flood_level: Tensor,
    denominator: Optional[Tensor] = None,
    epilogue: Optional[Callable[..., Tuple[Tensor, Tensor, Tensor]]] = None,
    process_group: Optional[Any] = None,
) -> Tuple[Tensor, Tensor]:
    """Return ``(loss, raw_loss)`` from float32 per-row losses (0 on ignored rows).

    ``flood_level`` is a tensor on the losses' device: 0-d, or ``(N,)`` for per-sample levels. A caller that
    already has the "mean" denominator passes it. ``target`` None means probability targets: every row counts, and
    the "mean" denominator is the number of rows whatever the class weights (as in ``nn.CrossEntropyLoss``).
    ``epilogue`` (a backend's ``flood_epilogue`` op, see :func:`flood_kernels.backends.epilogue_op`) computes the
    same for reductions "mean" and "sum" in one kernel and one autograd node (class-index targets). With a
    ``process_group`` the sums and the denominator are those of the whole group before the flood transform
    (:mod:`flood_kernels._distributed`).
    """
    if epilogue is not None and reduction != "none" and process_group is None:
        loss, raw, _ = epilogue(losses, target, weight, flood_level, FLOOD_MODES[flood_mode], reduction == "mean",
                                ignore_index)
        return loss, raw.detach()
    flooded_rows = None
    if flood_mode == "individual":
        flooded_rows = flood(losses, flood_level)
        if target is not None:
            flooded_rows = torch.where(target != ignore_index, flooded_rows, 0.0)
    if reduction == "none":
        return (losses if flooded_rows is None else flooded_rows), losses.detach()
    sums = [losses.sum()] if flooded_rows is None else [losses.sum(), flooded_rows.sum()]
    if reduction == "mean":
        if denominator is None:
            denominator = (torch.full((), losses.shape[0], dtype=losses.dtype, device=losses.device)
                           if target is None else mean_denominator(target, weight, ignore_index, losses.dtype))
        sums.append(denominator)
    if process_group is not None:
        sums = list(group_sums(sums, process_group))
    if reduction == "mean":
        denominator = sums.pop()
        sums = [total / denominator for total in sums]
    raw = sums[0]
    if flood_mode == "batch":
        return flood(raw, flood_level), raw.detach()
    return sums[-1], raw.detach()
