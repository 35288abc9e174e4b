"""A 4- or 8-bit frozen base through bitsandbytes (QLoRA): the ``BitsAndBytesConfig`` of a model
config, the fixes the CPU path needs, and what a quantized model looks like.

The Linear layers of the base become ``bitsandbytes.nn.Linear4bit`` (nf4, fp4) or
``Linear8bitLt`` (int8); the modules of :func:`dpeft.config.quantization.skip_modules` (the
output head, ``adapter.modules_to_save``) and everything that is not a Linear (embeddings,
norms) stay fp32. peft wraps the quantized layers with its own bitsandbytes LoRA layers, whose
factors are ordinary fp32 parameters.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from dpeft.config import ModelConfig
from dpeft.config.quantization import QuantizationOptions, check_quantization, skip_modules

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def quantization_config(model: ModelConfig, modules_to_save: list[str] | None) -> Any:
    """The ``transformers.BitsAndBytesConfig`` for ``model`` (None when the base is not quantized)."""
    opts: QuantizationOptions | None = check_quantization(model)
    if opts is None:
        return None
    from transformers import BitsAndBytesConfig

    skip = skip_modules(model, opts, modules_to_save)
    if model.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=opts.int8_threshold, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model.quantization,
        bnb_4bit_compute_dtype=_DTYPES[opts.compute_dtype],
        bnb_4bit_use_double_quant=opts.double_quant,
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=skip,
    )


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the bitsandbytes layers of ``model`` (4-bit or 8-bit Linear), in module order."""
    import bitsandbytes as bnb

    return [name for name, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` (a transformers or peft model) holds a bitsandbytes-quantized base."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)) or bool(
        quantized_layers(model)
    )


def keep_cpu_layout(model: nn.Module) -> None:
    """Keep the 4-bit weights in the layout they were quantized in, in eval mode too.

    On a CPU with AVX512-BF16, bitsandbytes repacks a ``Linear4bit``'s weight in place the first
    time it runs in eval mode without gradients (a faster inference layout). A training step on a
    repacked layer then fails (``a view of a leaf Variable ... in-place operation``), the repacking
    rounds the block scales to bf16 (eval and training would see different weights) and it writes
    to memory forked workers share. Evaluation between rounds would trigger it; this turns it off.
    """
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    # LLM.int8 says on every step that it computes in fp16; that is how int8 works, not news
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    # peft asks a quantized model whether it checkpoints activations under a name transformers renamed
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes held by the parameters and buffers of ``model`` (packed 4/8-bit storage as stored)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
