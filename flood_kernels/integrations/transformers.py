"""Flooded cross-entropy for Hugging Face Transformers, without editing model code.

``transformers`` is an optional extra (``pip install transformers``): this module imports it only inside
the functions that need it, so importing :mod:`flood_kernels.integrations.transformers` never fails.

Three entry points:

* :func:`flooded_causal_lm_loss` -- the flooded counterpart of ``transformers.loss.loss_utils.ForCausalLMLoss``
  (same arguments: labels shifted inside, ``-100`` ignored, ``num_items_in_batch``).
* :func:`flooded_loss_for_trainer` -- a ``compute_loss_func`` for ``transformers.Trainer``.
* :func:`patch_causal_lm_loss` -- makes a model's own ``loss_function`` flooded (dense logits), and
  :func:`patch_causal_lm_forward` -- makes its forward compute the loss with the fused linear + flooded
  cross-entropy (:mod:`flood_kernels.linear`), never materializing the ``(tokens, vocab)`` logits in training.

Units: ``flood_level`` ``b`` is in nats per non-ignored (shifted) token, like the model's own loss. When
``num_items_in_batch`` (the Trainer's count of label tokens over all micro-batches of one optimizer step) is
given, the returned loss is ``sum / num_items_in_batch`` as in Transformers, and the flood is applied to
that quantity with the level scaled by this micro-batch's share of the tokens ``n / num_items_in_batch``:

    loss = |S - b n| / N + b n / N = (n / N) * (|J - b| + b),    J = S / n the micro-batch mean.

Without gradient accumulation (``N == n``) that is exactly ``|S/N - b| + b``. With gradient accumulation it is
per-micro-batch flooding, weighted so that the unflooded parts add up to the model's own loss; flooding the
accumulated batch exactly needs the recipe in ``docs/using_flooding.md``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._inputs import check_flood_number
from ..functional import flooded_cross_entropy

FloodLevel = Union[float, int, Tensor]

__all__ = [
    "flooded_causal_lm_loss",
    "flooded_loss_for_trainer",
    "patch_causal_lm_loss",
    "patch_causal_lm_forward",
    "shift_causal_labels",
]


def shift_causal_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``labels[..., 1:]`` padded with ``ignore_index`` at the end: position ``t`` predicts token ``t + 1``."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()


def _loss_options(options: dict) -> dict:
    allowed = {"label_smoothing", "z_loss", "softcap", "reverse_ce", "reverse_ce_log_zero", "backend"}
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"unexpected loss option(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return options


def _flood_reduce(
    loss_of: Callable[..., Tensor],
    target: Tensor,
    num_items_in_batch: Optional[Union[int, Tensor]],
    flood_level: FloodLevel,
    flood: Optional[str],
    ignore_index: int,
) -> Tensor:
    """Call ``loss_of(flood_level=, flood=, reduction=)`` so that ``b`` stays in nats per token (see module doc)."""
    if num_items_in_batch is None:
        return loss_of(flood_level=flood_level, flood=flood, reduction="mean")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(target.device)
    if flood == "batch":
        # Flood the micro-batch sum at b * n (n = its non-ignored tokens), then normalize like Transformers.
        # b * n is formed on the device: a Python b never becomes a tensor on the host (a blocking copy).
        count = (target != ignore_index).sum().to(torch.float32)
        if torch.is_tensor(flood_level):
            level = flood_level.detach().to(device=target.device, dtype=torch.float32) * count
        else:
            check_flood_number(flood_level)
            level = count * float(flood_level)
        summed = loss_of(flood_level=level, flood="batch", reduction="sum")
    else:  # None or "individual": per-token flooding commutes with the normalization
        summed = loss_of(flood_level=flood_level, flood=flood, reduction="sum")
    return summed / num_items_in_batch


def flooded_causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    vocab_size: Optional[int] = None,
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
    ignore_index: int = -100,
    shift_labels: Optional[Tensor] = None,
    *,
    flood_level: FloodLevel = 0.0,
    flood: Optional[str] = "batch",
    **options: Any,
) -> Tensor:
    """Flooded ``ForCausalLMLoss``: shift ``labels`` (unless ``shift_labels`` is given), ignore ``-100``.

    ``options`` are the loss options of :func:`flood_kernels.flooded_cross_entropy` (``label_smoothing``,
    ``z_loss``, ``softcap``, ``reverse_ce``, ``reverse_ce_log_zero``, ``backend``). Per-token levels for
    ``flood="individual"`` are given in the layout of the shifted labels.
    """
    _loss_options(options)
    if shift_labels is None:
        shift_labels = shift_causal_labels(labels, ignore_index)
    vocab_size = logits.shape[-1] if vocab_size is None else vocab_size
    rows = logits.reshape(-1, vocab_size)
    target = shift_labels.reshape(-1).to(rows.device)
    if isinstance(flood_level, Tensor) and flood_level.dim() > 0:
        flood_level = flood_level.reshape(-1)

    def loss_of(**kw: Any) -> Tensor:
        return flooded_cross_entropy(rows, target, ignore_index=ignore_index, **options, **kw)

    return _flood_reduce(loss_of, target, num_items_in_batch, flood_level, flood, ignore_index)


def flooded_loss_for_trainer(
    flood_level: FloodLevel = 0.0,
    flood: Optional[str] = "batch",
    *,
    causal: bool = True,
    ignore_index: int = -100,
    **options: Any,
) -> Callable[..., Tensor]:
    """A ``compute_loss_func(outputs, labels, num_items_in_batch=None)`` for ``transformers.Trainer``.

    ``Trainer(..., compute_loss_func=flooded_loss_for_trainer(flood_level=0.5))``. With ``causal=True``
    (causal LMs) the labels are shifted inside, as the model's own loss does; ``causal=False`` uses them as
    they are (token classification, masked LM, sequence classification: logits ``(..., C)`` and labels
    ``(...)``). ``-100`` labels are ignored and ``b`` is in nats per counted label token, also when the
    Trainer passes ``num_items_in_batch`` (see the module docstring for gradient accumulation).
    """
    _loss_options(options)

    def compute_loss_func(outputs: Any, labels: Tensor, num_items_in_batch: Optional[Union[int, Tensor]] = None
                          ) -> Tensor:
        if labels is None:
            raise ValueError("flooded compute_loss_func needs labels (Trainer passed labels=None)")
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if causal:
            return flooded_causal_lm_loss(logits, labels, logits.shape[-1], num_items_in_batch, ignore_index,
                                          flood_level=flood_level, flood=flood, **options)
        rows = logits.reshape(-1, logits.shape[-1])
        target = labels.reshape(-1).to(rows.device)

        def loss_of(**kw: Any) -> Tensor:
            return flooded_cross_entropy(rows, target, ignore_index=ignore_index, **options, **kw)

        return _flood_reduce(loss_of, target, num_items_in_batch, flood_level, flood, ignore_index)

    return compute_loss_func


class _Patch:
    """Undo handle of a patch; also a context manager (the patch is removed on exit)."""

    def __init__(self, undo: Callable[[], None]) -> None:
        self._undo: Optional[Callable[[], None]] = undo

    def remove(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None

    def __enter__(self) -> "_Patch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def patch_causal_lm_loss(model: nn.Module, flood_level: FloodLevel = 0.0, flood: Optional[str] = "batch",
                         **options: Any) -> _Patch:
    """Make ``model``'s own loss (``model.loss_function``) the flooded causal-LM loss; returns an undo handle.

    Works for every Transformers causal LM whose forward calls ``self.loss_function(logits=..., labels=...,
    vocab_size=..., **kwargs)`` (Llama, Mistral, Qwen, GPT-2, ...): labels shifted, ``-100`` ignored,
    ``num_items_in_batch`` and ``shift_labels`` honoured. The model still computes the full logits; use
    :func:`patch_causal_lm_forward` for the fused linear path. Use the handle as a context manager to flood
    only inside a block, or call ``.remove()``.
    """
    _loss_options(options)
    had_own = "_loss_function" in vars(model)
    previous = vars(model).get("_loss_function")
    model.loss_function = functools.partial(flooded_causal_lm_loss, flood_level=flood_level, flood=flood, **options)

    def undo() -> None:
        if had_own:
            model.loss_function = previous
        else:
            vars(model).pop("_loss_function", None)

    return _Patch(undo)


# Config attributes that change the logits in ways the fused linear path does not reproduce.
_UNSUPPORTED_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier_scale")


def patch_causal_lm_forward(model: nn.Module, flood_level: FloodLevel = 0.0, flood: Optional[str] = "batch",
                            *, chunk_size: Optional[int] = None, **options: Any) -> _Patch:
    """Make ``model.forward`` compute its loss with the fused linear + flooded cross-entropy.

    When ``labels`` are given in training mode, the forward runs the decoder (``model.base_model``), then
    :func:`flood_kernels.linear.linear_flooded_cross_entropy` on the last hidden states and the LM head's
    weight: the ``(tokens, vocab)`` logits are never materialized and ``logits`` is ``None`` in the output.
    In eval mode, or without labels, logits are computed as usual (respecting ``logits_to_keep``) and the
    loss, if labels are given, still comes from the fused op. Returns ``CausalLMOutputWithPast``. Handles
    shifted labels, ``-100``, ``num_items_in_batch`` and ``shift_labels`` like :func:`flooded_causal_lm_loss`;
    Gemma-style ``config.final_logit_softcapping`` becomes the ``softcap`` option. Returns an undo handle.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast  # optional extra, imported lazily

    from ..linear import linear_flooded_cross_entropy

    _loss_options(options)
    config = getattr(model, "config", None)
    for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(f"config.{name}={value!r} rescales the logits; use patch_causal_lm_loss")
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        if options.get("softcap") not in (None, softcap):
            raise ValueError(f"softcap={options['softcap']} conflicts with config.final_logit_softcapping={softcap}")
        options = {**options, "softcap": softcap}
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise NotImplementedError(f"the output embedding is {type(head).__name__}, not nn.Linear")
    decoder = model.base_model
    if decoder is model:
        raise NotImplementedError("model has no separate decoder (base_model is the model itself)")
    field_names = set(getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}))
    had_own = "forward" in vars(model)
    previous = vars(model).get("forward")
    signature = inspect.signature(model.forward)  # Trainer reads it (loss kwargs, columns to keep)

    def forward(input_ids: Optional[Tensor] = None, *args: Any, labels: Optional[Tensor] = None,
                logits_to_keep: Union[int, Tensor] = 0, num_items_in_batch: Optional[Union[int, Tensor]] = None,
                shift_labels: Optional[Tensor] = None, ignore_index: int = -100, return_dict: Optional[bool] = None,
                **kwargs: Any) -> Any:
        outputs = decoder(input_ids, *args, **kwargs)
        hidden = outputs[0]
        loss = None
        if labels is not None or shift_labels is not None:
            if shift_labels is None:
                shift_labels = shift_causal_labels(labels, ignore_index)
            rows = hidden.reshape(-1, hidden.shape[-1])
            target = shift_labels.reshape(-1).to(rows.device)
            level = flood_level.reshape(-1) if isinstance(flood_level, Tensor) and flood_level.dim() > 0 else \
                flood_level

            def loss_of(**kw: Any) -> Tensor:
                return linear_flooded_cross_entropy(rows, head.weight, target, linear_bias=head.bias,
                                                    ignore_index=ignore_index, chunk_size=chunk_size,
                                                    **options, **kw)

            loss = _flood_reduce(loss_of, target, num_items_in_batch, level, flood, ignore_index)
        logits = None
        if loss is None or not model.training:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = head(hidden[:, keep, :])
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
        result = {"loss": loss, "logits": logits}
        for name in ("cache", "past_key_values", "hidden_states", "attentions"):
            if name in field_names and name in outputs:
                result[name] = outputs[name]
        out = CausalLMOutputWithPast(**result)
        return out if return_dict is not False else out.to_tuple()

    forward.__signature__ = signature  # type: ignore[attr-defined]
    model.forward = forward

    def undo() -> None:
        if had_own:
            model.forward = previous
        else:
            vars(model).pop("forward", None)

    return _Patch(undo)
