"""Strategy template and registry.

The round engine calls, per round: ``configure_train`` (extra hyperparameters for the
sampled clients), ``begin_round`` (a fresh streaming aggregator), ``aggregator.add`` once
per accepted update as it arrives, and ``finish_round`` (server optimizer step producing
the next global adapter). Strategies never do I/O. ``state_dict``/``load_state_dict`` let
checkpoints carry optimizer moments.

Subclasses implement ``make_aggregator``; ``begin_round`` wraps it with update-norm clipping
when ``strategy.options.clip_norm`` is set, so clipping works with every strategy. Each
strategy is registered with a typed options dataclass (``register_strategy(name, options)``,
fields with a default, a help and a range; subclasses of a parent's options add fields), parsed
from ``strategy.options`` when the strategy is built: unknown or bad options are config errors
naming ``strategy.options.<key>``. ``validate_run`` checks the strategy against the rest of the
run config when the config is loaded.
``client_state`` is what a given client should be sent (the global, unless a strategy
such as flexlora re-factors it per client). ``last_metrics`` holds the last round's
strategy metrics (clipping counts, truncation errors, selected clients, ...).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from dpeft.config import RunConfig, StrategyConfig
from dpeft.config.options import option, option_help, parse_options
from dpeft.errors import ConfigError
from dpeft.plugins import replaces_same_definition
from dpeft.state import AdapterState
from dpeft.strategies.aggregator import Aggregator, ClientUpdate, unwrap
from dpeft.strategies.clipping import ClippingAggregator


@dataclass(kw_only=True)
class StrategyOptions:
    """Options every strategy takes."""

    clip_norm: float | None = option(
        None, "clip each client delta to this global L2 norm before aggregation (null = no clipping; not with flexlora)", low=0.0, low_open=True
    )


def option_key(key: str) -> str:
    """The dotted config key an error about strategy option ``key`` names."""
    return f"strategy.options.{key}"


class Strategy:
    """Base class: FedAvg-shaped hooks; subclasses override what differs."""

    name = "base"
    options_cls: type[StrategyOptions] = StrategyOptions
    #: whether updates fold into a StreamingWeightedMean (what all-reduce rounds can sum across ranks)
    streaming_mean = False
    #: the server step size when ``strategy.server_lr`` is null
    default_server_lr = 1.0

    def __init__(self, cfg: StrategyConfig) -> None:
        self.cfg = cfg
        self.opts = parse_options(self.options_cls, cfg.options, "strategy.options", f"strategy {self.name!r}")
        #: ``strategy.server_lr``, or this strategy's default when it is null
        self.server_lr = float(cfg.server_lr) if cfg.server_lr is not None else self.default_server_lr
        self.last_metrics: dict[str, float] = {}
        self.clip_norm = self.opts.clip_norm

    @classmethod
    def known_options(cls) -> dict[str, str]:
        """Option name -> help."""
        return option_help(cls.options_cls)

    def configure_train(self, round_num: int, global_state: AdapterState) -> dict[str, Any]:
        """Extra hyperparameters sent with each TrainTask this round."""
        return {}

    def client_state(self, global_state: AdapterState, client_id: int) -> AdapterState:
        """The adapter state client ``client_id`` starts from (the global by default)."""
        return global_state

    def client_key(self, client_id: int) -> Hashable:
        """Clients with equal keys get the same ``client_state`` (the engine encodes one payload per key)."""
        return None

    def validate_run(self, run_cfg: RunConfig) -> None:
        """Checks against the rest of the run config, called when a config is loaded."""

    def min_updates(self) -> int:
        """Fewest updates ``finish_round`` can aggregate (a deadline round waits for at least this many)."""
        return 1

    def begin_round(self, global_state: AdapterState) -> Aggregator:
        """A fresh aggregator for this round, clipping update norms when ``clip_norm`` is set."""
        self.last_metrics = {}
        aggregator = self.make_aggregator(global_state)
        if self.clip_norm is not None:
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


class Registered(NamedTuple):
    """A registered strategy: its class and its options dataclass."""

    cls: type[Strategy]
    options: type[StrategyOptions]


_REGISTRY: dict[str, Registered] = {}


def register_strategy(name: str, options: type[StrategyOptions] | None = None):  # noqa: ANN201 - a class decorator
    """Class decorator registering a strategy under a lowercase unique name with its options
    dataclass (default: the parent class's). Registering the same class again (a reloaded module,
    a notebook cell run twice) replaces it; another class under a taken name is an error."""
    if not name or name != name.strip().lower():
        raise ValueError(f"bad strategy name {name!r} (lowercase, no surrounding spaces)")

    def wrap(cls: type[Strategy]) -> type[Strategy]:
        if name in _REGISTRY and not replaces_same_definition(_REGISTRY[name].cls, cls):
            raise ValueError(f"strategy {name!r} registered twice")
        cls.name = name
        if options is not None:
            cls.options_cls = options
        _REGISTRY[name] = Registered(cls, cls.options_cls)
        return cls

    return wrap


def available_strategies() -> list[str]:
    """Registered strategy names."""
    return sorted(_REGISTRY)


def registered_strategies() -> dict[str, Registered]:
    """Name -> (class, options dataclass) of every registered strategy."""
    return dict(_REGISTRY)


def strategy_server_lr(cfg: StrategyConfig) -> float:
    """The server step size a run uses: ``strategy.server_lr``, or the strategy's default when null."""
    if cfg.server_lr is not None:
        return float(cfg.server_lr)
    entry = _REGISTRY.get(cfg.name)
    return entry.cls.default_server_lr if entry is not None else Strategy.default_server_lr


def make_strategy(cfg: StrategyConfig) -> Strategy:
    """Instantiate the strategy that ``cfg.name`` names."""
    if cfg.name not in _REGISTRY:
        raise ConfigError("strategy.name", f"must be one of {', '.join(available_strategies())}; got {cfg.name!r}")
    return _REGISTRY[cfg.name].cls(cfg)


__all__ = ["Aggregator", "ClientUpdate", "Registered", "Strategy", "StrategyOptions", "available_strategies",
           "make_strategy", "option_key", "register_strategy", "registered_strategies", "strategy_server_lr", "unwrap"]  # fmt: skip
