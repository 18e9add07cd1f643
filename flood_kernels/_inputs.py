"""Argument checking and layout normalization shared by every entry point.

Every error names the offending argument. Layouts follow ``nn.CrossEntropyLoss``: ``(C,)`` with a 0-d
target, ``(N, C)`` with ``(N,)``, ``(N, C, d1, ...)`` with ``(N, d1, ...)``. Kernels see row-major
``(rows, C)`` logits with unit class stride (any row stride), int64 targets and weights in the loss dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

FloodLevel = Union[float, int, Tensor]
REDUCTIONS = ("mean", "sum", "none")
FLOOD_MODES = ("batch", "individual", None)


@dataclass(frozen=True)
class LossOptions:
    """The scalar options of the loss, validated; shared by the dense and the fused-linear entry points."""

    flood: Optional[str] = "batch"
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    reverse_ce: float = 0.0
    reverse_ce_log_zero: float = -4.0

    def __post_init__(self) -> None:
        if self.flood not in FLOOD_MODES:
            raise ValueError(f"flood must be 'batch', 'individual' or None, got {self.flood!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.flood == "batch" and self.reduction == "none":
            raise ValueError(
                "reduction='none' is undefined with flood='batch' (batch flooding floods the reduced loss); "
                "use flood='individual' or flood=None"
            )
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        _check_real("label_smoothing", self.label_smoothing)
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        _check_real("z_loss", self.z_loss)
        if self.z_loss < 0.0:
            raise ValueError(f"z_loss must be >= 0, got {self.z_loss}")
        if self.softcap is not None:
            _check_real("softcap", self.softcap)
            if self.softcap <= 0.0:
                raise ValueError(f"softcap must be None or > 0, got {self.softcap}")
        _check_real("reverse_ce", self.reverse_ce)
        if self.reverse_ce < 0.0:
            raise ValueError(f"reverse_ce must be >= 0, got {self.reverse_ce}")
        _check_real("reverse_ce_log_zero", self.reverse_ce_log_zero)
        if self.reverse_ce_log_zero >= 0.0:
            raise ValueError(f"reverse_ce_log_zero must be < 0 (a clipped log 0), got {self.reverse_ce_log_zero}")


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not -math.inf < value < math.inf:  # NaN compares false; unlike math.isfinite, traceable by dynamo
        raise ValueError(f"{name} must be finite, got {value}")


def check_flood_number(flood_level: object) -> None:
    """A flood level given as a Python number must be a finite real >= 0."""
    _check_real("flood_level", flood_level)
    if flood_level < 0:
        raise ValueError(f"flood_level must be >= 0, got {flood_level}")


# A private torch function (in torch 2.11 and 2.13); were it gone, transforms would meet the kernels' own errors.
_ARE_FUNCTORCH_TRANSFORMS_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def functorch_transforms_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jacrev, ...) is running. The kernel backends' autograd is not
    a functorch one (the extension's is C++; functorch rejects both), so under a transform "auto" is the reference
    backend, and values are not checked on the host. Not asked while torch.compile traces."""
    return not torch.compiler.is_compiling() and _ARE_FUNCTORCH_TRANSFORMS_ACTIVE()


