"""Select adapter parameters structurally, move them in and out of a peft model, export.

Selection walks the module tree: every peft tuner layer declares its adapter parameter
containers (``adapter_layer_names``), modules_to_save wrappers hold a trainable copy, and
prompt-learning methods keep a prompt encoder. Keys are module paths with peft's own prefix
and the adapter name stripped (``bert.encoder.layer.0.attention.self.query.lora_A.weight``).
No key is ever selected by matching substrings.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from dpeft.adapters.native import NativeAdapterModel
from dpeft.errors import ProtocolError
from dpeft.state import AdapterState

_PREFIXES = ("base_model.model.", "base_model.")


def _strip(name: str) -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _named(obj: nn.Module | nn.Parameter) -> list[tuple[str, nn.Parameter]]:
    if isinstance(obj, nn.Parameter):
        return [("", obj)]
    return list(obj.named_parameters())


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def adapter_parameters(model: PeftModel, trainable_only: bool = True) -> OrderedDict[str, nn.Parameter]:
    """Structural name -> parameter for the active adapter of ``model``."""
    if isinstance(model, NativeAdapterModel):
        return model.adapter_parameters(trainable_only)
    adapter = model.active_adapter
    out: OrderedDict[str, nn.Parameter] = OrderedDict()
    if model.peft_config[adapter].is_prompt_learning:
        for pname, p in _named(model.prompt_encoder[adapter]):
            out[_join("prompt_encoder", pname)] = p
    for mod_name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                container = getattr(module, attr, None)
                if container is None or adapter not in container:
                    continue
                for pname, p in _named(container[adapter]):
                    out[_join(_strip(mod_name), attr, pname)] = p
        elif isinstance(module, AuxiliaryTrainingWrapper) and hasattr(module, "modules_to_save"):
            if adapter in module.modules_to_save:
                for pname, p in _named(module.modules_to_save[adapter]):
                    out[_join(_strip(mod_name), pname)] = p
    if trainable_only:
        out = OrderedDict((k, p) for k, p in out.items() if p.requires_grad)
    return out


def extract_state(model: PeftModel, meta: dict | None = None) -> AdapterState:
    """A detached CPU copy of the adapter parameters."""
    tensors = OrderedDict((k, p.detach().to("cpu", copy=True)) for k, p in adapter_parameters(model).items())
    return AdapterState(tensors, dict(meta or {}))


@torch.no_grad()
def load_state(model: PeftModel, state: AdapterState, strict: bool = True) -> None:
    """Copy ``state`` into the model's adapter parameters (names and shapes must match)."""
    params = adapter_parameters(model)
    if strict:
        missing = [k for k in params if k not in state.tensors]
        unknown = [k for k in state.tensors if k not in params]
        if missing or unknown:
            raise ProtocolError(f"adapter state mismatch: missing {missing[:3]}, unknown {unknown[:3]}")
    for name, value in state.items():
        p = params.get(name)
        if p is None:
            continue
        if tuple(p.shape) != tuple(value.shape):
            raise ProtocolError(f"{name}: shape {tuple(value.shape)} but the model has {tuple(p.shape)}")
        p.copy_(value.to(p.dtype))


#: the class names of a classification adapter, next to adapter_config.json
LABELS_FILE = "labels.json"


def label_maps(label_names: list[str]) -> dict[str, dict[str, Any]]:
    """``id2label``/``label2id`` as transformers keeps them in a model config (ids as JSON keys are strings)."""
    return {"id2label": {str(i): n for i, n in enumerate(label_names)}, "label2id": {n: i for i, n in enumerate(label_names)}}


def export_peft_dir(model: PeftModel, state: AdapterState, directory: str | Path, label_names: list[str] | None = None) -> Path:
    """Write ``state`` as a standard peft directory (adapter_config.json + adapter_model.safetensors).

    ``label_names``: a classifier's classes, written to ``labels.json`` (``id2label``/``label2id``,
    as in a transformers config.json) and set on the base model's config. Written to a temporary
    sibling and renamed, so a reader never sees half a directory.
    """
    import json
    import shutil

    directory = Path(directory)
    load_state(model, state)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if label_names:
        maps = label_maps(label_names)
        base_config = getattr(model, "config", None)
        if base_config is not None:  # a merged model saved from here keeps its class names
            base_config.id2label = {int(i): n for i, n in maps["id2label"].items()}
            base_config.label2id = dict(maps["label2id"])
    model.save_pretrained(str(tmp))
    if label_names:
        (tmp / LABELS_FILE).write_text(json.dumps(maps, indent=2) + "\n")
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        directory.rename(old)
    tmp.rename(directory)
    if old.exists():
        shutil.rmtree(old)
    return directory
