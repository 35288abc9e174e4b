"""Adaptive server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization").

The mean client delta ``d`` is the server's pseudo-gradient (a descent direction). With
``eta = server_lr``, per parameter and elementwise::

    m <- beta1 * m + (1 - beta1) * d
    v <- second_moment(v, d * d)
    global <- global + eta * m / (sqrt(v) + tau)

``second_moment`` is what tells the variants apart:

* fedadagrad: ``v + d^2``
* fedadam:    ``beta2 * v + (1 - beta2) * d^2``
* fedyogi:    ``v - (1 - beta2) * d^2 * sign(v - d^2)``

As in the paper there is no bias correction; ``m`` starts at 0 and ``v`` at ``tau^2``
(the paper asks for ``v_{-1} >= tau^2``). Buffers are checkpointed as ``"m/<param>"``
and ``"v/<param>"``.
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
class FedOptOptions(FedAvgOptions):
    """Options of fedadagrad (and, with beta2, fedadam and fedyogi)."""

    beta1: float = option(0.9, "first-moment decay in [0, 1)", low=0.0, high=1.0, high_open=True)
    tau: float = option(1e-3, "adaptivity / numerical floor added to sqrt(v), > 0", low=0.0, low_open=True)


@dataclass(kw_only=True)
class FedAdamOptions(FedOptOptions):
    """Options of fedadam and fedyogi."""

    beta2: float = option(0.99, "second-moment decay in [0, 1)", low=0.0, high=1.0, high_open=True)


#: ``strategy.server_lr`` of fedadam, fedyogi and fedadagrad when it is null
DEFAULT_ADAPTIVE_SERVER_LR = 0.03


class FedOpt(FedAvg):
    """Adam-shaped server step; subclasses define the second-moment update."""

    options_cls = FedOptOptions
    opts: FedOptOptions
    #: the step is normalised per parameter (about ``server_lr`` per element at first), so 1.0
    #: would move every LoRA weight by about its own size: a small default (benchmarks/RESULTS.md)
    default_server_lr = DEFAULT_ADAPTIVE_SERVER_LR

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        self.beta1 = self.opts.beta1
        self.tau = self.opts.tau
        self.moments = Moments(("m", "v"))

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        """The new ``v`` from the old one and the squared delta (float64)."""
        raise NotImplementedError

    def server_step(self, global_state: AdapterState, delta: AdapterState) -> AdapterState:
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for k, g in global_state.items():
            d = delta[k].to(torch.float64)
            m = self.moments.get("m", k, g).mul_(self.beta1).add_(d, alpha=1.0 - self.beta1)
            v = self.second_moment(self.moments.get("v", k, g, init=self.tau**2), d * d)
            self.moments.set("v", k, v)
            step = m / (v.sqrt() + self.tau)
            out[k] = (g.to(torch.float64) + self.server_lr * step).to(g.dtype)
        return AdapterState(out, dict(global_state.meta))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.moments.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.moments.load_state_dict(state)


@register_strategy("fedadagrad")
class FedAdagrad(FedOpt):
    """v accumulates every squared delta."""

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v + d2


@register_strategy("fedadam", FedAdamOptions)
class FedAdam(FedOpt):
    """v is an exponential moving average of squared deltas."""

    opts: FedAdamOptions

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        self.beta2 = self.opts.beta2

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1.0 - self.beta2) * d2


@register_strategy("fedyogi")
class FedYogi(FedAdam):
    """v moves towards d^2 by an additive, sign-controlled step (slower growth than Adam's)."""

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v - (1.0 - self.beta2) * d2 * torch.sign(v - d2)
