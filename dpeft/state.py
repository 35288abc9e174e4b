"""AdapterState: the unit that moves between coordinator and workers.

An ordered mapping of structural parameter name -> tensor (adapter name stripped), plus a
small JSON-able ``meta`` dict (round, method, base model id, num_examples, ...).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AdapterState:
    """Ordered name -> tensor plus metadata. Tensors are CPU and detached."""

    tensors: OrderedDict[str, torch.Tensor] = field(default_factory=OrderedDict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.tensors, OrderedDict):
            self.tensors = OrderedDict(self.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.tensors.items())

    def numel(self) -> int:
        """Total number of elements over all tensors."""
        return sum(t.numel() for t in self.tensors.values())

    def nbytes(self) -> int:
        """Total payload bytes over all tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def schema(self) -> OrderedDict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> (shape, dtype), the contract an incoming update is checked against."""
        return OrderedDict((k, (tuple(v.shape), v.dtype)) for k, v in self.tensors.items())

    def clone(self) -> AdapterState:
        """A deep copy (tensors cloned, meta copied)."""
        return AdapterState(OrderedDict((k, v.detach().clone()) for k, v in self.tensors.items()), dict(self.meta))

    def map(self, fn: Any) -> AdapterState:
        """A new state with ``fn(tensor)`` applied to each tensor; meta copied."""
        return AdapterState(OrderedDict((k, fn(v)) for k, v in self.tensors.items()), dict(self.meta))


def subtract(a: AdapterState, b: AdapterState) -> AdapterState:
    """a - b, name by name (same schema required)."""
    return AdapterState(OrderedDict((k, a[k] - b[k]) for k in a.tensors), dict(a.meta))


def max_abs_diff(a: AdapterState, b: AdapterState) -> float:
    """Largest absolute element difference between two states of the same schema."""
    if list(a.tensors) != list(b.tensors):
        raise ValueError("states have different tensor names")
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a.tensors if a[k].numel()), default=0.0)
