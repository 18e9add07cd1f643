"""The kernel contract as ``torch.library`` ops: schemas, fake (meta) implementations and autograd.

Every kernel backend provides the same three ops (the C++ extension defines them in ``csrc/`` for CPU and
CUDA; the Triton backend defines them below with ``torch.library.custom_op``)::

    forward(logits, target, weight?, ignore_index, label_smoothing, z_loss, softcap, reverse_ce,
            reverse_ce_log_zero, inplace_backward) -> (losses, lse)
    backward(grad_losses, logits, target, weight?, lse, <the same scalars>) -> grad_logits
    backward_(grad_losses, logits!, target, weight?, lse, <the same scalars>) -> ()   # writes into logits

and the single-read pair (:mod:`flood_kernels._single_read`)::

    loss_and_grad(logits, target, weight?, flood_level, grad_scale, flood_rows, <the scalars>)
        -> (losses, grad_logits)      # grad row i = grad_scale * (sgn(l_i - b_i) if flood_rows else 1) * dl_i
    scale_grad_(grad!, grad_output) -> ()   # grad *= grad_output unless grad_output == 1 (tested on device)

For reductions "mean" and "sum", the O(N) epilogue (reduction, flood transform, ``d loss / d l_i``; the
math of :mod:`flood_kernels._flood`, whose ~8 tensor ops and autograd nodes cost more than the kernels on
small problems) is one op: the Triton backend's ``triton_flood_epilogue`` (also used by the CUDA backend on
GPU), and in the extension's CPU backend the whole loss is one op with one autograd node (``flood_mode`` is
``FLOOD_MODES[options.flood]``)::

    flooded_loss(logits, target, weight?, flood_level, flood_mode, mean, <the scalars>, inplace_backward,
                 single_read) -> (loss, raw_loss)
    flood_epilogue(losses, target, weight?, flood_level, flood_mode, mean, ignore_index)
        -> (loss, raw_loss, d loss / d losses)
    mean_denominator(target, weight?, ignore_index, dtype) -> denominator

``logits`` is ``(N, V)`` with class stride 1, ``target`` int64 ``(N,)``, ``weight`` ``(V,)`` in the loss
dtype (float32, or float64 for float64 logits), ``softcap == 0`` means no softcap. ``losses`` is ``(N,)``
and ``lse`` ``(N, 2)`` in the loss dtype: each row's log-sum-exp as ``[shift, log_sum]`` (the row's max and
``log sum exp(z - shift)``), not rounded into one float, so that a confident row's ``lse - z_y`` and
``p_y - 1`` keep their own precision (``LogSumExp`` in ``csrc/flood_ce_math.h``). ``grad_logits`` has the
logits' dtype and is contiguous. Every backend has
the same autograd formula (registered here for the Triton ops, in ``csrc/flood_ce_autograd.cpp`` for the
extension's, which saves the Python wrapper's per-call cost): the per-row ``grad_losses`` that autograd hands
over already holds grad_output, the flood sign and the mean denominator, and goes straight to the kernel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor

from . import compensated_sum
from ._inputs import loss_dtype

# flood_mode of the fused ops (csrc/flood_ce.h FloodMode).
FLOOD_MODES = {None: 0, "batch": 1, "individual": 2}


@dataclass(frozen=True)
class KernelOps:
    """The op triple of one backend."""

    forward: Callable[..., Tuple[Tensor, Tensor]]
    backward: Callable[..., Tensor]
    backward_inplace: Callable[..., None]
    loss_and_grad: Callable[..., Tuple[Tensor, Tensor]]
    scale_grad_: Callable[..., None]
    flooded_loss: Optional[Callable[..., Tuple[Tensor, Tensor]]] = None
    flood_epilogue: Optional[Callable[..., Tuple[Tensor, Tensor, Tensor]]] = None


def _empty_row_outputs(logits: Tensor, *args: Any) -> Tuple[Tensor, Tensor]:
    """Uninitialized ``(losses, lse)``, ``(N,)`` and ``(N, 2)``; also the forward op's fake implementation."""
    rows, dtype = logits.shape[0], loss_dtype(logits.dtype)
    return logits.new_empty(rows, dtype=dtype), logits.new_empty(rows, 2, dtype=dtype)


