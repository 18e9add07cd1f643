"""Fused ``F.linear`` + flooded cross-entropy that never holds the ``N x V`` logits.

Rows are processed in chunks of ``C`` rows: ``logits = h_c @ W.T + b`` (``C x V``, the input's dtype); the
backend's cross-entropy kernel gives the per-row losses and overwrites the chunk's logits with their gradient
``g``; then ``grad_input_c = g @ W``, ``grad_W += g.T @ h_c`` and ``grad_b += g.sum(0)``. Memory beyond the
inputs, weights and gradients: one chunk of logits (the default ``C`` keeps it near 256 MiB, or half the free
GPU memory where that is less) and the accumulator of grad_W beyond the gradient itself, for low-precision
weights: ``grad_weight_accumulator="float32"`` (the default) a float32 ``V x D`` sum (4 bytes per weight),
``"compensated"`` an int8 ``V x D`` low part next to the gradient (1 byte; :mod:`flood_kernels.compensated_sum`:
each chunk rounds the sum to 2**-15 of itself for bf16 instead of 2**-8, and measured, the error is float32
accumulation's), ``"weight_dtype"`` nothing (the sum rounded to the weight's dtype after every chunk).

How the loss's scale reaches the gradients. The per-row losses ``l`` go through the flood transform and the
reduction by autograd (:func:`flood_kernels.functional.flood_row_losses`), whose gradient is
``d loss / d l_i = c * f_i``: a scalar ``c`` (grad_output, the batch flood sign, the mean denominator) times a
row factor known in forward, ``f_i = [y_i != ignore_index]`` (batch flooding, no flooding) or
``f_i = [y_i != ignore_index] * sign(l_i - b_i)`` (iFlood). So forward computes the gradients of
``sum_i f_i l_i`` (three matmuls per chunk, nothing recomputed) and backward multiplies them by ``c``, read on
device from a row with ``f_i != 0``: no host synchronization, no ``N x V`` work after forward. With
``reduction="none"`` the row scales are the caller's ``grad_output_i``, unknown in forward, so forward only
computes the losses and backward recomputes each chunk's logits (four matmuls in all instead of three).

The two chunked passes are the ops ``flood_kernels::linear_chunked_forward`` / ``linear_chunked_backward``, so
torch.compile sees one op per pass (see :func:`_define_chunked_op`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import _ops, backends, compensated_sum
from ._distributed import SharesProcessGroup, check_process_group
from ._inputs import (FloodLevel, LossOptions, check_flood_level, check_target, check_weight,
                      functorch_transforms_active, loss_dtype)
from .functional import flood_row_losses, row_losses
from .modules import LossOptionAttributes

_CHUNK_BYTES = 1 << 28
_AUTOCAST_DEVICES = ("cpu", "cuda")
_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)
GRAD_WEIGHT_ACCUMULATORS = ("float32", "compensated", "weight_dtype")


def default_chunk_size(classes: int, element_size: int, free_bytes: Optional[int] = None) -> int:
    """Rows per chunk: the largest power of two whose ``rows x classes`` logits fit in 256 MiB and, when the free
    memory is known, in half of it (at least 1 row): near a full GPU the chunks shrink instead of running out."""
    budget = _CHUNK_BYTES if free_bytes is None else min(_CHUNK_BYTES, max(0, free_bytes) // 2)
    rows = max(1, budget // (classes * element_size))
    return 1 << (rows.bit_length() - 1)


def _free_bytes_for_chunks(h: Tensor, linear_weight: Tensor, accumulator: str) -> Optional[int]:
    """What a chunk's logits may use on a CUDA device: the driver's free memory and what torch's caching allocator
    holds unused, less the gradient buffers still to be allocated (grad_W's sum, a float32 ``V`` for grad_b and
    the ``N x D`` grad_input). None on other devices and while torch.compile traces (a driver query, not an op)."""
    if h.device.type != "cuda" or torch.compiler.is_compiling():
        return None
    free, _ = torch.cuda.mem_get_info(h.device)
    cached = torch.cuda.memory_reserved(h.device) - torch.cuda.memory_allocated(h.device)
    dtype = linear_weight.dtype
    weight_bytes = _sum_dtype(accumulator, dtype).itemsize + _uses_low_part(accumulator, dtype)  # + the int8 part
    buffers = linear_weight.numel() * weight_bytes + linear_weight.shape[0] * 4 + h.numel() * h.element_size()
    return free + cached - buffers


def _kernel_scalars(options: LossOptions) -> Tuple[object, ...]:
    return (options.ignore_index, options.label_smoothing, options.z_loss, options.softcap or 0.0,
            options.reverse_ce, options.reverse_ce_log_zero)


def _autocast_operands(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor]) -> Tuple[Any, ...]:
    """Under autocast, the operands in its dtype, as ``F.linear`` takes them (float64 stays as it is). The casts are
    differentiable: a float32 weight gets a float32 gradient, of the low-precision matmuls as with ``F.linear``."""
    if not isinstance(input, Tensor) or input.device.type not in _AUTOCAST_DEVICES:
        return input, linear_weight, linear_bias
    if not torch.is_autocast_enabled(input.device.type):
        return input, linear_weight, linear_bias
    dtype = torch.get_autocast_dtype(input.device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in _AUTOCAST_CASTS else t
                 for t in (input, linear_weight, linear_bias))


def _autocast_off(device: torch.device) -> Any:
    """A context that turns autocast off on ``device``, where autocast exists."""
    if device.type in _AUTOCAST_DEVICES:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _chunk_logits(h: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor]) -> Tensor:
    if linear_bias is None:
        return torch.mm(h, linear_weight.t())
    return torch.addmm(linear_bias, h, linear_weight.t())


def _chunk_losses(logits: Tensor, target: Tensor, weight: Optional[Tensor], options: LossOptions,
                  backend: str) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-row losses and log-sum-exp (None for the reference backend) of one chunk of logits."""
    if backend == "reference":
        return row_losses(logits, target, weight, options, backend), None
    return backends.kernel_ops(backend).forward(logits, target, weight, *_kernel_scalars(options), False)


