"""Registry of local training losses: ``train.loss: <name>`` with ``train.loss_options``.

A loss is a function registered with :func:`register_loss` and, optionally, a typed options
dataclass (fields made with :func:`dpeft.config.options.option`) that ``train.loss_options`` is
parsed into, with the same checks and error messages as the built-in families' options. It gets
the model (the PEFT model, in training mode), one batch on the training device and a
:class:`LossContext`, and returns the scalar loss of that batch::

    @register_loss("label_smoothing", options=SmoothOptions)
    def smooth(model, batch, ctx: LossContext) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits, batch["labels"], label_smoothing=ctx.options.eps)

Batches hold ``input_ids`` and ``attention_mask``, and ``labels`` (class ids for ``seq_cls``;
token targets with -100 on prompt and padding tokens for instruction/chat data). Everything else
of local training (micro-batches, mixed precision, gradient clipping, the FedProx term, stopping
between steps) wraps the loss as it wraps the built-ins. The built-in losses ``cross_entropy``
and ``prior_calibrated`` are handled by :mod:`dpeft.train.loop` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from dpeft.config import RunConfig, TrainConfig
from dpeft.config.options import parse_options
from dpeft.errors import ConfigError
from dpeft.plugins import replaces_same_definition

#: the losses :mod:`dpeft.train.loop` computes itself
BUILTIN_LOSSES = ("cross_entropy", "prior_calibrated")


@dataclass(kw_only=True)
class NoLossOptions:
    """A loss that reads no options."""


@dataclass(frozen=True)
class LossContext:
    """What a plug-in loss knows besides the model and the batch."""

    #: ``seq_cls`` or ``causal_lm`` (``model.task``)
    task: str
    #: the parsed ``train.loss_options``
    options: Any
    #: the number of classes (seq_cls), else None
    num_labels: int | None = None


LossFn = Callable[[nn.Module, dict[str, torch.Tensor], LossContext], torch.Tensor]


class RegisteredLoss(NamedTuple):
    """A registered loss and the options dataclass ``train.loss_options`` is parsed into."""

    fn: LossFn
    options: type


_REGISTRY: dict[str, RegisteredLoss] = {}


def register_loss(name: str, options: type = NoLossOptions) -> Callable[[LossFn], LossFn]:
    """Function decorator registering a local training loss as ``train.loss: <name>``."""
    if not name or name != name.strip().lower() or name in BUILTIN_LOSSES:
        raise ValueError(f"bad loss name {name!r} (lowercase, not one of {', '.join(BUILTIN_LOSSES)})")

    def wrap(fn: LossFn) -> LossFn:
        old = _REGISTRY.get(name)
        if old is not None and not replaces_same_definition(old.fn, fn):
            raise ValueError(f"loss {name!r} registered twice")
        _REGISTRY[name] = RegisteredLoss(fn, options)
        return fn

    return wrap


def registered_losses() -> dict[str, RegisteredLoss]:
    """Name -> (function, options dataclass) of every registered plug-in loss."""
    return dict(_REGISTRY)


def loss_options(cfg: TrainConfig) -> Any:
    """``train.loss_options`` parsed by the plug-in loss's options dataclass."""
    return parse_options(_REGISTRY[cfg.loss].options, cfg.loss_options, "train.loss_options", f"loss {cfg.loss!r}")


def validate_loss(cfg: RunConfig) -> None:
    """``train.loss`` is built in or registered; its options parse; plug-in losses run where the loop runs them."""
    t = cfg.train
    if t.loss in BUILTIN_LOSSES:
        if t.loss_options:
            raise ConfigError("train.loss_options", f"is read only by a plug-in loss, and train.loss is {t.loss}; remove it")
        return
    if t.loss not in _REGISTRY:
        known = [*BUILTIN_LOSSES, *sorted(_REGISTRY)]
        raise ConfigError("train.loss", f"must be one of {', '.join(known)}; got {t.loss!r}")
    loss_options(t)
    if t.lockstep:
        raise ConfigError(
            "train.lockstep",
            f"lockstep multi-LoRA computes the built-in losses only; set train.lockstep=false to train with loss {t.loss!r}",
        )


def plugin_loss(
    cfg: TrainConfig, task: str, num_labels: int | None
) -> Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None:
    """The batch loss of a plug-in ``train.loss`` (None for the built-ins)."""
    if cfg.loss in BUILTIN_LOSSES:
        return None
    entry = _REGISTRY[cfg.loss]
    ctx = LossContext(task=task, options=loss_options(cfg), num_labels=num_labels)

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = entry.fn(model, batch, ctx)
        if not isinstance(out, torch.Tensor) or out.dim() != 0:
            raise TypeError(f"loss {cfg.loss!r} must return a scalar tensor, got {type(out).__name__}")
        return out

    return loss


__all__ = [
    "BUILTIN_LOSSES",
    "LossContext",
    "LossFn",
    "NoLossOptions",
    "RegisteredLoss",
    "loss_options",
    "plugin_loss",
    "register_loss",
    "registered_losses",
    "validate_loss",
]