SECOND_DERIVATIVE_MESSAGE = (
    "flood_kernels: backward with create_graph=True (a gradient penalty, a Hessian-vector product, MAML): the fused "
    "kernels give first derivatives only, and a second derivative through them would silently miss the loss's "
    "curvature. Use backend='reference' (PyTorch ops, differentiable to any order; for the fused linear loss, "
    "flooded_cross_entropy(F.linear(input, linear_weight, linear_bias), target, backend='reference'))"
)


def first_derivatives_only(backward: Callable[..., Tuple[Any, ...]]) -> Callable[..., Tuple[Any, ...]]:
    """Decorator for an autograd backward that runs kernels: it raises :data:`SECOND_DERIVATIVE_MESSAGE` when
    called with create_graph=True (grad mode on in backward).

    Autograd does not record the kernels, so their gradient would be a constant to a second derivative: wrong, and
    silently so. ``torch.autograd.function.once_differentiable`` raises only when the gradient is differentiated
    and a grad_output required grad, and never for ``torch.autograd.grad(penalty, inputs)``, which prunes its
    error node (the node has no path to the logits; a single-read or fused-linear backward does not even hold
    them). The C++ extension's backward checks the same (``csrc/flood_ce_autograd.cpp``)."""
    @functools.wraps(backward)
    def wrapper(ctx: Any, *grad_outputs: Any) -> Tuple[Any, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError(SECOND_DERIVATIVE_MESSAGE)
        return backward(ctx, *grad_outputs)

    return wrapper


def _fake_backward(grad_losses: Tensor, logits: Tensor, *args: Any) -> Tensor:
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _fake_returns_nothing(*args: Any) -> None:
    return None


def _fake_loss_and_grad(logits: Tensor, *args: Any) -> Tuple[Tensor, Tensor]:
    return logits.new_empty(logits.shape[0], dtype=loss_dtype(logits.dtype)), _fake_backward(None, logits)


def _fake_reduced(logits: Tensor, *args: Any) -> Tuple[Tensor, Tensor]:
    dtype = loss_dtype(logits.dtype)
    return logits.new_empty((), dtype=dtype), logits.new_empty((), dtype=dtype)


def _fake_epilogue(losses: Tensor, *args: Any) -> Tuple[Tensor, Tensor, Tensor]:
    return losses.new_empty(()), losses.new_empty(()), torch.empty_like(losses)


def _fake_mean_denominator(target: Tensor, weight: Optional[Tensor], ignore_index: int,
                           dtype: torch.dtype) -> Tensor:
    return target.new_empty((), dtype=dtype)


def _epilogue_setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor, Tensor]) -> None:
    _, raw, row_scale = output
    ctx.save_for_backward(row_scale)
    ctx.mark_non_differentiable(raw, row_scale)
    ctx.set_materialize_grads(False)  # no zero tensors (launches) for the outputs without a gradient


