"""Aggregation math as plain functions and one streaming accumulator."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from dpeft.state import AdapterState
from dpeft.strategies.base import Aggregator, ClientUpdate


class StreamingWeightedMean(Aggregator):
    """Weighted mean of deltas, folded as they arrive: memory O(1) in the number of clients.

    Accumulates in float64 so the result does not depend on arrival order beyond ~1e-16,
    which keeps seeded runs reproducible while updates arrive in any order.
    """

    def __init__(self, template: AdapterState) -> None:
        self._sum = OrderedDict((k, torch.zeros(v.shape, dtype=torch.float64)) for k, v in template.items())
        self._dtypes = {k: v.dtype for k, v in template.items()}
        self._weight = 0.0
        self._count = 0

    def add(self, update: ClientUpdate, weight: float | None = None) -> None:
        w = float(update.num_examples if weight is None else weight)
        if w <= 0:
            return
        for k, acc in self._sum.items():
            acc.add_(update.delta[k], alpha=w)  # promotes into the float64 accumulator, no copy
        self._weight += w
        self._count += 1

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return self._weight

    def result(self) -> AdapterState:
        if self._count == 0:
            raise ValueError("no updates were aggregated")
        return AdapterState(OrderedDict((k, (v / self._weight).to(self._dtypes[k])) for k, v in self._sum.items()))


def weighted_mean(deltas: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """Non-streaming weighted mean (reference implementation for tests)."""
    total = float(sum(weights))
    out = OrderedDict()
    for k in deltas[0].tensors:
        acc = sum(d[k].double() * (w / total) for d, w in zip(deltas, weights, strict=True))
        out[k] = acc.to(deltas[0][k].dtype)  # type: ignore[union-attr]
    return AdapterState(out)


def apply_delta(global_state: AdapterState, delta: AdapterState, lr: float = 1.0) -> AdapterState:
    """global + lr * delta, computed in float64 and cast back."""
    out = OrderedDict()
    for k, g in global_state.items():
        out[k] = (g.double() + lr * delta[k].double()).to(g.dtype)
    return AdapterState(out, dict(global_state.meta))


def restrict(state: AdapterState, names: Sequence[str]) -> AdapterState:
    """The tensors of ``state`` named in ``names`` (in ``state`` order), meta copied."""
    keep = set(names)
    return AdapterState(OrderedDict((k, v) for k, v in state.items() if k in keep), dict(state.meta))


def apply_partial_delta(global_state: AdapterState, delta: AdapterState, lr: float = 1.0) -> AdapterState:
    """global + lr * delta for the names ``delta`` holds; every other tensor is kept as is."""
    out = OrderedDict()
    for k, g in global_state.items():
        out[k] = (g.double() + lr * delta[k].double()).to(g.dtype) if k in delta.tensors else g.clone()
    return AdapterState(out, dict(global_state.meta))
