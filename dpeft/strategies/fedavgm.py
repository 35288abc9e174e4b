"""FedAvgM (Hsu et al. 2019): FedAvg with server momentum.

With the mean client delta ``d`` as the server's (negative) pseudo-gradient::

    m <- momentum * m + d
    global <- global + server_lr * m

``momentum = 0`` is FedAvg. The buffer is checkpointed as ``"m/<param>"``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from dpeft.config import StrategyConfig
from dpeft.config.options import option
from dpeft.state import AdapterState
from dpeft.strategies.base import register_strategy
from dpeft.strategies.fedavg import FedAvg, FedAvgOptions
from dpeft.strategies.moments import Moments


@dataclass(kw_only=True)
class FedAvgMOptions(FedAvgOptions):
    """Options of fedavgm."""

    momentum: float = option(0.9, "server momentum in [0, 1)", low=0.0, high=1.0, high_open=True)


@register_strategy("fedavgm", FedAvgMOptions)
class FedAvgM(FedAvg):
    """Heavy-ball momentum on the aggregated delta."""

    opts: FedAvgMOptions

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        self.momentum = self.opts.momentum
        self.moments = Moments(("m",))

    def server_step(self, global_state: AdapterState, delta: AdapterState) -> AdapterState:
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for k, g in global_state.items():
            m = self.moments.get("m", k, g).mul_(self.momentum).add_(delta[k].to(torch.float64))
            out[k] = (g.to(torch.float64) + self.server_lr * m).to(g.dtype)
        return AdapterState(out, dict(global_state.meta))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.moments.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.moments.load_state_dict(state)
