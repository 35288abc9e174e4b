"""Aggregation strategies: pure math plus small stateful classes, selected by name.

Importing this package registers the built-in strategies. ``make_strategy(cfg)`` builds one.
"""

from dpeft.strategies import fedavg as _fedavg  # noqa: F401  (registers)
from dpeft.strategies import fedavgm as _fedavgm  # noqa: F401  (registers)
from dpeft.strategies import fedopt as _fedopt  # noqa: F401  (registers)
from dpeft.strategies import fedprox as _fedprox  # noqa: F401  (registers)
from dpeft.strategies import fedsa_lora as _fedsa_lora  # noqa: F401  (registers)
from dpeft.strategies import ffa_lora as _ffa_lora  # noqa: F401  (registers)
from dpeft.strategies import flexlora as _flexlora  # noqa: F401  (registers)
from dpeft.strategies import flora as _flora  # noqa: F401  (registers)
from dpeft.strategies import hetlora as _hetlora  # noqa: F401  (registers)
from dpeft.strategies import lora_fair as _lora_fair  # noqa: F401  (registers)
from dpeft.strategies import robust as _robust_strategies  # noqa: F401  (registers)
from dpeft.strategies.base import (
    ClientUpdate,
    Strategy,
    StrategyOptions,
    available_strategies,
    make_strategy,
    register_strategy,
    registered_strategies,
    strategy_server_lr,
)

__all__ = [
    "ClientUpdate",
    "Strategy",
    "StrategyOptions",
    "available_strategies",
    "make_strategy",
    "register_strategy",
    "registered_strategies",
    "strategy_server_lr",
]
