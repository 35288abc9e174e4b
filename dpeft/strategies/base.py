"""Strategy template and registry.

The round engine calls, per round: ``configure_train`` (extra hyperparameters for the
sampled clients), ``begin_round`` (a fresh streaming aggregator), ``aggregator.add`` once
per accepted update as it arrives, and ``finish_round`` (server optimizer step producing
the next global adapter). Strategies never do I/O. ``state_dict``/``load_state_dict`` let
checkpoints carry optimizer moments.

Subclasses implement ``make_aggregator``; ``begin_round`` wraps it with update-norm clipping
when ``strategy.options.clip_norm`` is set, so clipping works with every strategy. Each
class lists its options in ``option_help``; unknown option keys are a config error.
``client_state`` is what a given client should be sent (the global, unless a strategy
such as flexlora re-factors it per client). ``last_metrics`` holds the last round's
strategy metrics (clipping counts, truncation errors, selected clients, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from dpeft.config import StrategyConfig
from dpeft.errors import ConfigError
from dpeft.state import AdapterState
from dpeft.strategies.options import float_option, option_key


@dataclass
class ClientUpdate:
    """One client's contribution: the change it made to the global adapter."""

    client_id: int
    delta: AdapterState
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Aggregator:
    """Folds client updates one at a time; ``result()`` returns the aggregated delta."""

    def add(self, update: ClientUpdate) -> None:
        raise NotImplementedError

    def result(self) -> AdapterState:
        raise NotImplementedError

    @property
    def count(self) -> int:
        raise NotImplementedError


class Strategy:
    """Base class: FedAvg-shaped hooks; subclasses override what differs."""

    name = "base"
    option_help: dict[str, str] = {
        "clip_norm": "clip each client delta to this global L2 norm before aggregation (null = no clipping)",
    }

    def __init__(self, cfg: StrategyConfig) -> None:
        self.cfg = cfg
        self.options = dict(cfg.options)
        self.last_metrics: dict[str, float] = {}
        known = self.known_options()
        for key in self.options:
            if key not in known:
                raise ConfigError(
                    option_key(key), f"unknown option for strategy {self.name!r}; known: {', '.join(sorted(known))}"
                )
        self.clip_norm = float_option(self.options, "clip_norm", None, low=0.0, low_open=True)

    @classmethod
    def known_options(cls) -> dict[str, str]:
        """Option name -> help, merged over the class hierarchy."""
        merged: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("option_help", {}))
        return merged

    def configure_train(self, round_num: int, global_state: AdapterState) -> dict[str, Any]:
        """Extra hyperparameters sent with each TrainTask this round."""
        return {}

    def client_state(self, global_state: AdapterState, client_id: int) -> AdapterState:
        """The adapter state client ``client_id`` starts from (the global by default)."""
        return global_state

    def client_key(self, client_id: int) -> Hashable:
        """Clients with equal keys get the same ``client_state`` (the engine encodes one payload per key)."""
        return None

    def validate_run(self, run_cfg: Any) -> None:
        """Checks against the whole run config (a ``RunConfig``), called when a config is loaded."""
        from dpeft.sync import updates_per_step

        need = self.min_updates()
        have = updates_per_step(run_cfg)
        if have < need:
            raise ConfigError(
                "clients_per_round",
                f"strategy {self.name!r} needs at least {need} updates per aggregation, but sync policy "
                f"{run_cfg.sync.name!r} aggregates {have} (raise clients_per_round, sync.quorum or sync.buffer_size)",
            )

    def min_updates(self) -> int:
        """Fewest updates ``finish_round`` can aggregate (a deadline round waits for at least this many)."""
        return 1

    def begin_round(self, global_state: AdapterState) -> Aggregator:
        """A fresh aggregator for this round, clipping update norms when ``clip_norm`` is set."""
        self.last_metrics = {}
        aggregator = self.make_aggregator(global_state)
        if self.clip_norm is not None:
            from dpeft.strategies.clipping import ClippingAggregator

            aggregator = ClippingAggregator(aggregator, self.clip_norm, self.last_metrics)
        return aggregator

    def make_aggregator(self, global_state: AdapterState) -> Aggregator:
        """The strategy's own aggregator (without clipping)."""
        raise NotImplementedError

    def finish_round(self, global_state: AdapterState, aggregator: Aggregator) -> AdapterState:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint (server optimizer moments); empty for stateless strategies."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned."""


def unwrap(aggregator: Aggregator) -> Aggregator:
    """The innermost aggregator beneath wrappers (such as clipping) that expose ``inner``."""
    while hasattr(aggregator, "inner"):
        aggregator = aggregator.inner  # type: ignore[attr-defined]
    return aggregator


_REGISTRY: dict[str, Callable[[StrategyConfig], Strategy]] = {}


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator registering a strategy under a lowercase unique name."""

    def wrap(cls: type[Strategy]) -> type[Strategy]:
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_strategies() -> list[str]:
    """Registered strategy names."""
    return sorted(_REGISTRY)


def make_strategy(cfg: StrategyConfig) -> Strategy:
    """Instantiate the strategy that ``cfg.name`` names."""
    if cfg.name not in _REGISTRY:
        raise ConfigError("strategy.name", f"must be one of {', '.join(available_strategies())}; got {cfg.name!r}")
    return _REGISTRY[cfg.name](cfg)
