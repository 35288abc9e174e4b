"""Tiny random causal LMs of the common open-weight architectures, saved as local model directories.

They stand in for a user's own ``model.path`` (Llama, Qwen2, Mistral): the same code paths as a
7B checkpoint, with 2 layers and a hidden size of 32, and SmolLM2's tokenizer (which has a chat
template) saved beside them. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_causal_lm(arch: str, directory: Path) -> Path:
    """Write a random 2-layer ``arch`` model (llama, qwen2 or mistral) plus a tokenizer to ``directory``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    from dpeft.adapters.model import load_tokenizer
    from dpeft.config import ModelConfig

    tok = load_tokenizer(ModelConfig(name="smollm2", task="causal_lm"))
    common = dict(
        vocab_size=len(tok),  # type: ignore[arg-type]
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,  # type: ignore[attr-defined]
        eos_token_id=tok.eos_token_id,  # type: ignore[attr-defined]
        pad_token_id=tok.pad_token_id,  # type: ignore[attr-defined]
        tie_word_embeddings=True,
    )
    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs[arch](**common))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)  # type: ignore[attr-defined]
    return directory
