"""Aggregation math as plain functions and one streaming accumulator.

The streaming accumulator and the server step work on flat slices of ``SLICE`` elements, so
their float64 temporaries stay a few MiB however large a tensor is (a mixed-dtype ``add_``
over a whole multi-GiB tensor would first make a float64 copy of it); the results are
bit-identical to whole-tensor arithmetic, element by element.

Folding an fp32 update into the float64 sum casts it in blocks of ``BLOCK`` elements into one
reused scratch buffer that stays in the CPU's L2 cache, then adds the block with its weight
(``acc.add_(scratch, alpha=w)``, the same arithmetic as a mixed-dtype ``acc.add_(x, alpha=w)``,
so the sums are bit-identical to it): memory traffic is the update read once plus the sum read
and written once, with no fresh temporary per slice (which, above glibc's mmap threshold, page
faults on every allocation: the coordinator sets that threshold to 1 MiB). torch has no fused
mixed-dtype add on CPU, so the cast and the add remain two passes over each block; a float64
fold therefore runs at about a third of an fp32 ``add_``'s speed (``benchmarks/aggregation.py``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from dpeft.codec.spool import release
from dpeft.errors import RejectedUpdate
from dpeft.state import AdapterState
from dpeft.strategies.aggregator import Aggregator, ClientUpdate

#: elements per slice of the sliced arithmetic (8 MiB of float64)
SLICE = 1 << 20
#: elements per cast-and-add block of a fold (512 KiB of float64: the scratch stays in L2)
BLOCK = 1 << 16
#: a spooled update gives back the pages it was read from every this many elements of a tensor
_RELEASE_EVERY = 8 * SLICE

#: accumulator dtypes a StreamingWeightedMean supports, by the name ``strategy.options.accumulator`` uses
ACCUMULATORS = {"float64": torch.float64, "float32": torch.float32}


def _slices(n: int) -> range:
    return range(0, n, SLICE)


def _fold(acc: torch.Tensor, src: torch.Tensor, w: float, scratch: torch.Tensor) -> None:
    """``acc += w * src`` for flat ``acc`` and ``src``; ``src`` of another dtype is cast through ``scratch``.

    Same dtype, or at most ``BLOCK`` elements (one small temporary): a plain ``add_``. Otherwise
    block by block: ``scratch.copy_(src block)`` then ``acc block += w * scratch``, both vectorized
    with the scratch in cache.
    """
    if src.dtype == acc.dtype or acc.numel() <= BLOCK:
        acc.add_(src, alpha=w)
        return
    for a, s in zip(acc.split(BLOCK), src.split(BLOCK), strict=True):
        buf = scratch if a.numel() == BLOCK else scratch[: a.numel()]
        buf.copy_(s)
        a.add_(buf, alpha=w)


class StreamingWeightedMean(Aggregator):
    """Weighted mean of deltas, folded as they arrive: memory O(1) in the number of clients.

    Accumulates in float64 by default so the result does not depend on arrival order beyond
    ~1e-16 relative, which keeps seeded runs reproducible while updates arrive in any order (and
    across transports). ``dtype=torch.float32`` (``strategy.options.accumulator: float32``)
    halves the accumulator's memory and folds fp32 updates at about the speed of a plain fp32
    ``add_`` (no cast, 12 instead of 20 bytes moved per element: about 3x the float64 fold on a
    2-core machine, ``benchmarks/RESULTS.md``), but its rounding depends on the arrival order (~1e-7 relative, growing with the
    number of updates): runs whose updates arrive in different orders (deadline/async policies,
    different transports) then differ in the low bits of the global.
    """

    def __init__(self, template: AdapterState, dtype: torch.dtype = torch.float64) -> None:
        if dtype not in ACCUMULATORS.values():
            raise ValueError(f"accumulator dtype must be torch.float64 or torch.float32, got {dtype}")
        self.dtype = dtype
        self._sum = OrderedDict((k, torch.zeros(v.shape, dtype=dtype)) for k, v in template.items())
        self._dtypes = {k: v.dtype for k, v in template.items()}
        self._scratch = torch.empty(BLOCK, dtype=dtype)
        self._weight = 0.0
        self._count = 0

    def add(self, update: ClientUpdate, weight: float | None = None) -> None:
        w = float(update.num_examples if weight is None else weight)
        if w <= 0:
            return
        delta = update.delta
        for k, acc in self._sum.items():  # check every tensor before folding any: no half-folded update
            if k not in delta.tensors:
                raise RejectedUpdate("missing_tensor", f"client {update.client_id}: no {k}")
            if delta[k].numel() != acc.numel():
                raise RejectedUpdate(
                    "shape", f"client {update.client_id}: {k} has {delta[k].numel()} elements, expected {acc.numel()}"
                )
        for k, acc in self._sum.items():
            flat, src = acc.view(-1), delta[k].reshape(-1)
            if flat.numel() <= _RELEASE_EVERY:
                _fold(flat, src, w, self._scratch)
            else:
                for a, s in zip(flat.split(_RELEASE_EVERY), src.split(_RELEASE_EVERY), strict=True):
                    _fold(a, s, w, self._scratch)
                    release(delta, k)  # a spooled update gives back the pages read so far
            release(delta, k)
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
            if t.dtype == v.dtype:
                torch.div(src, self._weight, out=flat)
                continue
            for o, s in zip(flat.split(BLOCK), src.split(BLOCK), strict=True):  # divide into the cached scratch, cast out
                buf = self._scratch if s.numel() == BLOCK else self._scratch[: s.numel()]
                torch.div(s, self._weight, out=buf)
                o.copy_(buf)
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
