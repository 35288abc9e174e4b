"""FedProx (Li et al. 2020): FedAvg aggregation plus a client-side proximal term.

The server part is FedAvg unchanged. ``configure_train`` returns ``{"prox_mu": mu}``; the
client adds ``(mu / 2) * ||w - w_global||^2`` over the adapter parameters to its local loss,
where ``w_global`` is the adapter state it received this round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpeft.config import StrategyConfig
from dpeft.config.options import option
from dpeft.state import AdapterState
from dpeft.strategies.base import register_strategy
from dpeft.strategies.fedavg import FedAvg, FedAvgOptions
from dpeft.strategies.hyperparams import TaskHyperparams


@dataclass(kw_only=True)
class FedProxOptions(FedAvgOptions):
    """Options of fedprox."""

    mu: float = option(0.01, "proximal term weight, >= 0", low=0.0)


@register_strategy("fedprox", FedProxOptions)
class FedProx(FedAvg):
    """FedAvg whose clients train with a proximal term of weight ``mu``."""

    opts: FedProxOptions

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        self.mu = self.opts.mu

    def configure_train(self, round_num: int, global_state: AdapterState) -> dict[str, Any]:
        return TaskHyperparams(prox_mu=self.mu).to_dict()