def _chunk_grad_(logits: Tensor, target: Tensor, weight: Optional[Tensor], lse: Optional[Tensor], scale: Tensor,
                 options: LossOptions, backend: str) -> Tensor:
    """``scale_i * d l_i / d logits`` of one chunk: kernel backends write it over ``logits``."""
    if backend == "reference":
        with torch.enable_grad():
            logits = logits.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(row_losses(logits, target, weight, options, backend), logits, scale)
        return grad
    backends.kernel_ops(backend).backward_inplace(scale, logits, target, weight, lse, *_kernel_scalars(options))
    return logits


def _row_factor(losses: Tensor, target: Tensor, level: Tensor, options: LossOptions) -> Tensor:
    """``f_i`` of the module docstring: ``d loss / d l_i`` up to one scalar, for the non-"none" reductions."""
    valid = target != options.ignore_index
    if options.flood == "individual":
        return torch.where(valid, torch.sign(losses - level), 0.0)
    return valid.to(losses.dtype)


def _uniform_scale(grad_losses: Tensor, factor: Tensor) -> Tensor:
    """The scalar ``c`` with ``grad_losses == c * factor``, as a 1-element tensor (0 when every factor is 0).

    Factors are -1, 0 or 1, so ``grad_losses_i * factor_i == c`` exactly on every row with a nonzero factor;
    their max picks it without a data-dependent index (traceable by torch.compile, no host sync).
    """
    nonzero = factor != 0
    candidates = torch.where(nonzero, grad_losses * factor, float("-inf"))
    if candidates.numel() == 0:
        return factor.new_zeros(1)
    return torch.where(nonzero.any(), candidates.amax(), 0.0).reshape(1)


