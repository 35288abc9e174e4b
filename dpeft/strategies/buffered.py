"""An aggregator that keeps every update of the round, for rules that need them all at once.

Coordinate-wise median, trimmed mean and Krum cannot be computed by folding updates one at
a time, so :class:`BufferedAggregator` stores each client's delta flattened into one
float64 vector. Memory is O(clients x adapter size) per round — unlike the O(1)-in-clients
:class:`~dpeft.strategies.aggregate.StreamingWeightedMean` — which is fine for LoRA-sized
adapters and tens of clients per round, but grows linearly with the cohort.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from dpeft.state import AdapterState
from dpeft.strategies.aggregator import Aggregator, ClientUpdate

Reducer = Callable[[list[torch.Tensor], list[float], list[int]], torch.Tensor]
"""(flat deltas, weights, client ids) -> one flat aggregated delta."""


def flatten(state: AdapterState, names: list[str]) -> torch.Tensor:
    """The tensors ``names`` of ``state`` concatenated into one float64 vector."""
    if not names:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([state[k].detach().reshape(-1).to(torch.float64) for k in names])


def unflatten(vector: torch.Tensor, template: AdapterState) -> AdapterState:
    """Split ``vector`` back into tensors shaped and typed like ``template``."""
    if vector.numel() != template.numel():
        raise ValueError(f"vector has {vector.numel()} elements, template {template.numel()}")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    offset = 0
    for k, t in template.items():
        n = t.numel()
        out[k] = vector[offset : offset + n].reshape(t.shape).to(t.dtype)
        offset += n
    return AdapterState(out)


class BufferedAggregator(Aggregator):
    """Stores each update's flattened delta; ``result()`` applies ``reducer`` to all of them.

    Updates with a non-positive example count are skipped, as in the streaming mean.
    """

    def __init__(self, template: AdapterState, reducer: Reducer) -> None:
        self._template = template
        self._names = list(template.tensors)
        self._reducer = reducer
        self.vectors: list[torch.Tensor] = []
        self.weights: list[float] = []
        self.client_ids: list[int] = []

    def add(self, update: ClientUpdate) -> None:
        w = float(update.num_examples)
        if w <= 0:
            return
        self.vectors.append(flatten(update.delta, self._names))
        self.weights.append(w)
        self.client_ids.append(update.client_id)

    @property
    def count(self) -> int:
        return len(self.vectors)

    def result(self) -> AdapterState:
        if not self.vectors:
            raise ValueError("no updates were aggregated")
        return unflatten(self._reducer(self.vectors, self.weights, self.client_ids), self._template)
