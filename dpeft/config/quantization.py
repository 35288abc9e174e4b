"""``model.quantization`` and ``model.quantization_options``: a 4- or 8-bit frozen base (QLoRA).

The base model's Linear layers are stored in 4 bits (``nf4``, ``fp4``) or 8 bits (``int8``,
LLM.int8) by bitsandbytes; the adapter on top stays fp32 and trainable. The options mapping is
parsed into :class:`QuantizationOptions` (unknown keys and bad values raise
:class:`~dpeft.errors.ConfigError` naming ``model.quantization_options.<key>``); the building
itself (``transformers.BitsAndBytesConfig``) is :mod:`dpeft.adapters.quantize`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dpeft.config.schema import ModelConfig
from dpeft.errors import ConfigError

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
COMPUTE_DTYPES = ("bf16", "fp16", "fp32")
#: what ``skip_modules: null`` means: the task's output head stays an ordinary fp32 Linear
DEFAULT_SKIP = {"seq_cls": ["classifier", "score"], "causal_lm": ["lm_head"]}


def _opt(default: Any, help: str) -> Any:  # noqa: A002 - mirrors dataclasses naming
    if isinstance(default, list):
        return field(default_factory=default.copy, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(kw_only=True)
class QuantizationOptions:
    """Options of a quantized base (``model.quantization_options``)."""

    compute_dtype: str = _opt(
        "bf16",
        "dtype the 4-bit layers compute in: bf16, fp16 or fp32 (the stored weights stay 4-bit; the adapter is fp32 either way)",
    )
    double_quant: bool = _opt(True, "4-bit: also quantize the per-block scales (saves about 0.4 bit per weight)")
    skip_modules: list[str] | None = _opt(
        None,
        "module names kept in full precision (the modules the adapter trains in full are always added: adapter.modules_to_save, or the seq_cls head); null = the output head: classifier and score for seq_cls, lm_head for causal_lm",
    )
    int8_threshold: float = _opt(6.0, "int8: outlier threshold of LLM.int8 (input features above it are computed in 16 bits)")


def check_quantization(model: ModelConfig) -> QuantizationOptions | None:
    """The parsed options of ``model`` (None when the base is not quantized); ConfigError on bad input."""
    from dpeft.config.parse import build_section  # parse imports the checks, which import this module

    if model.quantization not in QUANTIZATIONS:
        raise ConfigError("model.quantization", f"must be one of {', '.join(QUANTIZATIONS)}; got {model.quantization!r}")
    opts: QuantizationOptions = build_section(QuantizationOptions, model.quantization_options, "model.quantization_options.")
    if opts.compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(
            "model.quantization_options.compute_dtype", f"must be one of {', '.join(COMPUTE_DTYPES)}; got {opts.compute_dtype!r}"
        )
    if opts.int8_threshold < 0:
        raise ConfigError("model.quantization_options.int8_threshold", f"must be >= 0, got {opts.int8_threshold}")
    if opts.skip_modules is not None and any(not s.strip() for s in opts.skip_modules):
        raise ConfigError("model.quantization_options.skip_modules", "module names must not be empty")
    if model.quantization == "none":
        return None  # options are still checked above, so a typo is caught whichever way quantization is set
    return opts


def skip_modules(model: ModelConfig, opts: QuantizationOptions, modules_to_save: list[str] | None) -> list[str]:
    """Module names bitsandbytes must leave in full precision: ``skip_modules`` (default: the output
    head) plus every module the adapter trains in full (``adapter.modules_to_save``; for seq_cls
    without it, peft trains the classifier head in full)."""
    names = list(opts.skip_modules) if opts.skip_modules is not None else list(DEFAULT_SKIP.get(model.task, []))
    trained = modules_to_save if modules_to_save is not None else (DEFAULT_SKIP["seq_cls"] if model.task == "seq_cls" else [])
    for name in trained:
        if name not in names:
            names.append(name)
    return names
