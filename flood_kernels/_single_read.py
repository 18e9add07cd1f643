"""The single-read path: loss and gradient from one read of the logits, for flood=None and iFlood.

The two-pass design reads the logits in the forward, then reads them again and writes the gradient in the
backward: 2 reads + 1 write of ``N x V``. When the gradient's per-row scale is known inside the row, which
is the case for ``flood=None`` (``1 / denominator``) and per-sample flooding (``sgn(l_i - b_i) /
denominator``) with a "mean" or "sum" reduction, the forward can write the gradient right after computing
the row's loss, reading the row once from memory (1 read + 1 write). What is left for the backward is
grad_output, one scalar: ``scale_grad_`` multiplies by it on the device and skips the pass entirely when it
is 1, so a plain ``loss.backward()`` costs nothing more. Batch flooding keeps the two-pass design: its sign
depends on the mean over all rows, unknown while a row is in flight.

float16 logits keep the two-pass path: a float16 gradient stored before grad_output (a GradScaler's scale)
is applied would underflow, which is what the scale is there to prevent (bfloat16 has float32's range).

The gradient is held from forward to backward (the two-pass design allocates the same buffer in the
backward), and it is handed to the first backward: backward can run once (``retain_graph=True`` and a
second backward raise; ``FLOOD_KERNELS_SINGLE_READ=0`` selects the two-pass path, which supports it).

Which path is faster is measured, not assumed (``python -m flood_kernels.bench`` times both): the policy
``FLOOD_KERNELS_SINGLE_READ=auto`` (default) uses it where a measurement showed it faster (the C++ CPU
kernel, benchmarks/results/cpu); ``1`` forces it wherever eligible, ``0`` never uses it.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from ._flood import mean_denominator, reduce_and_flood
from ._inputs import LossOptions, loss_dtype
from ._ops import first_derivatives_only

# Backends whose single-read path beat their two-pass path in a committed measurement.
_FASTER_BY_MEASUREMENT = frozenset({"cpu"})
_POLICIES = ("auto", "0", "1")


def _policy() -> str:
    policy = os.environ.get("FLOOD_KERNELS_SINGLE_READ", "auto").strip() or "auto"
    if policy not in _POLICIES:
        raise ValueError(f"FLOOD_KERNELS_SINGLE_READ must be one of {_POLICIES}, got {policy!r}")
    return policy


def eligible(logits: Tensor, options: LossOptions, level: Tensor, backend: str, inplace_backward: bool,
             single_read: Optional[bool] = None) -> bool:
    """Whether this call takes the single-read path (metadata only: no host synchronization).

    ``single_read`` overrides the environment policy (the benchmark times both paths).
    """
    if single_read is None:
        policy = _policy()
        single_read = policy == "1" or (policy == "auto" and backend in _FASTER_BY_MEASUREMENT)
    return (single_read and backends.has_single_read(backend) and options.flood != "batch"
            and options.reduction != "none" and not inplace_backward and logits.dtype != torch.float16
            and torch.is_grad_enabled() and logits.requires_grad and not level.requires_grad)


class SingleReadCrossEntropy(torch.autograd.Function):
    """``(loss, raw_loss)`` of ``flooded_cross_entropy`` with the gradient computed in the forward."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, weight: Optional[Tensor], level: Tensor,
                options: LossOptions, backend: str) -> Tuple[Tensor, Tensor]:
        ops = backends.kernel_ops(backend)
        n_rows = logits.shape[0]
        denominator = None
        if options.reduction == "mean":
            denominator = mean_denominator(target, weight, options.ignore_index, level.dtype)
            grad_scale = 1.0 / denominator
        else:
            grad_scale = torch.ones((), dtype=level.dtype, device=logits.device)
        losses, grad = ops.loss_and_grad(
            logits, target, weight, level.expand(n_rows), grad_scale, options.flood == "individual",
            options.ignore_index, options.label_smoothing, options.z_loss, options.softcap or 0.0,
            options.reverse_ce, options.reverse_ce_log_zero,
        )
        loss, raw = reduce_and_flood(losses, target, weight, options.ignore_index, options.reduction,
                                     options.flood, level, denominator, backends.epilogue_op(backend, n_rows))
        ctx.save_for_backward(grad)
        ctx.backend = backend
        ctx.mark_non_differentiable(raw)
        return loss, raw

    @staticmethod
    @first_derivatives_only
    def backward(ctx: Any, grad_loss: Tensor, grad_raw: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
        if getattr(ctx, "gradient_handed_out", False):
            raise RuntimeError(
                "flooded_cross_entropy: the single-read path hands its precomputed gradient to the first "
                "backward and cannot backward twice (retain_graph=True); set FLOOD_KERNELS_SINGLE_READ=0 "
                "for the two-pass path, which can"
            )
        ctx.gradient_handed_out = True
        (grad,) = ctx.saved_tensors
        backends.kernel_ops(ctx.backend).scale_grad_(grad, grad_loss.to(loss_dtype(grad.dtype)))
        return grad, None, None, None, None, None
