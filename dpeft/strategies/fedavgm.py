"""FedAvgM (Hsu et al. 2019): FedAvg with server momentum.

With the mean client delta ``d`` as the server's (negative) pseudo-gradient::

    m <- momentum * m + d
    global <- global + server_lr * m

``momentum = 0`` is FedAvg. The buffer is checkpointed as ``"m/<param>"``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from dpeft.config import StrategyConfig
from dpeft.state import AdapterState
from dpeft.strategies.base import register_strategy
from dpeft.strategies.fedavg import FedAvg
from dpeft.strategies.moments import Moments
from dpeft.strategies.options import float_option


@register_strategy("fedavgm")
class FedAvgM(FedAvg):
    """Heavy-ball momentum on the aggregated delta."""

    option_help = {"momentum": "server momentum in [0, 1) (default 0.9)"}

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        self.momentum = float_option(self.options, "momentum", 0.9, low=0.0, high=1.0, high_open=True)
        self.moments = Moments(("m",))

    def server_step(self, global_state: AdapterState, delta: AdapterState) -> AdapterState:
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for k, g in global_state.items():
            m = self.moments.get("m", k, g).mul_(self.momentum).add_(delta[k].to(torch.float64))
            out[k] = (g.to(torch.float64) + self.cfg.server_lr * m).to(g.dtype)
        return AdapterState(out, dict(global_state.meta))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.moments.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.moments.load_state_dict(state)
