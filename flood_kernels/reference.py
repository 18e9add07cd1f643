"""The executable specification: per-row losses in plain PyTorch.

Every kernel backend computes exactly what :func:`row_losses` computes here, and the test suite checks
each of them against this function evaluated in float64 on the same input values.

Per row ``i`` with logits ``x`` (``V`` classes), target ``y``, class weights ``w`` (ones if absent),
label smoothing ``eps``, z-loss ``zeta``, softcap ``s`` and reverse-CE coefficient ``rho`` with clipped
``log 0 = A``::

    z    = s * tanh(x / s)            (z = x when softcap is None)
    lse  = log(sum_c exp(z_c))
    l_i  = (1 - eps) * w_y * (lse - z_y)                # F.cross_entropy, reduction="none"
         + eps / V * sum_c w_c * (lse - z_c)            # its label-smoothing term
         + zeta * lse**2                                # PaLM z-loss
         + rho * (-A) * (1 - exp(z_y - lse))            # reverse cross-entropy (symmetric CE)

and ``l_i = 0`` for rows whose target equals ``ignore_index``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def softcapped(logits: Tensor, softcap: Optional[float]) -> Tensor:
    """``softcap * tanh(logits / softcap)`` (Gemma 2 logit soft-capping); identity when softcap is None."""
    if softcap is None:
        return logits
    return softcap * torch.tanh(logits / softcap)


def row_losses(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    reverse_ce: float = 0.0,
    reverse_ce_log_zero: float = -4.0,
) -> Tensor:
    """Per-row loss ``l_i`` of ``(N, V)`` logits, differentiable by autograd.

    Computed in float64 for float64 input and in float32 otherwise (the library's arithmetic contract).
    """
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = softcapped(logits.to(compute_dtype), softcap)
    if weight is not None:
        weight = weight.to(compute_dtype)
    losses = F.cross_entropy(
        z, target, weight=weight, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    if z_loss == 0.0 and reverse_ce == 0.0:
        return losses
    valid = target != ignore_index
    lse = torch.logsumexp(z, dim=-1)
    extra = z_loss * lse.square()
    if reverse_ce != 0.0:
        z_target = z.gather(1, torch.where(valid, target, 0).unsqueeze(1)).squeeze(1)
        extra = extra + reverse_ce * (-reverse_ce_log_zero) * (1.0 - torch.exp(z_target - lse))
    return losses + torch.where(valid, extra, torch.zeros_like(extra))
