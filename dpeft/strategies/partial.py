"""FedAvg over a subset of the adapter's tensors; the rest of the global is left unchanged.

Base of strategies that keep some tensors out of aggregation: frozen ones (ffa_lora) or
personal ones (fedsa_lora). The aggregator reads only the shared tensors of each update,
so clients may send the others as zeros or leave them out.
"""

from __future__ import annotations

from dpeft.config import RunConfig
from dpeft.errors import ConfigError
from dpeft.state import AdapterState
from dpeft.strategies.aggregate import StreamingWeightedMean, apply_partial_delta, restrict
from dpeft.strategies.base import Aggregator
from dpeft.strategies.fedavg import FedAvg
from dpeft.strategies.lora import lora_pairs, require_lora_method


class PartialFedAvg(FedAvg):
    """``global[k] += server_lr * weighted mean delta[k]`` for ``k`` in ``shared_names``."""

    def shared_names(self, global_state: AdapterState) -> list[str]:
        """Names aggregated this round (in global order)."""
        raise NotImplementedError

    def require_lora(self, global_state: AdapterState) -> None:
        """Raise a config error unless the adapter has LoRA factor pairs."""
        if not lora_pairs(global_state.tensors):
            raise ConfigError("strategy.name", f"{self.name} needs a LoRA adapter (lora_A/lora_B factors); this adapter has none")

    def validate_run(self, run_cfg: RunConfig) -> None:
        super().validate_run(run_cfg)
        require_lora_method(self.name, run_cfg)

    def make_aggregator(self, global_state: AdapterState) -> Aggregator:
        self.require_lora(global_state)
        return StreamingWeightedMean(restrict(global_state, self.shared_names(global_state)), dtype=self.accumulator)

    def server_step(self, global_state: AdapterState, delta: AdapterState) -> AdapterState:
        return apply_partial_delta(global_state, delta, self.server_lr)
