"""Bottleneck adapters: Houlsby et al. 2019 and Pfeiffer et al. 2020.

A bottleneck adapter is ``x + up(act(down(x)))`` with ``down``: d -> d / reduction_factor and
``up`` back to d, applied to a sublayer's output projection before the residual connection
(and layer norm) that follows it:

- **houlsby**: after the attention output projection and after the feed-forward output
  projection of every adapted layer (two adapters per layer);
- **pfeiffer**: after the feed-forward output projection only (one per layer).

``up`` is zero-initialised, so every adapter is the identity at initialisation and round 0
is the base model; ``down`` is drawn like a fresh ``nn.Linear`` from the run's seed.

The sublayer projections are found by their module names in each transformer block (BERT:
``attention.output.dense`` and ``output.dense``; Llama, Qwen2, Mistral and others:
``self_attn.o_proj`` and ``mlp.down_proj``; GPT-2 style: ``attn.c_proj`` and ``mlp.c_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dpeft.adapters.reft import _linear_init
from dpeft.config.options import option
from dpeft.errors import ConfigError

#: (attention output, feed-forward output) module names inside one transformer block
_SITES = (
    ("attention.output.dense", "output.dense"),
    ("self_attn.o_proj", "mlp.down_proj"),
    ("self_attn.out_proj", "mlp.fc2"),
    ("attn.c_proj", "mlp.c_proj"),
)
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass(kw_only=True)
class BottleneckOptions:
    """``adapter.options`` of houlsby and pfeiffer."""

    layers: list[int] | None = option(None, "layer indices to adapt (0-based); null = every layer", low=0)
    reduction_factor: int = option(16, "bottleneck size = hidden size / reduction_factor (at least 1)", low=1)
    non_linearity: str = option("relu", "activation inside the bottleneck", choices=tuple(_ACTIVATIONS))


class Bottleneck(nn.Module):
    """``x + up(act(down(x)))``; ``up`` starts at zero."""

    def __init__(self, dim: int, size: int, activation: str, generator: torch.Generator, dropout: float = 0.0) -> None:
        super().__init__()
        self.down = nn.Linear(dim, size)
        _linear_init(self.down.weight, self.down.bias, generator)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(size, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.down.weight.dtype)
        return x + self.dropout(self.up(self.act(self.down(h)))).to(x.dtype)


def _sublayers(block: nn.Module, index: int) -> tuple[nn.Module, nn.Module]:
    modules = dict(block.named_modules())
    for attn, ffn in _SITES:
        if attn in modules and ffn in modules:
            return modules[attn], modules[ffn]
    raise ConfigError(
        "adapter.method", f"no known attention/feed-forward output projection in layer {index} ({type(block).__name__})"
    )


class BottleneckModule(nn.ModuleDict):
    """The adapters of one model: ``{"<layer>_attn" | "<layer>_ffn": Bottleneck}`` and their hooks."""

    def __init__(
        self, method: str, dim: int, layers: list[int], opts: BottleneckOptions, seed: int, dropout: float = 0.0
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        size = max(1, dim // opts.reduction_factor)
        sites = ("attn", "ffn") if method == "houlsby" else ("ffn",)
        super().__init__(
            {f"{i}_{site}": Bottleneck(dim, size, opts.non_linearity, gen, dropout) for i in layers for site in sites}
        )
        self.method = method

    def attach(self, base: nn.Module, blocks: nn.ModuleList) -> list[Any]:
        """Hook every adapter onto its sublayer projection; returns the handles."""
        handles = []
        for key, adapter in self.items():
            index, site = key.split("_")
            attn, ffn = _sublayers(blocks[int(index)], int(index))
            host = attn if site == "attn" else ffn
            handles.append(host.register_forward_hook(_apply(adapter)))
        return handles


def _apply(adapter: nn.Module) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (adapter(output[0]), *output[1:])
        return adapter(output)

    return hook
