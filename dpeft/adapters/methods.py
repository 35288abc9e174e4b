"""Map dpeft's AdapterConfig onto a peft config object for any method peft offers."""

from __future__ import annotations

import dataclasses
from typing import Any

from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils.peft_types import PeftType

from dpeft.config import AdapterConfig, ModelConfig
from dpeft.errors import ConfigError

#: dpeft names that are not simply a lower-cased peft type
_ALIASES = {"dora": "LORA"}
#: peft types that need a model dpeft does not build (multi-adapter mixtures, multitask prompts)
_UNSUPPORTED = {"XLORA", "POLY", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT", "TRAINABLE_TOKENS"}

_DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
}


def known_methods() -> list[str]:
    """Method names accepted by ``adapter.method``."""
    from dpeft.adapters.native import NATIVE_METHODS

    names = [p.value.lower() for p in PeftType if p.value not in _UNSUPPORTED]
    return sorted(set(names) | set(_ALIASES) | set(NATIVE_METHODS))


def default_targets(model_type: str) -> list[str]:
    """Modules adapted when ``adapter.target_modules`` is not set."""
    return list(_DEFAULT_TARGETS.get(model_type, ["q_proj", "v_proj"]))


def build_peft_config(adapter: AdapterConfig, model: ModelConfig, model_type: str) -> PeftConfig:
    """A peft config for ``adapter.method`` with dpeft's common options mapped onto its fields."""
    method = adapter.method.lower()
    peft_type = _ALIASES.get(method, method.upper())
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING or peft_type in _UNSUPPORTED:
        raise ConfigError("adapter.method", f"unknown or unsupported peft method {adapter.method!r}")
    cls = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(peft_type)]
    fields = {f.name for f in dataclasses.fields(cls)}
    task_type = "SEQ_CLS" if model.task == "seq_cls" else "CAUSAL_LM"
    targets = adapter.target_modules or default_targets(model_type)
    common: dict[str, Any] = {
        "task_type": task_type,
        "target_modules": targets,
        "r": adapter.r,
        "lora_alpha": adapter.alpha,
        "alpha": adapter.alpha,
        "lora_dropout": adapter.dropout,
        "module_dropout": adapter.dropout,
        "num_virtual_tokens": adapter.num_virtual_tokens,
    }
    if adapter.modules_to_save is not None:
        common["modules_to_save"] = adapter.modules_to_save
    if method == "dora":
        common["use_dora"] = True
    if peft_type == "IA3":
        common["feedforward_modules"] = []
    if peft_type == "P_TUNING":
        common["encoder_hidden_size"] = 128
    if peft_type == "ADALORA":
        common["total_step"] = 10_000
    kwargs = {k: v for k, v in common.items() if k in fields}
    for key, value in adapter.options.items():
        if key not in fields:
            raise ConfigError(f"adapter.options.{key}", f"not an option of {cls.__name__}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError("adapter", f"{cls.__name__} rejected the options: {exc}") from None