def _epilogue_backward(ctx: Any, grad_loss: Optional[Tensor], *unused: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    (row_scale,) = ctx.saved_tensors
    grad_losses = None if grad_loss is None else row_scale * grad_loss.to(row_scale.dtype)
    return (grad_losses,) + (None,) * 6


def _writable_in_place(logits: Tensor) -> bool:
    """Rows must not overlap (an expanded or broadcast input cannot hold a gradient)."""
    return logits.shape[0] <= 1 or logits.stride(0) >= logits.shape[1]


def _make_autograd(ops: KernelOps):
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor]) -> None:
        logits, target, weight, *scalars, inplace_backward = inputs
        _, lse = output
        ctx.save_for_backward(logits, target, weight, lse)
        ctx.scalars = tuple(scalars)
        ctx.inplace_backward = inplace_backward
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zero tensor (a launch) for lse's gradient

    @first_derivatives_only
    def backward(ctx: Any, grad_losses: Optional[Tensor],
                 grad_lse: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
        if grad_losses is None:
            return (None,) * (3 + len(ctx.scalars) + 1)
        logits, target, weight, lse = ctx.saved_tensors
        grad_losses = grad_losses.to(lse.dtype).contiguous()
        if ctx.inplace_backward and _writable_in_place(logits):
            ops.backward_inplace(grad_losses, logits, target, weight, lse, *ctx.scalars)
            grad_logits = logits
        else:
            grad_logits = ops.backward(grad_losses, logits, target, weight, lse, *ctx.scalars)
        return (grad_logits,) + (None,) * (2 + len(ctx.scalars) + 1)

    return setup_context, backward


def register(namespace_prefix: str, ops: KernelOps, autograd: bool = True) -> KernelOps:
    """Register the fakes and (unless the op brings its own, as the C++ extension does) the autograd formula
    for one backend's ops, named ``flood_kernels::<prefix>forward`` etc."""
    def name(op: str) -> str:
        return f"flood_kernels::{namespace_prefix}{op}"

    forward_name = name("forward")
    torch.library.register_fake(forward_name, _empty_row_outputs)
    torch.library.register_fake(name("backward"), _fake_backward)
    torch.library.register_fake(name("backward_"), _fake_returns_nothing)
    torch.library.register_fake(name("loss_and_grad"), _fake_loss_and_grad)
    torch.library.register_fake(name("scale_grad_"), _fake_returns_nothing)
    if ops.flooded_loss is not None:
        torch.library.register_fake(name("flooded_loss"), _fake_reduced)
        torch.library.register_fake(name("flood_epilogue"), _fake_epilogue)
        torch.library.register_fake(name("mean_denominator"), _fake_mean_denominator)
    if autograd:
        setup_context, backward = _make_autograd(ops)
        torch.library.register_autograd(forward_name, backward, setup_context=setup_context)
    return ops


def _define_triton_ops() -> Optional[KernelOps]:
    try:
        from .triton import cross_entropy as triton_ce
        from .triton import flood_epilogue as triton_epilogue
    except ImportError:
        return None

    @torch.library.custom_op("flood_kernels::triton_forward", mutates_args=())
    def triton_forward(
        logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, label_smoothing: float,
        z_loss: float, softcap: float, reverse_ce: float, reverse_ce_log_zero: float, inplace_backward: bool,
    ) -> Tuple[Tensor, Tensor]:
        losses, lse = _empty_row_outputs(logits)
        triton_ce.forward(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reverse_ce,
                          reverse_ce_log_zero, losses, lse)
        return losses, lse

    @torch.library.custom_op("flood_kernels::triton_backward", mutates_args=())
    def triton_backward(
        grad_losses: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor], lse: Tensor,
        ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, reverse_ce: float,
        reverse_ce_log_zero: float,
    ) -> Tensor:
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        triton_ce.backward(grad_losses, logits, target, weight, lse, ignore_index, label_smoothing, z_loss,
                           softcap, reverse_ce, reverse_ce_log_zero, grad)
        return grad

    @torch.library.custom_op("flood_kernels::triton_backward_", mutates_args=("logits",))
    def triton_backward_(
        grad_losses: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor], lse: Tensor,
        ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, reverse_ce: float,
        reverse_ce_log_zero: float,
    ) -> None:
        triton_ce.backward(grad_losses, logits, target, weight, lse, ignore_index, label_smoothing, z_loss,
                           softcap, reverse_ce, reverse_ce_log_zero, logits)

    @torch.library.custom_op("flood_kernels::triton_loss_and_grad", mutates_args=())
    def triton_loss_and_grad(
        logits: Tensor, target: Tensor, weight: Optional[Tensor], flood_level: Tensor, grad_scale: Tensor,
        flood_rows: bool, ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
        reverse_ce: float, reverse_ce_log_zero: float,
    ) -> Tuple[Tensor, Tensor]:
        losses, grad = _fake_loss_and_grad(logits)
        triton_ce.loss_and_grad(logits, target, weight, flood_level, grad_scale, flood_rows, ignore_index,
                                label_smoothing, z_loss, softcap, reverse_ce, reverse_ce_log_zero, losses, grad)
        return losses, grad

    @torch.library.custom_op("flood_kernels::triton_scale_grad_", mutates_args=("grad",))
    def triton_scale_grad_(grad: Tensor, grad_output: Tensor) -> None:
        triton_ce.scale_grad_(grad, grad_output)

    @torch.library.custom_op("flood_kernels::triton_flood_epilogue", mutates_args=())
    def triton_flood_epilogue(
        losses: Tensor, target: Tensor, weight: Optional[Tensor], flood_level: Tensor, flood_mode: int, mean: bool,
        ignore_index: int,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        loss, raw, row_scale = _fake_epilogue(losses)
        triton_epilogue.flood_epilogue(losses, target, weight, flood_level, flood_mode, mean, ignore_index, loss, raw,
                                       row_scale)
        return loss, raw, row_scale

    torch.library.register_fake("flood_kernels::triton_flood_epilogue", _fake_epilogue)
    torch.library.register_autograd("flood_kernels::triton_flood_epilogue", _epilogue_backward,
                                    setup_context=_epilogue_setup_context)

    return register("triton_", KernelOps(triton_forward, triton_backward, triton_backward_, triton_loss_and_grad,
                                         triton_scale_grad_, flood_epilogue=triton_flood_epilogue))


def _load_extension_ops() -> Optional[KernelOps]:
    try:
        from . import _C  # noqa: F401  (loading it registers the ops with the dispatcher)
    except ImportError:
        return None
    ops = torch.ops.flood_kernels
    return register(
        "",
        KernelOps(ops.forward.default, ops.backward.default, ops.backward_.default, ops.loss_and_grad.default,
                  ops.scale_grad_.default, ops.flooded_loss.default),
        autograd=False,  # csrc/flood_ce_autograd.cpp: the same formula, registered in C++
    )


def _define_compensated_sum_ops() -> bool:
    """The fused linear loss's compensated grad_W sum (:mod:`flood_kernels.compensated_sum`) as two mutating ops,
    opaque to torch.compile: the PyTorch spec on any device, the fused Triton GEMM of
    :mod:`flood_kernels.triton.compensated_sum` for CUDA tensors. Returns whether that CUDA kernel exists::

        compensated_accumulate_(high!, low!, grad_logits, h) -> ()   # (high, low) += grad_logits.T @ h
        compensated_finish_(high!, low, scale?) -> ()                # high = (high + low * s) * scale
    """

    @torch.library.custom_op("flood_kernels::compensated_accumulate_", mutates_args=("high", "low"))
    def compensated_accumulate_(high: Tensor, low: Tensor, grad_logits: Tensor, h: Tensor) -> None:
        compensated_sum.accumulate_(high, low, grad_logits, h)

    @torch.library.custom_op("flood_kernels::compensated_finish_", mutates_args=("high",))
    def compensated_finish_(high: Tensor, low: Tensor, scale: Optional[Tensor]) -> None:
        compensated_sum.finish_(high, low, scale)

    torch.library.register_fake("flood_kernels::compensated_accumulate_", _fake_returns_nothing)
    torch.library.register_fake("flood_kernels::compensated_finish_", _fake_returns_nothing)
    try:
        from .triton import compensated_sum as triton_compensated_sum
    except ImportError:
        return False

    @compensated_accumulate_.register_kernel("cuda")
    def _(high: Tensor, low: Tensor, grad_logits: Tensor, h: Tensor) -> None:
        triton_compensated_sum.accumulate_(high, low, grad_logits, h)

    @compensated_finish_.register_kernel("cuda")
    def _(high: Tensor, low: Tensor, scale: Optional[Tensor]) -> None:
        triton_compensated_sum.finish_(high, low, scale)

    return True


TRITON_OPS: Optional[KernelOps] = _define_triton_ops()
EXTENSION_OPS: Optional[KernelOps] = _load_extension_ops()
COMPENSATED_SUM_ON_CUDA: bool = _define_compensated_sum_ops()