def loss_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """The arithmetic and output dtype: float32 for every input dtype, float64 for float64 input."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def check_flood_level(flood_level: FloodLevel, flood: Optional[str], rows: int, row_shape: torch.Size,
                      device: torch.device, dtype: torch.dtype) -> Tensor:
    """Validate ``flood_level`` and return it as a ``dtype`` tensor on ``device``: 0-d, or ``(rows,)``.

    Python numbers are checked for sign and finiteness. Tensor levels are checked the same way only when
    that costs no device synchronization (CPU tensors, outside torch.compile and torch.func transforms); on GPU they
    are trusted.
    """
    if isinstance(flood_level, Tensor):
        if not (flood_level.is_floating_point() or flood_level.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"flood_level must be a float or a floating tensor, got dtype {flood_level.dtype}")
        if flood_level.dim() != 0:
            if flood != "individual":
                raise ValueError(
                    f"per-sample flood_level (shape {tuple(flood_level.shape)}) needs flood='individual', "
                    f"got flood={flood!r}"
                )
            if flood_level.shape != row_shape and tuple(flood_level.shape) != (rows,):
                raise ValueError(
                    f"per-sample flood_level must have the target's shape {tuple(row_shape)}, "
                    f"got {tuple(flood_level.shape)}"
                )
        on_host = flood_level.device.type == "cpu" and not torch.compiler.is_compiling()
        if on_host and not functorch_transforms_active():
            if not bool(torch.isfinite(flood_level).all()) or bool((flood_level < 0).any()):
                raise ValueError("flood_level must be finite and >= 0")
        level = flood_level.detach().to(device=device, dtype=dtype)
        return level.reshape(rows) if level.dim() != 0 else level
    check_flood_number(flood_level)
    # A fill on the device, not torch.tensor: building a CUDA tensor from a Python number is a blocking
    # host-to-device copy (a stream synchronization, and an error inside CUDA-graph capture).
    return torch.full((), float(flood_level), dtype=dtype, device=device)


def check_weight(weight: Optional[Tensor], classes: int, device: torch.device,
                 dtype: torch.dtype) -> Optional[Tensor]:
    """Class weights as a contiguous ``(C,)`` tensor of ``dtype`` on ``device`` (or None)."""
    if weight is None:
        return None
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError("weight must be a floating-point tensor of shape (C,)")
    if weight.shape != (classes,):
        raise ValueError(f"weight must have shape ({classes},) (one per class), got {tuple(weight.shape)}")
    return weight.detach().to(device=device, dtype=dtype).contiguous()


def check_target(target: Tensor, row_shape: Tuple[int, ...], device: torch.device) -> Tensor:
    """Targets as a contiguous int64 vector; ``row_shape`` is what the input layout implies."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"target must hold integer class indices here, got dtype {target.dtype} (probability targets of the "
            "input's shape are taken by flooded_cross_entropy and FloodedCrossEntropyLoss)"
        )
    if tuple(target.shape) != tuple(row_shape):
        raise ValueError(f"target has shape {tuple(target.shape)}, expected {tuple(row_shape)} for this input")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but input is on {device}")
    if target.dtype == torch.int64 and target.dim() == 1 and target.is_contiguous():
        return target
    return target.reshape(-1).to(torch.int64).contiguous()


def as_rows(input: Tensor, target: Tensor) -> Tuple[Tensor, Tensor, torch.Size]:
    """Reshape ``input`` to ``(rows, C)`` with unit class stride and ``target`` to ``(rows,)`` int64.

    Returns the 2-D logits, the flat targets and the target's shape (the shape of ``reduction='none'``).
    Row-major ``(N, C)`` input is used as it is (any row stride); other layouts are copied once.
    """
    logits, row_shape = input_rows(input)
    return logits, check_target(target, tuple(row_shape), input.device), row_shape


def input_rows(input: Tensor) -> Tuple[Tensor, torch.Size]:
    """``input`` as ``(rows, C)`` logits with unit class stride, and the shape of its samples (``input``'s shape
    without the class dimension): ``(C,)`` is one row, ``(N, C, d1, ...)`` has ``N * d1 * ...`` rows."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor of logits, got dtype {input.dtype}")
    if input.dim() == 0:
        raise ValueError("input must have at least one dimension (classes), got a 0-d tensor")
    classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if classes < 1:
        raise ValueError("input must have at least one class")
    return class_rows(input), torch.Size(input.shape[1:] if input.dim() == 1 else
                                         (input.shape[0],) + tuple(input.shape[2:]))


def class_rows(tensor: Tensor) -> Tensor:
    """A tensor of ``nn.CrossEntropyLoss``'s input layout as ``(rows, C)`` with unit class stride (a view where it
    can be: row-major ``(N, C)`` keeps any row stride; other layouts are copied once)."""
    if tensor.dim() == 1:
        rows = tensor.unsqueeze(0)
    elif tensor.dim() == 2:
        rows = tensor
    else:
        rows = tensor.movedim(1, -1).reshape(-1, tensor.shape[1])
    return rows if rows.stride(1) == 1 else rows.contiguous()
