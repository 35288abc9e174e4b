"""FedProx (Li et al. 2020): FedAvg aggregation plus a client-side proximal term.

The server part is FedAvg unchanged. ``configure_train`` returns ``{"prox_mu": mu}``; the
client adds ``(mu / 2) * ||w - w_global||^2`` over the adapter parameters to its local loss,
where ``w_global`` is the adapter state it received this round.
"""

from __future__ import annotations

from typing import Any

from dpeft.config import StrategyConfig
from dpeft.state import AdapterState
from dpeft.strategies.base import register_strategy
from dpeft.strategies.fedavg import FedAvg
from dpeft.strategies.options import float_option


@register_strategy("fedprox")
class FedProx(FedAvg):
    """FedAvg whose clients train with a proximal term of weight ``mu``."""

    option_help = {"mu": "proximal term weight, >= 0 (default 0.01)"}

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        self.mu = float_option(self.options, "mu", 0.01, low=0.0)

    def configure_train(self, round_num: int, global_state: AdapterState) -> dict[str, Any]:
        return {"prox_mu": self.mu}