def _scaled(buffer: Optional[Tensor], scale: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``buffer * scale`` computed in the scale's precision, as ``dtype``; reuses ``buffer`` when it has ``dtype``.
    On CPU a slice of rows at a time: there a ``mul`` whose output dtype is not the computation's takes a float32
    temporary of its whole size (4 bytes per weight); CUDA casts inside the kernel, and so does compiled code."""
    if buffer is None:
        return None
    if scale is None:
        return buffer.to(dtype)
    out = buffer if buffer.dtype == dtype else torch.empty_like(buffer, dtype=dtype)
    if buffer.is_cuda or torch.compiler.is_compiling():
        return torch.mul(buffer, scale, out=out)
    for rows in compensated_sum.row_slices(buffer):
        torch.mul(buffer[rows], scale, out=out[rows])
    return out


def _uses_low_part(accumulator: str, dtype: torch.dtype) -> bool:
    """Whether grad_W of a ``dtype`` weight is summed with the compensated sum's int8 low part."""
    return accumulator == "compensated" and compensated_sum.uses_low_part(dtype)


def _sum_dtype(accumulator: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a gradient of a ``dtype`` parameter is summed in over the chunks (with the low part, if any)."""
    if accumulator == "weight_dtype" or _uses_low_part(accumulator, dtype):
        return dtype
    return torch.promote_types(dtype, torch.float32)


def _check_compensated_sum_available(device: torch.device) -> None:
    if device.type == "cuda" and not _ops.COMPENSATED_SUM_ON_CUDA:
        raise RuntimeError('grad_weight_accumulator="compensated" needs Triton on CUDA (pip install triton); '
                           'use "float32" or "weight_dtype" without it')


class _Gradients:
    """Gradient buffers filled chunk by chunk: grad_input rows in the input's dtype (each row is one matmul);
    grad_W and grad_b sums as ``accumulator`` says (module docstring): float32 (for grad_b also under
    "compensated"), the weight's dtype, or for grad_W of a 16-bit weight the compensated (high, int8 low) pair.
    None where a gradient is not needed (and ``weight_low`` without the pair)."""

    def __init__(self, input: Optional[Tensor], weight: Optional[Tensor], weight_low: Optional[Tensor],
                 bias: Optional[Tensor]) -> None:
        self.input, self.weight, self.weight_low, self.bias = input, weight, weight_low, bias

    @classmethod
    def allocate(cls, h: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], needs: Sequence[bool],
                 accumulator: str) -> "_Gradients":
        def zeros(param: Tensor, dtype: torch.dtype) -> Tensor:
            return torch.zeros(param.shape, dtype=dtype, device=param.device)

        low_part = needs[1] and _uses_low_part(accumulator, linear_weight.dtype)
        if low_part:
            _check_compensated_sum_available(linear_weight.device)
        bias_accumulator = "float32" if accumulator == "compensated" else accumulator  # V floats: no low part
        return cls(torch.empty(h.shape, dtype=h.dtype, device=h.device) if needs[0] else None,
                   zeros(linear_weight, _sum_dtype(accumulator, linear_weight.dtype)) if needs[1] else None,
                   zeros(linear_weight, torch.int8) if low_part else None,
                   zeros(linear_bias, _sum_dtype(bias_accumulator, linear_bias.dtype)) if needs[2] else None)

    def outputs(self, like: Tensor) -> Tuple[Tensor, ...]:
        """The four buffers as an op returns them: an absent one as an empty tensor (an op returns no None)."""
        return tuple(like.new_empty(0) if buffer is None else buffer
                     for buffer in (self.input, self.weight, self.weight_low, self.bias))

    @classmethod
    def from_outputs(cls, outputs: Sequence[Tensor], needs: Sequence[bool], accumulator: str,
                     weight_dtype: torch.dtype) -> "_Gradients":
        """The inverse of :meth:`outputs`: which buffers exist follows from ``needs``, not from their sizes (a
        needed grad_input of zero rows is empty too)."""
        present = (needs[0], needs[1], needs[1] and _uses_low_part(accumulator, weight_dtype), needs[2])
        return cls(*(buffer if keep else None for buffer, keep in zip(outputs, present)))

    def add(self, rows: slice, grad_logits: Tensor, h: Tensor, linear_weight: Tensor) -> None:
        if self.input is not None:
            torch.mm(grad_logits, linear_weight, out=self.input[rows])
        if self.weight is not None:
            if self.weight_low is not None:
                torch.ops.flood_kernels.compensated_accumulate_(self.weight, self.weight_low, grad_logits, h)
            elif self.weight.dtype == grad_logits.dtype:
                self.weight.addmm_(grad_logits.t(), h)
            elif grad_logits.is_cuda:  # cuBLAS reads and writes the float32 accumulator: no temporary
                torch.addmm(self.weight, grad_logits.t(), h, out_dtype=self.weight.dtype, out=self.weight)
            else:  # no mixed-precision GEMM on CPU: the float32 product a slice of the vocabulary at a time
                compensated_sum.add_float32_products(grad_logits, h, self._add_to_weight)
        if self.bias is not None:
            self.bias += grad_logits.sum(0, dtype=self.bias.dtype)

    def _add_to_weight(self, classes: slice, product: Tensor) -> None:
        self.weight[classes] += product

    def scaled(self, scale: Optional[Tensor],
               dtypes: Tuple[Optional[torch.dtype], ...]) -> Tuple[Optional[Tensor], ...]:
        """The gradients of (input, weight, bias) times ``scale`` (None: 1), in ``dtypes``; buffers reused in place
        where they have the dtype."""
        if self.weight_low is not None:
            torch.ops.flood_kernels.compensated_finish_(self.weight, self.weight_low, scale)
            weight = self.weight
        else:
            weight = _scaled(self.weight, scale, dtypes[1])
        return _scaled(self.input, scale, dtypes[0]), weight, _scaled(self.bias, scale, dtypes[2])


def _keeps_lse(reduction: str, needs: Sequence[bool], backend: str) -> bool:
    """Whether forward keeps each row's log-sum-exp for backward: reduction="none" recomputes the chunks' logits
    there, and the kernel backends then skip the softmax's reductions."""
    return reduction == "none" and any(needs) and backend != "reference"


def _computes_gradients_in_forward(reduction: str, needs: Sequence[bool]) -> bool:
    """The fused path of the module docstring: every reduction but "none", when any gradient is needed."""
    return any(needs) and reduction != "none"


def _forward_buffers(h: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], reduction: str, backend: str,
                     accumulator: str, needs: Sequence[bool]) -> Tuple[Tensor, Tensor, Tensor, _Gradients]:
    """What forward's pass fills (also its fake outputs): the losses, each row's lse where :func:`_keeps_lse`, the
    row factors and gradient sums on the fused path; an absent tensor is empty."""
    fused = _computes_gradients_in_forward(reduction, needs)
    rows = h.shape[0]
    losses = torch.empty(rows, dtype=loss_dtype(h.dtype), device=h.device)
    lse = losses.new_empty((rows, 2) if _keeps_lse(reduction, needs, backend) else (0,))
    factor = torch.empty_like(losses) if fused else losses.new_empty(0)
    grads = _Gradients.allocate(h, linear_weight, linear_bias, needs if fused else (False,) * 3, accumulator)
    return losses, lse, factor, grads


def _chunked_forward(
    h: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
    level: Tensor, flood: Optional[str], ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
    softcap: Optional[float], reverse_ce: float, reverse_ce_log_zero: float, backend: str, chunk_size: int,
    accumulator: str, needs: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward's pass: (losses, lse, factor, grad_input, grad_W, grad_W's low part, grad_b), each absent one
    empty. The gradients are those of ``sum_i f_i l_i`` on the fused path (module docstring)."""
    options = LossOptions(flood, ignore_index, reduction, label_smoothing, z_loss, softcap, reverse_ce,
                          reverse_ce_log_zero)
    losses, lse, factor, grads = _forward_buffers(h, linear_weight, linear_bias, reduction, backend, accumulator,
                                                  needs)
    fused, keep_lse = _computes_gradients_in_forward(reduction, needs), _keeps_lse(reduction, needs, backend)
    rows = h.shape[0]
    for start in range(0, rows, chunk_size):
        chunk = slice(start, min(start + chunk_size, rows))
        h_chunk, target_chunk = h[chunk], target[chunk]
        logits = _chunk_logits(h_chunk, linear_weight, linear_bias)
        losses[chunk], lse_chunk = _chunk_losses(logits, target_chunk, weight, options, backend)
        if keep_lse:
            lse[chunk] = lse_chunk
        if fused:
            level_chunk = level if level.dim() == 0 else level[chunk]
            factor[chunk] = _row_factor(losses[chunk], target_chunk, level_chunk, options)
            grads.add(chunk, _chunk_grad_(logits, target_chunk, weight, lse_chunk, factor[chunk], options, backend),
                      h_chunk, linear_weight)
        del logits  # before the next chunk's logits exist: one chunk of logits alive at a time, not two
    return (losses, lse, factor) + grads.outputs(losses)


def _fake_chunked_forward(h, linear_weight, linear_bias, target, weight, level, flood, ignore_index, reduction,
                          *floats_and_settings):
    *_, backend, chunk_size, accumulator, needs = floats_and_settings
    losses, lse, factor, grads = _forward_buffers(h, linear_weight, linear_bias, reduction, backend, accumulator,
                                                  needs)
    return (losses, lse, factor) + grads.outputs(losses)


def _chunked_backward(
    h: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
    lse: Optional[Tensor], grad_losses: Tensor, flood: Optional[str], ignore_index: int, reduction: str,
    label_smoothing: float, z_loss: float, softcap: Optional[float], reverse_ce: float, reverse_ce_log_zero: float,
    backend: str, chunk_size: int, accumulator: str, needs: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The second chunked pass of ``reduction="none"``: logits again, the kernel applies ``grad_losses`` per row;
    (grad_input, grad_W, grad_W's low part, grad_b) as the sums, each absent one empty."""
    options = LossOptions(flood, ignore_index, reduction, label_smoothing, z_loss, softcap, reverse_ce,
                          reverse_ce_log_zero)
    scale = grad_losses.to(loss_dtype(h.dtype)).contiguous()
    grads = _Gradients.allocate(h, linear_weight, linear_bias, needs, accumulator)
    for start in range(0, h.shape[0], chunk_size):
        chunk = slice(start, min(start + chunk_size, h.shape[0]))
        logits = _chunk_logits(h[chunk], linear_weight, linear_bias)
        lse_chunk = None if lse is None else lse[chunk]
        grads.add(chunk, _chunk_grad_(logits, target[chunk], weight, lse_chunk, scale[chunk], options, backend),
                  h[chunk], linear_weight)
        del logits  # one chunk of logits alive at a time
    return grads.outputs(scale)


def _fake_chunked_backward(h, linear_weight, linear_bias, target, weight, lse, grad_losses, *options_and_settings):
    *_, accumulator, needs = options_and_settings
    return _Gradients.allocate(h, linear_weight, linear_bias, needs, accumulator).outputs(grad_losses)


def _define_chunked_op(name: str, impl: Callable, fake: Callable) -> Callable[..., Tuple[Tensor, ...]]:
    """``impl`` as the op ``flood_kernels::name`` (its schema from the annotations), for the kernel backends;
    returns the pass to call, which is the op, or ``impl`` itself for the reference backend.

    Why ops: torch.compile then sees one op per pass, so nothing in the graph depends on the number of rows
    (dynamic shapes compile once), no chunk loop is unrolled into it, and one chunk of logits is alive at a time
    whatever the compiler schedules. The reference backend calls ``impl`` directly: its chunk gradients are
    autograd's, which does not record inside an op. Arguments: the tensors, the LossOptions fields in order, then
    the backend, the chunk size, the grad_W accumulator and which of (input, weight, bias) need a gradient.
    """
    backend_position = list(inspect.signature(impl).parameters).index("backend")

    @functools.wraps(impl)
    def kernel_backends_only(*args: Any) -> Tuple[Tensor, ...]:
        if args[backend_position] == "reference":
            raise ValueError("backend='reference' runs the chunked passes outside the ops (autograd does not record "
                             "inside an op); the ops take a kernel backend")
        return impl(*args)

    torch.library.custom_op(f"flood_kernels::{name}", kernel_backends_only, mutates_args=()).register_fake(fake)
    op = getattr(torch.ops.flood_kernels, name)

    def run(*args: Any) -> Tuple[Tensor, ...]:
        return (impl if args[backend_position] == "reference" else op)(*args)

    return run


_forward_pass = _define_chunked_op("linear_chunked_forward", _chunked_forward, _fake_chunked_forward)
_backward_pass = _define_chunked_op("linear_chunked_backward", _chunked_backward, _fake_chunked_backward)


def _op_arguments(options: LossOptions, backend: str, chunk_size: int, accumulator: str,
                  needs: Sequence[bool]) -> Tuple[Any, ...]:
    """The trailing arguments of the two chunked ops: the LossOptions fields in their order, then the settings
    (written out: torch 2.11's compiler does not trace dataclasses.astuple)."""
    return (options.flood, options.ignore_index, options.reduction, options.label_smoothing, options.z_loss,
            options.softcap, options.reverse_ce, options.reverse_ce_log_zero, backend, chunk_size, accumulator,
            list(needs))


class _LinearRowLosses(torch.autograd.Function):
    """Per-row losses of ``h @ W.T + b``; the gradients come from the chunked passes of the module docstring.

    The passes are the ops ``linear_chunked_forward`` / ``linear_chunked_backward``; this plain autograd.Function
    around them hands the fused path's gradient buffers from forward to backward and scales them in place there,
    which saves a ``V x D`` copy that a functional backward would need.
    """

    @staticmethod
    def forward(ctx, h, linear_weight, linear_bias, target, weight, level, options, backend, chunk_size,
                grad_weight_accumulator, grad_enabled):
        needs = tuple(need and grad_enabled for need in ctx.needs_input_grad[:3])
        ctx.arguments = _op_arguments(options, backend, chunk_size, grad_weight_accumulator, needs)
        losses, lse, factor, *buffers = _forward_pass(h, linear_weight, linear_bias, target, weight, level,
                                                      *ctx.arguments)
        fused = _computes_gradients_in_forward(options.reduction, needs)
        ctx.reduction, ctx.needs, ctx.accumulator = options.reduction, needs, grad_weight_accumulator
        ctx.dtypes = (h.dtype, linear_weight.dtype, None if linear_bias is None else linear_bias.dtype)
        ctx.grads = _Gradients.from_outputs(buffers, needs, grad_weight_accumulator, linear_weight.dtype) \
            if fused else None
        ctx.factor = factor if fused else None
        if options.reduction == "none" and any(needs):
            ctx.save_for_backward(h, linear_weight, linear_bias, target, weight,
                                  lse if _keeps_lse(options.reduction, needs, backend) else None)
        return losses

    @staticmethod
    @_ops.first_derivatives_only
    def backward(ctx, grad_losses):
        with _autocast_off(grad_losses.device):
            if ctx.reduction == "none":
                h, linear_weight, linear_bias, target, weight, lse = ctx.saved_tensors
                buffers = _backward_pass(h, linear_weight, linear_bias, target, weight, lse, grad_losses,
                                         *ctx.arguments)
                grads = _Gradients.from_outputs(buffers, ctx.needs, ctx.accumulator, linear_weight.dtype)
                scale = None
            else:
                if ctx.grads is None:
                    raise RuntimeError(
                        "linear_flooded_cross_entropy computes its gradients in forward and consumes them in the "
                        "first backward; call the loss again to backpropagate a second time"
                    )
                grads, ctx.grads = ctx.grads, None
                scale = _uniform_scale(grad_losses, ctx.factor)
            results = grads.scaled(scale, ctx.dtypes)
        return results + (None,) * 8


def _check_linear(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor]) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor of shape (..., D), got dtype {input.dtype}")
    if input.dim() == 0:
        raise ValueError("input must have shape (..., D), got a 0-d tensor")
    features = input.shape[-1]
    if not isinstance(linear_weight, Tensor):
        raise TypeError(f"linear_weight must be a tensor, got {type(linear_weight).__name__}")
    if linear_weight.dim() != 2 or linear_weight.shape[1] != features:
        raise ValueError(f"linear_weight must have shape (V, {features}) to match input's last dimension, "
                         f"got {tuple(linear_weight.shape)}")
    if linear_weight.shape[0] < 1:
        raise ValueError("linear_weight must have at least one row (one per class)")
    named = [("linear_weight", linear_weight)]
    if linear_bias is not None:
        if not isinstance(linear_bias, Tensor):
            raise TypeError(f"linear_bias must be a tensor or None, got {type(linear_bias).__name__}")
        if tuple(linear_bias.shape) != (linear_weight.shape[0],):
            raise ValueError(f"linear_bias must have shape ({linear_weight.shape[0]},) (one per class), "
                             f"got {tuple(linear_bias.shape)}")
        named.append(("linear_bias", linear_bias))
    for name, tensor in named:
        if tensor.dtype != input.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but input has dtype {input.dtype}")
        if tensor.device != input.device:
            raise ValueError(f"{name} is on {tensor.device} but input is on {input.device}")


