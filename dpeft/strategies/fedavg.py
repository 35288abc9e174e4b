"""FedAvg (McMahan et al. 2017): example-weighted mean of client deltas, server step size."""

from __future__ import annotations

from dataclasses import dataclass

from dpeft.config import StrategyConfig
from dpeft.config.options import option
from dpeft.errors import ConfigError
from dpeft.state import AdapterState
from dpeft.strategies.aggregate import ACCUMULATORS, StreamingWeightedMean, apply_delta
from dpeft.strategies.base import Aggregator, Strategy, StrategyOptions, option_key, register_strategy


@dataclass(kw_only=True)
class FedAvgOptions(StrategyOptions):
    """Options of fedavg and the strategies built on it."""

    accumulator: str = option(
        "float64",
        "dtype of the streaming weighted sum: float64 (the result does not depend on the order updates arrive in, "
        "to ~1e-16) or float32 (half the memory, about 3x the fold throughput of float64, but ~1e-7 order-dependent "
        "rounding: runs are not reproducible across arrival orders or transports); only weighted-mean strategies take float32",
        choices=tuple(ACCUMULATORS),
    )


@register_strategy("fedavg", FedAvgOptions)
class FedAvg(Strategy):
    """new_global = global + server_lr * sum_i (n_i / n) * delta_i."""

    opts: FedAvgOptions
    streaming_mean = True  # ``accumulator`` applies

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        name = self.opts.accumulator
        if name != "float64" and not self.streaming_mean:
            raise ConfigError(
                option_key("accumulator"),
                f"strategy {self.name!r} does not aggregate with a streaming weighted mean; only float64 applies",
            )
        self.accumulator = ACCUMULATORS[name]

    def make_aggregator(self, global_state: AdapterState) -> Aggregator:
        return StreamingWeightedMean(global_state, dtype=self.accumulator)

    def aggregated_delta(self, aggregator: Aggregator) -> AdapterState:
        """The mean client delta (subclasses turn it into a server optimizer step)."""
        return aggregator.result()

    def server_step(self, global_state: AdapterState, delta: AdapterState) -> AdapterState:
        """Apply the aggregated delta; FedOpt-style subclasses override this."""
        return apply_delta(global_state, delta, self.server_lr)

    def finish_round(self, global_state: AdapterState, aggregator: Aggregator) -> AdapterState:
        return self.server_step(global_state, self.aggregated_delta(aggregator))
