"""HetLoRA's client side: rank self-pruning (regularise the tail ranks, drop them once they fade).

A task whose hyperparameters carry ``rank_prune = [lam, keep, threshold, min_rank(, rule)]``
(see :class:`~dpeft.strategies.hyperparams.TaskHyperparams`) trains with the extra loss term::

    lam * sum_modules || B[:, t:r] @ A[t:r, :] ||_F        t = max(min_rank, floor(keep * r))

on the client's rank-``r`` factors: the last ``r - t`` ranks (the tail) are pushed towards zero.
After training the client decides whether the tail has faded, by ``rule``:

- ``share`` (0, the default; no fifth element on the wire): the tail's share of its adapter,
  ``sqrt(sum ||B_tail A_tail||^2) / sqrt(sum ||B A||^2)`` over all modules, is below ``threshold``;
- ``decrease`` (1): the tail term ``sum ||B_tail A_tail||_F`` of the trained factors is smaller
  than that of the factors the client received (the paper's comparison, read as before/after
  local training; ``threshold`` is not used).

A faded tail is pruned: its rows of ``A`` and columns of ``B`` are set to zero in the update,
and the metric ``hetlora_rank`` reports the reduced rank ``t`` (otherwise ``r``). The server
then sends that client factors of rank ``t`` from the next round on.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dpeft.state import AdapterState
from dpeft.strategies.lora import lora_pairs

RULES = ("share", "decrease")  # the wire codes of RankPrune.rule


@dataclass(frozen=True)
class RankPrune:
    """The self-pruning settings a task carries."""

    lam: float
    keep: float
    threshold: float
    min_rank: int
    rule: str = "share"  # or "decrease" (see the module docstring)

    def to_wire(self) -> tuple[float, ...]:
        head = (self.lam, self.keep, self.threshold, float(self.min_rank))
        return head if self.rule == "share" else (*head, float(RULES.index(self.rule)))

    @classmethod
    def from_hyperparams(cls, hp: Mapping[str, Any]) -> RankPrune | None:
        raw = hp.get("rank_prune")
        if raw is None:
            return None
        lam, keep, threshold, min_rank, *rest = (float(v) for v in raw)
        return cls(lam, keep, threshold, int(min_rank), RULES[int(rest[0])] if rest else "share")

    def tail_start(self, rank: int) -> int:
        """First tail rank index of a rank-``rank`` module (== ``rank``: no tail, nothing to prune)."""
        return min(rank, max(self.min_rank, math.floor(self.keep * rank)))


def _matrices(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = a.shape[0]
    return a.reshape(r, -1), b.reshape(b.shape[0], r)


def _tail_sq(a: torch.Tensor, b: torch.Tensor, start: int) -> torch.Tensor:
    """``||B[:, start:] A[start:]||_F^2`` via the two small Gram matrices (no ``out x in`` product)."""
    a2, b2 = _matrices(a, b)
    at, bt = a2[start:], b2[:, start:]
    return ((bt.T @ bt) * (at @ at.T)).sum()


def tail_penalty(
    spec: RankPrune, params: Mapping[str, torch.Tensor]
) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None:
    """The loss term ``lam * sum ||B_tail A_tail||_F`` as a function of name -> tensor (None when it is 0)."""
    if spec.lam <= 0:
        return None
    pairs = [(a, b) for a, b in lora_pairs(params).values()]

    def penalty(values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = None
        for a_name, b_name in pairs:
            a, b = values[a_name], values[b_name]
            start = spec.tail_start(a.shape[0])
            if start >= a.shape[0]:
                continue
            term = _tail_sq(a.float(), b.float(), start).add(1e-20).sqrt()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros((), device=next(iter(values.values())).device)
        return spec.lam * total

    return penalty


def tail_share(state: AdapterState, spec: RankPrune) -> float:
    """``||tail products|| / ||products||`` over all LoRA modules of ``state`` (0 for a zero adapter)."""
    tail = full = 0.0
    for a_name, b_name in lora_pairs(state.tensors).values():
        a, b = state[a_name].double(), state[b_name].double()
        rank = a.shape[0]
        start = spec.tail_start(rank)
        full += float(_tail_sq(a, b, 0))
        if start < rank:
            tail += float(_tail_sq(a, b, start))
    return math.sqrt(tail / full) if full > 0 else 0.0


def tail_term(state: AdapterState, spec: RankPrune) -> float:
    """``sum_modules ||B_tail A_tail||_F`` of ``state`` (the penalty without ``lam``; float64)."""
    total = 0.0
    for a_name, b_name in lora_pairs(state.tensors).values():
        a, b = state[a_name].double(), state[b_name].double()
        start = spec.tail_start(a.shape[0])
        if start < a.shape[0]:
            total += math.sqrt(max(float(_tail_sq(a, b, start)), 0.0))
    return total


def faded(state: AdapterState, spec: RankPrune, received: AdapterState | None) -> tuple[bool, float]:
    """(whether the tail of ``state`` has faded by ``spec.rule``, the tail's share).

    The ``decrease`` rule compares with ``received`` (the factors training started from); without
    them it never prunes."""
    share = tail_share(state, spec)
    if spec.rule == "decrease":
        if received is None:
            return False, share
        return tail_term(state, spec) < tail_term(received, spec), share
    return share < spec.threshold, share


def prune(state: AdapterState, spec: RankPrune, received: AdapterState | None = None) -> tuple[AdapterState, int, float]:
    """(state with the tail zeroed when it has faded, the rank the client keeps, the tail's share)."""
    pairs = lora_pairs(state.tensors)
    if not pairs:
        return state, 0, 0.0
    rank = max(int(state[a].shape[0]) for a, _ in pairs.values())
    start = spec.tail_start(rank)
    gone, share = faded(state, spec, received)
    if start >= rank or not gone:
        return state, rank, share
    out: OrderedDict[str, torch.Tensor] = OrderedDict(state.tensors)
    for a_name, b_name in pairs.values():
        a, b = state[a_name].clone(), state[b_name].clone()
        a[start:] = 0
        b[:, start:] = 0
        out[a_name], out[b_name] = a, b
    return AdapterState(out, dict(state.meta)), start, share


def task_penalty(
    hp: Mapping[str, Any], params: Mapping[str, torch.Tensor]
) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None:
    """The tail-rank loss term a task with hyperparameters ``hp`` trains with (None: none)."""
    spec = RankPrune.from_hyperparams(hp)
    return None if spec is None else tail_penalty(spec, params)


def prune_update(
    hp: Mapping[str, Any], local: AdapterState, received: AdapterState | None = None
) -> tuple[AdapterState, dict[str, float]]:
    """``local`` after self-pruning when the task asks for it, and the metrics the client reports
    (``received``: the factors training started from, which the ``decrease`` rule compares with)."""
    spec = RankPrune.from_hyperparams(hp)
    if spec is None:
        return local, {}
    state, kept, share = prune(local, spec, received)
    return state, {"hetlora_rank": float(kept), "hetlora_tail_share": share}