def _check_chunk_size(chunk_size: Optional[int], h: Tensor, linear_weight: Tensor, accumulator: str) -> int:
    if chunk_size is None:
        return default_chunk_size(linear_weight.shape[0], h.element_size(),
                                  _free_bytes_for_chunks(h, linear_weight, accumulator))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def linear_flooded_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
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
    chunk_size: Optional[int] = None,
    grad_weight_accumulator: str = "float32",
    backend: str = "auto",
    return_raw: bool = False,
    process_group: Optional[Any] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Flooded cross-entropy of ``F.linear(input, linear_weight, linear_bias)`` without the ``N x V`` logits.

    ``input`` is ``(..., D)`` with ``target`` of shape ``(...)`` (each row of ``input`` is one sample);
    ``linear_weight`` is ``(V, D)``, ``linear_bias`` ``(V,)``. The value and gradients are those of
    :func:`flood_kernels.flooded_cross_entropy` on the ``(N, V)`` logits with the same options (argument
    names follow ``F.linear_cross_entropy``). Rows go through in chunks of ``chunk_size`` (default: from V and
    the free memory, about 256 MiB of logits per chunk). ``grad_weight_accumulator`` says how grad_W and grad_b are
    summed over the chunks for bfloat16 / float16 weights: "float32" (4 bytes per weight, cast at the end),
    "compensated" (grad_W as the gradient plus an int8 low part, 1 byte per weight, with the error of "float32"
    accumulation, measured; grad_b in float32; the fused GEMM of :mod:`flood_kernels.triton.compensated_sum` on
    CUDA), or "weight_dtype" (no extra memory, one rounding to the weight's dtype per chunk).
    Gradients are computed in forward and consumed by the first backward (reduction="none": recomputed there).
    ``process_group`` floods the loss of the whole data-parallel batch (see :func:`flooded_cross_entropy`).
    """
    options = LossOptions(flood, ignore_index, reduction, label_smoothing, z_loss, softcap, reverse_ce,
                          reverse_ce_log_zero)
    loss, raw = linear_flooded_cross_entropy_with_options(input, linear_weight, target, linear_bias, options,
                                                          flood_level, weight, chunk_size, grad_weight_accumulator,
                                                          backend, process_group)
    return (loss, raw) if return_raw else loss


def linear_flooded_cross_entropy_with_options(
    input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Optional[Tensor], options: LossOptions,
    flood_level: FloodLevel, weight: Optional[Tensor], chunk_size: Optional[int], grad_weight_accumulator: str,
    backend: str, process_group: Optional[Any] = None,
) -> Tuple[Tensor, Tensor]:
    """``linear_flooded_cross_entropy`` with validated options (what the module holds): ``(loss, raw_loss)``."""
    if functorch_transforms_active():
        raise RuntimeError("linear_flooded_cross_entropy does not run under torch.func transforms (grad, vmap, "
                           "jacrev, ...): its chunked gradients are not a functorch autograd. Use "
                           "flooded_cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...), which "
                           "runs the reference backend under them")
    input, linear_weight, linear_bias = _autocast_operands(input, linear_weight, linear_bias)
    _check_linear(input, linear_weight, linear_bias)
    check_process_group(process_group, options.reduction)
    if grad_weight_accumulator not in GRAD_WEIGHT_ACCUMULATORS:
        raise ValueError(f"grad_weight_accumulator must be one of {', '.join(map(repr, GRAD_WEIGHT_ACCUMULATORS))}, "
                         f"got {grad_weight_accumulator!r}")
    classes, features = linear_weight.shape
    row_shape = input.shape[:-1]
    flat_target = check_target(target, tuple(row_shape), input.device)
    h = input.reshape(-1, features)
    chunk = _check_chunk_size(chunk_size, h, linear_weight, grad_weight_accumulator)
    dtype = loss_dtype(input.dtype)
    weight = check_weight(weight, classes, input.device, dtype)
    level = check_flood_level(flood_level, options.flood, h.shape[0], row_shape, input.device, dtype)
    name = backends.resolve(backend, input.device)
    with _autocast_off(input.device):  # the chunks' matmuls run in the operands' dtype (and the accumulators')
        losses = _LinearRowLosses.apply(h, linear_weight, linear_bias, flat_target, weight, level, options, name,
                                        chunk, grad_weight_accumulator, torch.is_grad_enabled())
    return flood_row_losses(losses, flat_target, weight, options, level, row_shape, process_group=process_group)


class LinearFloodedCrossEntropyLoss(LossOptionAttributes, SharesProcessGroup, nn.Module):
    """Loss module for :func:`linear_flooded_cross_entropy`; holds no linear weight (pass the LM head's).

    ``forward(input, linear_weight, target, linear_bias=None)``. ``weight`` and a tensor ``flood_level`` are
    buffers, as in :class:`flood_kernels.FloodedCrossEntropyLoss`; after each call ``last_raw_loss`` holds the
    unflooded loss, detached, for logging. ``process_group`` floods the loss of the whole data-parallel batch.
    """

    def __init__(
        self,
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
        chunk_size: Optional[int] = None,
        grad_weight_accumulator: str = "float32",
        backend: str = "auto",
        process_group: Optional[Any] = None,
    ) -> None:
        super().__init__()
        self.options = LossOptions(flood, ignore_index, reduction, label_smoothing, z_loss, softcap, reverse_ce,
                                   reverse_ce_log_zero)
        self.register_buffer("weight", weight)
        if isinstance(flood_level, Tensor):
            self.register_buffer("flood_level", flood_level)
        else:
            self.flood_level = flood_level
        self.chunk_size = chunk_size
        self.grad_weight_accumulator = grad_weight_accumulator
        self.backend = backend
        self.process_group = process_group
        self.last_raw_loss: Optional[Tensor] = None

    def forward(self, input: Tensor, linear_weight: Tensor, target: Tensor,
                linear_bias: Optional[Tensor] = None) -> Tensor:
        loss, raw = linear_flooded_cross_entropy_with_options(
            input, linear_weight, target, linear_bias, self.options, self.flood_level, self.weight, self.chunk_size,
            self.grad_weight_accumulator, self.backend, self.process_group)
        self.last_raw_loss = raw
        return loss

    def extra_repr(self) -> str:
        o = self.options
        level = self.flood_level if not isinstance(self.flood_level, Tensor) else "tensor"
        return (f"flood={o.flood!r}, flood_level={level}, reduction={o.reduction!r}, "
                f"ignore_index={o.ignore_index}, label_smoothing={o.label_smoothing}, z_loss={o.z_loss}, "
                f"softcap={o.softcap}, reverse_ce={o.reverse_ce}, chunk_size={self.chunk_size}, "
                f"grad_weight_accumulator={self.grad_weight_accumulator!r}, backend={self.backend!r}")
