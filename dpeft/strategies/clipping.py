"""Update-norm clipping: scale each client delta to at most a global L2 norm.

Used by every strategy through ``Strategy.begin_round`` when ``strategy.options.clip_norm``
is set: a :class:`ClippingAggregator` wraps the strategy's own aggregator and clips each
update before passing it on. The norm is taken over all tensors of the delta together
(float64), the usual per-client clipping of DP-FedAvg and norm-bounding defenses.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from dpeft.state import AdapterState
from dpeft.strategies.aggregator import Aggregator, ClientUpdate


def global_norm(state: AdapterState) -> float:
    """L2 norm of all tensors of ``state`` taken together."""
    total = 0.0
    for t in state.tensors.values():
        total += float(t.detach().to(torch.float64).pow(2).sum())
    return total**0.5


def clip_by_global_norm(state: AdapterState, max_norm: float) -> tuple[AdapterState, float]:
    """``state`` scaled so its global L2 norm is at most ``max_norm``, and the norm before clipping.

    Returns ``state`` itself when it is already within the bound.
    """
    norm = global_norm(state)
    if norm <= max_norm or norm == 0.0:
        return state, norm
    scale = max_norm / norm
    tensors = OrderedDict((k, (t.to(torch.float64) * scale).to(t.dtype)) for k, t in state.items())
    return AdapterState(tensors, dict(state.meta)), norm


class ClippingAggregator(Aggregator):
    """Clips each update's delta to ``max_norm``, then folds it into ``inner``.

    ``metrics`` (usually the strategy's ``last_metrics``) receives ``clip_count`` (updates
    that were scaled down) and ``clip_max_norm`` (largest norm seen before clipping).
    """

    def __init__(self, inner: Aggregator, max_norm: float, metrics: dict[str, float] | None = None) -> None:
        if max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.inner = inner
        self.max_norm = float(max_norm)
        self.metrics = metrics if metrics is not None else {}
        self.metrics.setdefault("clip_count", 0.0)
        self.metrics.setdefault("clip_max_norm", 0.0)

    def add(self, update: ClientUpdate) -> None:
        delta, norm = clip_by_global_norm(update.delta, self.max_norm)
        if delta is not update.delta:
            self.metrics["clip_count"] += 1.0
            update = ClientUpdate(update.client_id, delta, update.num_examples, dict(update.metrics))
        self.metrics["clip_max_norm"] = max(self.metrics["clip_max_norm"], norm)
        self.inner.add(update)

    def result(self) -> AdapterState:
        return self.inner.result()

    @property
    def count(self) -> int:
        return self.inner.count
