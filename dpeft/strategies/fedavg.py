"""FedAvg (McMahan et al. 2017): example-weighted mean of client deltas, server step size."""

from __future__ import annotations

from dpeft.state import AdapterState
from dpeft.strategies.aggregate import StreamingWeightedMean, apply_delta
from dpeft.strategies.base import Aggregator, Strategy, register_strategy


@register_strategy("fedavg")
class FedAvg(Strategy):
    """new_global = global + server_lr * sum_i (n_i / n) * delta_i."""

    def make_aggregator(self, global_state: AdapterState) -> Aggregator:
        return StreamingWeightedMean(global_state)

    def aggregated_delta(self, aggregator: Aggregator) -> AdapterState:
        """The mean client delta (subclasses turn it into a server optimizer step)."""
        return aggregator.result()

    def server_step(self, global_state: AdapterState, delta: AdapterState) -> AdapterState:
        """Apply the aggregated delta; FedOpt-style subclasses override this."""
        return apply_delta(global_state, delta, self.cfg.server_lr)

    def finish_round(self, global_state: AdapterState, aggregator: Aggregator) -> AdapterState:
        return self.server_step(global_state, self.aggregated_delta(aggregator))
