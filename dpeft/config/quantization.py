"""``model.quantization`` and ``model.quantization_options``: a 4- or 8-bit frozen base (QLoRA).

The base model's Linear layers are stored in 4 bits (``nf4``, ``fp4``) or 8 bits (``int8``,
LLM.int8) by bitsandbytes; the adapter on top stays fp32 and trainable. The options mapping is
parsed into :class:`QuantizationOptions` (unknown keys and bad values raise
:class:`~dpeft.errors.ConfigError` naming ``model.quantization_options.<key>``); the building
itself (``transformers.BitsAndBytesConfig``) is :mod:`dpeft.adapters.quantize`.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpeft.config.options import option, parse_options
from dpeft.config.schema import ModelConfig
from dpeft.errors import ConfigError

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
COMPUTE_DTYPES = ("bf16", "fp16", "fp32")
#: what ``skip_modules: null`` means: the task's output head stays an ordinary fp32 Linear
DEFAULT_SKIP = {"seq_cls": ["classifier", "score"], "causal_lm": ["lm_head"]}


@dataclass(kw_only=True)
class QuantizationOptions:
    """Options of a quantized base (``model.quantization_options``)."""

    compute_dtype: str = option(
        "bf16",
        "dtype the 4-bit layers compute in: bf16, fp16 or fp32 (the stored weights stay 4-bit; the adapter is fp32 either way)",
        choices=COMPUTE_DTYPES,
    )
    double_quant: bool = option(True, "4-bit: also quantize the per-block scales (saves about 0.4 bit per weight)")
    skip_modules: list[str] | None = option(
        None,
        "module names kept in full precision (the modules the adapter trains in full are always added: adapter.modules_to_save, "
        "or the seq_cls head); null = the output head: classifier and score for seq_cls, lm_head for causal_lm",
    )
    int8_threshold: float = option(
        6.0, "int8: outlier threshold of LLM.int8 (input features above it are computed in 16 bits)", low=0.0
    )


def check_quantization(model: ModelConfig) -> QuantizationOptions | None:
    """The parsed options of ``model`` (None when the base is not quantized); ConfigError on bad input.

    The options are checked whichever way ``model.quantization`` is set, so a typo never waits.
    """
    if model.quantization not in QUANTIZATIONS:
        raise ConfigError("model.quantization", f"must be one of {', '.join(QUANTIZATIONS)}; got {model.quantization!r}")
    opts: QuantizationOptions = parse_options(
        QuantizationOptions, model.quantization_options, "model.quantization_options", "a quantized base"
    )
    return None if model.quantization == "none" else opts


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
