"""Where a peft model is cut: LoRA sites, and the per-architecture embedding / body / head.

The cut (the same for both sides, so both build the same peft model from the same config):

- edge: the word-embedding lookup (token ids never leave the edge; the embedded vectors do),
  every LoRA factor pair, the head (classification: the trained classifier, ``modules_to_save``,
  at the pooling position; causal LM: the frozen LM head, tied to the embedding table in
  SmolLM2, at every position), the labels or next-token targets and the loss;
- cloud: everything frozen in between: position/type embeddings, every transformer layer's
  frozen weights, the final norm (Llama) or the pooler (BERT).

Architectures: ``bert`` (all-MiniLM-L6-v2, classification) and ``llama`` (SmolLM2,
classification or causal LM). Another one needs an :class:`Arch` with these four functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from dpeft.errors import ConfigError


@dataclass
class LoraSite:
    """One adapted Linear: its index (the wire id), structural key and shape.

    ``module`` is the peft ``LoraLayer`` (an ``nn.Module`` whose per-adapter factors, dropouts and
    scalings are looked up by adapter name; dynamically composed by peft, hence ``Any``)."""

    index: int
    key: str
    module: Any
    in_features: int
    out_features: int
    r: int
    scaling: float


def _strip(name: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def lora_sites(model: nn.Module) -> list[LoraSite]:
    """The LoRA layers of the active adapter, in module order (indices are the wire ids)."""
    sites: list[LoraSite] = []
    adapter = cast(str, model.active_adapter)
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter not in module.lora_A:
            continue
        if not isinstance(module.base_layer, nn.Linear):
            raise ConfigError("adapter.target_modules", f"split mode adapts Linear layers only; {name} is {type(module.base_layer).__name__}")
        if module.use_dora.get(adapter):
            raise ConfigError("adapter.method", "split mode supports plain lora (no DoRA)")
        a = cast(nn.Linear, module.lora_A[adapter])
        b = cast(nn.Linear, module.lora_B[adapter])
        sites.append(
            LoraSite(
                index=len(sites),
                key=_strip(name),
                module=module,
                in_features=a.in_features,
                out_features=b.out_features,
                r=a.out_features,
                scaling=float(module.scaling[adapter]),
            )
        )
    if not sites:
        raise ConfigError("adapter.target_modules", "no LoRA layers found to split at")
    return sites


def lora_path(site: LoraSite, x: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    """scaling * B(A(dropout(x))): exactly the term peft adds to the base output."""
    m = site.module
    return m.lora_B[adapter](m.lora_A[adapter](m.lora_dropout[adapter](x))) * m.scaling[adapter]


def _inner(model: nn.Module) -> Any:
    """The transformers model under the peft wrapper (its submodules depend on the architecture)."""
    return cast(Any, model).base_model.model


class Arch:
    """Per-architecture cut points (static methods over the peft model)."""

    name = "base"
    #: next-token task: the head (frozen LM head) and the loss run over every position
    causal = False

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The transformer layers (the frozen body the cloud runs)."""
        raise NotImplementedError

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        """Replace the transformer layers."""
        raise NotImplementedError

    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Edge: word-embedding lookup."""
        return model.get_input_embeddings()(input_ids)  # type: ignore[operator]

    def pool_index(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Edge: the position whose final hidden state feeds the head, per row."""
        return torch.zeros(input_ids.shape[0], dtype=torch.long)

    def backbone(self, model: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
        """Cloud: the frozen body from embedded tokens to the head's input (B, H)."""
        raise NotImplementedError

    def head(self, model: nn.Module, features: torch.Tensor) -> torch.Tensor:
        """Edge: logits from the head's input."""
        raise NotImplementedError

    def head_module(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def hidden_size(self, model: nn.Module) -> int:
        return int(_inner(model).config.hidden_size)

    def feature_shape(self, batch: int, width: int, hidden: int) -> tuple[int, ...]:
        """Shape of the head's input the cloud sends: one vector per row (B, H)."""
        return (batch, hidden)


class BertArch(Arch):
    """BertForSequenceClassification: pooler(CLS) on the cloud, dropout + classifier on the edge."""

    name = "bert"

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _inner(model).bert.encoder.layer

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        _inner(model).bert.encoder.layer = layers

    def backbone(self, model, inputs_embeds, attention_mask, pool_index):
        out = _inner(model).bert(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        return out.pooler_output

    def head(self, model, features):
        inner = _inner(model)
        return inner.classifier(inner.dropout(features))

    def head_module(self, model):
        return _inner(model).classifier


class LlamaArch(Arch):
    """LlamaForSequenceClassification: final norm on the cloud, score on the edge at the last non-pad token."""

    name = "llama"

    def layers(self, model):
        return _inner(model).model.layers

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        _inner(model).model.layers = layers

    def pool_index(self, model, input_ids, attention_mask):
        # the rule of transformers' GenericForSequenceClassification: rightmost non-pad token
        pad = _inner(model).config.pad_token_id
        if pad is None:
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long)
        non_pad = (input_ids != pad).to(torch.int32)
        idx = torch.arange(input_ids.shape[-1], dtype=torch.int32)
        return (idx * non_pad).argmax(-1).to(torch.long)

    def backbone(self, model, inputs_embeds, attention_mask, pool_index):
        out = _inner(model).model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state
        return hidden[torch.arange(hidden.shape[0]), pool_index]

    def head(self, model, features):
        return _inner(model).score(features)

    def head_module(self, model):
        return _inner(model).score


class LlamaCausalArch(LlamaArch):
    """LlamaForCausalLM: final norm on the cloud; the (frozen, usually tied) LM head, the
    next-token targets and the loss on the edge, over every position (B, T, H)."""

    name = "llama_causal"
    causal = True

    def pool_index(self, model, input_ids, attention_mask):
        return torch.zeros(input_ids.shape[0], dtype=torch.long)  # unused: every position feeds the head

    def backbone(self, model, inputs_embeds, attention_mask, pool_index):
        out = _inner(model).model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def head(self, model, features):
        return _inner(model).lm_head(features)

    def head_module(self, model):
        return _inner(model).lm_head

    def feature_shape(self, batch: int, width: int, hidden: int) -> tuple[int, ...]:
        return (batch, width, hidden)


_ARCHS = {"bert": BertArch(), "llama": LlamaArch()}
_CAUSAL_ARCHS = {"llama": LlamaCausalArch()}


def arch_for(model: nn.Module) -> Arch:
    """The cut for this model's architecture and task (ConfigError when unsupported)."""
    inner = _inner(model)
    model_type = inner.config.model_type
    if model_type not in _ARCHS:
        raise ConfigError("model", f"split mode supports {', '.join(sorted(_ARCHS))} models, not {model_type!r}")
    if hasattr(inner, "lm_head") or not (hasattr(inner, "classifier") or hasattr(inner, "score")):
        if model_type not in _CAUSAL_ARCHS:
            raise ConfigError("model.task", f"split mode runs causal_lm on {', '.join(sorted(_CAUSAL_ARCHS))} models, not {model_type!r}")
        return _CAUSAL_ARCHS[model_type]
    return _ARCHS[model_type]


def slice_layers(model: nn.Module, n: int) -> None:
    """Keep only the first ``n`` transformer layers (in place; tests and quick runs)."""
    arch = arch_for(model)
    layers = arch.layers(model)
    if n >= len(layers):
        return
    arch.set_layers(model, nn.ModuleList(list(layers)[:n]))
    cfg = _inner(model).config
    cfg.num_hidden_layers = n
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:n]
