"""A dpeft plug-in strategy: FedAvg whose server step shrinks as the run goes on.

Round t applies ``server_lr / (1 + decay * t)`` times the clients' mean update: large steps while
the adapter is far from good, smaller ones later, when client drift dominates the update. The
round counter is checkpointed, so a resumed run continues the same schedule.

Select it with ``plugins: [damped_fedavg]`` and ``strategy: {name: damped_fedavg}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import dpeft
from dpeft.strategies.aggregate import apply_delta
from dpeft.strategies.fedavg import FedAvg, FedAvgOptions


@dataclass(kw_only=True)
class DampedOptions(FedAvgOptions):
    """``strategy.options`` of damped_fedavg (checked like a built-in's: type, range, unknown keys)."""

    decay: float = dpeft.option(0.5, "round t steps by server_lr / (1 + decay * t)", low=0.0)


@dpeft.register_strategy("damped_fedavg", DampedOptions)
class DampedFedAvg(FedAvg):
    """FedAvg with a server step size that decays per round."""

    opts: DampedOptions

    def __init__(self, cfg: dpeft.StrategyConfig) -> None:
        super().__init__(cfg)
        self.rounds_done = 0

    def server_step(self, global_state: dpeft.AdapterState, delta: dpeft.AdapterState) -> dpeft.AdapterState:
        lr = self.server_lr / (1.0 + self.opts.decay * self.rounds_done)
        self.rounds_done += 1
        self.last_metrics["server_step_lr"] = lr  # a column of metrics.jsonl
        return apply_delta(global_state, delta, lr)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rounds_done": torch.tensor(self.rounds_done)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.rounds_done = int(state["rounds_done"])
