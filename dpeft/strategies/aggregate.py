"""Aggregation math as plain functions and one streaming accumulator.

The streaming accumulator and the server step work on flat slices of ``SLICE`` elements, so
their float64 temporaries stay a few MiB however large a tensor is (a mixed-dtype ``add_``
over a whole multi-GiB tensor would first make a float64 copy of it); the results are
bit-identical to whole-tensor arithmetic, element by element.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from dpeft.codec.spool import release
from dpeft.state import AdapterState
from dpeft.strategies.base import Aggregator, ClientUpdate

#: elements per slice of the sliced arithmetic (8 MiB of float64)
SLICE = 1 << 20


def _slices(n: int) -> range:
    return range(0, n, SLICE)


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
            flat, src = acc.view(-1), update.delta[k].reshape(-1)
            for j, i in enumerate(_slices(flat.numel())):
                flat[i : i + SLICE].add_(src[i : i + SLICE], alpha=w)  # promoted into float64 slice by slice
                if j % 8 == 7:
                    release(update.delta, k)  # a spooled update gives back the pages read so far
            release(update.delta, k)
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
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for k, v in self._sum.items():
            out[k] = t = torch.empty(v.shape, dtype=self._dtypes[k])
            flat, src = t.view(-1), v.view(-1)
            for i in _slices(flat.numel()):
                flat[i : i + SLICE] = src[i : i + SLICE] / self._weight
        return AdapterState(out)


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
        out[k] = _sliced_step(g, delta[k], lr)
    return AdapterState(out, dict(global_state.meta))


def _sliced_step(g: torch.Tensor, d: torch.Tensor, lr: float) -> torch.Tensor:
    """``(g.double() + lr * d.double()).to(g.dtype)``, computed slice by slice."""
    out = torch.empty(g.shape, dtype=g.dtype)
    flat, gf, df = out.view(-1), g.reshape(-1), d.reshape(-1)
    for i in _slices(flat.numel()):
        flat[i : i + SLICE] = gf[i : i + SLICE].double() + lr * df[i : i + SLICE].double()
    return out


def restrict(state: AdapterState, names: Sequence[str]) -> AdapterState:
    """The tensors of ``state`` named in ``names`` (in ``state`` order), meta copied."""
    keep = set(names)
    return AdapterState(OrderedDict((k, v) for k, v in state.items() if k in keep), dict(state.meta))


def apply_partial_delta(global_state: AdapterState, delta: AdapterState, lr: float = 1.0) -> AdapterState:
    """global + lr * delta for the names ``delta`` holds; every other tensor is kept as is."""
    out = OrderedDict()
    for k, g in global_state.items():
        out[k] = _sliced_step(g, delta[k], lr) if k in delta.tensors else g.clone()
    return AdapterState(out, dict(global_state.meta))
