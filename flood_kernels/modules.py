"""``FloodedCrossEntropyLoss``: a drop-in for ``nn.CrossEntropyLoss`` with flooding."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ._distributed import SharesProcessGroup
from ._inputs import FloodLevel, LossOptions
from .functional import flooded_cross_entropy_with_options


def _option_attribute(name: str) -> property:
    def get(self: Any) -> Any:
        return getattr(self.options, name)

    def set_(self: Any, value: Any) -> None:
        self.options = dataclasses.replace(self.options, **{name: value})

    return property(get, set_, doc=f"The loss option ``{name}``; an assignment is checked as the constructor does.")


class LossOptionAttributes:
    """The loss options of a module as attributes, as ``nn.CrossEntropyLoss`` has ``reduction``, ``ignore_index`` and
    ``label_smoothing`` (code that reads ``criterion.ignore_index`` to mask its metrics, or sets
    ``criterion.reduction``, keeps working). They read and replace the module's validated ``options``."""

    options: LossOptions
    flood = _option_attribute("flood")
    ignore_index = _option_attribute("ignore_index")
    reduction = _option_attribute("reduction")
    label_smoothing = _option_attribute("label_smoothing")
    z_loss = _option_attribute("z_loss")
    softcap = _option_attribute("softcap")
    reverse_ce = _option_attribute("reverse_ce")
    reverse_ce_log_zero = _option_attribute("reverse_ce_log_zero")


class FloodedCrossEntropyLoss(LossOptionAttributes, SharesProcessGroup, nn.Module):
    """``nn.CrossEntropyLoss`` with the flooding options of :func:`flooded_cross_entropy`.

    Same argument names, defaults, input layouts and target forms (class indices or probabilities) as
    ``nn.CrossEntropyLoss``. ``weight`` is a buffer
    (moves with ``.to()``); a tensor ``flood_level`` is a buffer too, so a schedule can update it in place
    (``loss_fn.flood_level.fill_(b)``) without recompiling under torch.compile. After each call,
    ``last_raw_loss`` holds the unflooded loss, detached, for logging. ``process_group`` floods the loss of
    the whole data-parallel batch (see :func:`flooded_cross_entropy`). The loss options are attributes too
    (``reduction``, ``ignore_index``, ``label_smoothing``, ``flood``, ...: :class:`LossOptionAttributes`).
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
        self.backend = backend
        self.process_group = process_group
        self.last_raw_loss: Optional[Tensor] = None

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        loss, raw = flooded_cross_entropy_with_options(input, target, self.options, self.flood_level, self.weight,
                                                       self.backend, process_group=self.process_group)
        self.last_raw_loss = raw
        return loss

    def extra_repr(self) -> str:
        o = self.options
        level = self.flood_level if not isinstance(self.flood_level, torch.Tensor) else "tensor"
        return (f"flood={o.flood!r}, flood_level={level}, reduction={o.reduction!r}, "
                f"ignore_index={o.ignore_index}, label_smoothing={o.label_smoothing}, z_loss={o.z_loss}, "
                f"softcap={o.softcap}, reverse_ce={o.reverse_ce}, backend={self.backend!r}")
