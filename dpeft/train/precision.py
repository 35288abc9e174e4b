"""Where and in what precision a worker trains, and the memory savers.

``train.precision``:

- ``fp32``: everything in float32 (the default; bit-for-bit what dpeft always did);
- ``bf16``/``fp16``: the forward and backward passes run under ``torch.autocast`` on the training
  device; ``fp16`` also scales the loss (``torch.amp.GradScaler``) so small gradients do not
  underflow, and skips a step whose gradients overflowed.

The frozen base is *stored* in the compute dtype under bf16/fp16 (standard practice: it halves
the memory of the weights, and autocast would cast them to that dtype for every matmul anyway).
Trainable tensors -- every adapter's weights and the trained copies of ``modules_to_save`` -- stay
float32 master weights, so optimizer steps, updates on the wire and the exported adapter are
float32 as before. Quantized (bitsandbytes) weights are left as they are. A worker forked by
``dpeft simulate`` casts its own copy of the shared base (it no longer shares those pages with
the coordinator; the result is the same as a spawned worker's).

``train.gradient_checkpointing`` turns on Hugging Face's non-reentrant (activation) checkpointing of the base
model's layers (through peft's wrapper), with input gradients enabled so the first checkpointed
layer's input requires grad although the embeddings are frozen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dpeft.config import TrainConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of ``train.precision``."""
    return DTYPES[precision]


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """``torch.autocast`` on ``device`` in the precision's dtype; nothing for fp32."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=DTYPES[precision]):
        yield


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 (None otherwise)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def adapter_tensor_ids(model: nn.Module) -> set[int]:
    """ids of every adapter's parameters (all adapters, not only the active one) and of trained copies."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                container = getattr(module, attr, None)
                if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
                    ids.update(id(p) for p in container.parameters())
        elif isinstance(module, ModulesToSaveWrapper):
            ids.update(id(p) for p in module.modules_to_save.parameters())
    encoder = getattr(model, "prompt_encoder", None)
    if isinstance(encoder, nn.Module):
        ids.update(id(p) for p in encoder.parameters())
    ids.update(id(p) for p in model.parameters() if p.requires_grad)
    return ids


@torch.no_grad()
def cast_frozen_base(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen base's floating-point parameters in ``dtype``; adapter tensors become float32.

    Buffers (rotary frequencies, position ids) and quantized weights are left alone. Returns how
    many parameters changed dtype."""
    keep = adapter_tensor_ids(model)
    changed = 0
    for p in model.parameters():
        want = torch.float32 if id(p) in keep else dtype
        if p.is_floating_point() and p.dtype != want and type(p) is nn.Parameter:
            p.data = p.data.to(want)
            changed += 1
    return changed


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Hugging Face non-reentrant gradient checkpointing of the base under a peft model."""
    target: Any = model
    base = getattr(model, "get_base_model", None)
    if callable(base):
        target = base()
    if not getattr(target, "supports_gradient_checkpointing", False):
        from dpeft.errors import ConfigError

        raise ConfigError("train.gradient_checkpointing", f"{type(target).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(target, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(target, "enable_input_require_grads"):
        target.enable_input_require_grads()
    if getattr(getattr(target, "config", None), "use_cache", False):
        target.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation


def prepare_for_training(model: nn.Module, device: torch.device, cfg: TrainConfig) -> nn.Module:
    """Move a built peft model to ``device``, store its frozen base in ``train.precision``'s dtype
    and turn on ``train.gradient_checkpointing``; trainable tensors stay float32. In place."""
    model.to(device)
    if cfg.precision != "fp32":
        cast_frozen_base(model, compute_dtype(cfg.precision))
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch's tensors on ``device`` (unchanged on the CPU)."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
