"""Flooding the global batch under data parallelism: the reduced loss summed over a process group.

Under DDP or FSDP every rank holds a shard of the batch and the gradients are averaged over the ranks, so a
loss flooded on each rank floods each shard's mean: near ``b`` some ranks ascend while others descend. The
paper's ``|J - b| + b`` with ``J`` the mean over the global batch needs each rank's sums (the raw losses, the
flooded rows of iFlood, the "mean" denominator) summed over the group before the flood decision: one
all-reduce of at most three scalars per call, on the device (the current stream waits for NCCL's; nothing
waits on the host). Every rank returns the same global loss.

Each rank's backward gives ``world_size`` times its own samples' part of the global loss's gradient, so the
averaging all-reduce of DDP / FSDP leaves exactly the gradient of the global loss (as if each rank's loss were
the global loss and the collective were differentiable, with the same grad_output on every rank).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

if dist.is_available():  # a torch built without distributed has no collectives (and takes no process_group)
    import torch.distributed._functional_collectives as funcol


def check_process_group(process_group: Optional[Any], reduction: str) -> None:
    """``process_group`` must be None or a ``torch.distributed`` process group, with a "mean" or "sum" reduction."""
    if process_group is None:
        return
    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be None or a torch.distributed ProcessGroup (e.g. torch.distributed.group.WORLD "
            f"after init_process_group), got {type(process_group).__name__}"
        )
    if reduction == "none":
        raise ValueError("process_group needs reduction='mean' or 'sum': with reduction='none' every rank's "
                         "losses are already its own, there is nothing to sum over the group")


class _GroupSum(torch.autograd.Function):
    """Sum over the ranks of a group; the gradient is scaled by the group's size (see the module docstring).

    The functional all-reduce, not the in-place ``dist.all_reduce``: under torch.compile, torch 2.11 traces an
    in-place collective inside an autograd.Function so that the input's gradient comes out as zeros.
    """

    @staticmethod
    def forward(ctx: Any, local: Tensor, process_group: Any, world_size: int) -> Tensor:
        ctx.world_size = world_size
        return funcol.wait_tensor(funcol.all_reduce(local, "sum", process_group))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], None, None]:
        return grad * ctx.world_size, None, None


def group_sums(values: Sequence[Tensor], process_group: Any) -> Tuple[Tensor, ...]:
    """The 0-d ``values`` summed over ``process_group`` with one all-reduce."""
    totals = _GroupSum.apply(torch.stack(list(values)), process_group, dist.get_world_size(process_group))
    return tuple(totals.unbind())


class SharesProcessGroup:
    """Mixin for the loss modules: ``copy.deepcopy`` shares their ``process_group`` (a communicator handle, which
    cannot be copied) instead of failing, so a model that owns the loss can still be deep-copied (EMA, SWA)."""

    def __deepcopy__(self, memo: Dict[int, Any]) -> Any:
        group = self.__dict__.get("process_group")
        if group is not None:
            memo[id(group)] = group
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone
