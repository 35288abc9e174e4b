"""Robust aggregation strategies: median, trimmed_mean, krum, multi_krum.

Each buffers the round's updates (:class:`~dpeft.strategies.buffered.BufferedAggregator`,
memory O(clients x adapter size)) and replaces FedAvg's weighted mean with a rule from
:mod:`dpeft.strategies.robust_rules`; the server step (``global + server_lr * aggregate``) is
FedAvg's. Example counts are ignored on purpose (see :mod:`dpeft.strategies.robust_rules`).
Combine with ``clip_norm`` to also bound each update's norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpeft.config import StrategyConfig
from dpeft.config.options import option
from dpeft.state import AdapterState
from dpeft.strategies.base import Aggregator, register_strategy
from dpeft.strategies.buffered import BufferedAggregator
from dpeft.strategies.fedavg import FedAvg, FedAvgOptions
from dpeft.strategies.robust_rules import coordinate_median, krum, trimmed_mean


class RobustStrategy(FedAvg):
    """FedAvg with the mean replaced by ``reduce`` over all buffered updates."""

    streaming_mean = False

    def make_aggregator(self, global_state: AdapterState) -> Aggregator:
        return BufferedAggregator(global_state, self.reduce)

    def reduce(self, vectors: list[torch.Tensor], weights: list[float], client_ids: list[int]) -> torch.Tensor:
        """One flat aggregated delta from the round's flat deltas."""
        raise NotImplementedError


@register_strategy("median")
class Median(RobustStrategy):
    """Coordinate-wise median of the client deltas."""

    def reduce(self, vectors: list[torch.Tensor], weights: list[float], client_ids: list[int]) -> torch.Tensor:
        return coordinate_median(vectors)


@dataclass(kw_only=True)
class TrimmedMeanOptions(FedAvgOptions):
    """Options of trimmed_mean."""

    beta: float = option(0.1, "fraction trimmed at each end per coordinate, in [0, 0.5)", low=0.0, high=0.5, high_open=True)


@dataclass(kw_only=True)
class KrumOptions(FedAvgOptions):
    """Options of krum."""

    f: int = option(1, "number of Byzantine clients tolerated; a round needs at least 2f+3 updates", low=0)


@dataclass(kw_only=True)
class MultiKrumOptions(KrumOptions):
    """Options of multi_krum."""

    m: int | None = option(None, "updates averaged per round, at most the number received (null = n - f)", low=1)


@register_strategy("trimmed_mean", TrimmedMeanOptions)
class TrimmedMean(RobustStrategy):
    """Coordinate-wise mean after trimming a ``beta`` fraction at each end."""

    opts: TrimmedMeanOptions

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        self.beta = self.opts.beta

    def reduce(self, vectors: list[torch.Tensor], weights: list[float], client_ids: list[int]) -> torch.Tensor:
        return trimmed_mean(vectors, self.beta)


@register_strategy("krum", KrumOptions)
class Krum(RobustStrategy):
    """Krum: the single update closest to its ``n - f - 2`` neighbours (needs ``n >= 2f + 3``).

    ``last_metrics`` gets ``krum_selected`` (how many were averaged) and, for Krum,
    ``krum_client`` (the chosen client id).
    """

    opts: KrumOptions

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        self.f = self.opts.f
        self.last_selected: list[int] = []

    def selection_size(self, n: int) -> int:
        """How many lowest-scoring updates to average when ``n`` arrived."""
        return 1

    def min_updates(self) -> int:
        return 2 * self.f + 3

    def reduce(self, vectors: list[torch.Tensor], weights: list[float], client_ids: list[int]) -> torch.Tensor:
        chosen, mean = krum(vectors, self.f, self.selection_size(len(vectors)))
        self.last_selected = [client_ids[i] for i in chosen]
        self.last_metrics["krum_selected"] = float(len(chosen))
        if len(chosen) == 1:
            self.last_metrics["krum_client"] = float(self.last_selected[0])
        return mean


@register_strategy("multi_krum", MultiKrumOptions)
class MultiKrum(Krum):
    """Multi-Krum: the mean of the ``m`` best-scoring updates (default ``m = n - f``)."""

    opts: MultiKrumOptions

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        self.m = self.opts.m

    def selection_size(self, n: int) -> int:
        m = n - self.f if self.m is None else self.m
        if m > n:
            raise ValueError(f"multi_krum: m={m} but only {n} updates arrived this round")
        return max(m, 1)
