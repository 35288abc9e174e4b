"""dpeft: distributed and federated parameter-efficient fine-tuning.

The Python API, in one namespace::

    import dpeft

    cfg = dpeft.load_config("run.yaml", overrides=["rounds=3"])
    result = dpeft.simulate(cfg)        # a RunResult: rows, adapter, export_path, run_dir, ...

Configs: :class:`RunConfig` (and its sections), :func:`load_config`. Runs: :func:`simulate`,
:func:`serve` (a coordinator for remote workers), :func:`run_worker`, returning a
:class:`RunResult`. Plug-ins: :func:`register_strategy`, :func:`register_policy`,
:func:`register_codec`, :func:`register_dataset`, :func:`register_loss` with typed options
declared by :func:`option`; :func:`load_plugins` imports plug-in modules. Exported adapters:
:func:`load_adapter` applies an adapter directory (dpeft's own methods or a peft one) to a base model.

Every name is imported on first use (PEP 562), so ``import dpeft`` stays cheap and imports
neither torch nor the services. The run functions live in the launch service
(``dpeft_launch.api``): this package's namespace is a facade over it, resolved by name at call
time. This is the one place where the library refers to a service; no module under ``dpeft/``
imports one (the import-linter contracts in pyproject.toml check the static imports, and
tests/test_python_api.py checks that this facade is the only reference).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # configs
    "RunConfig": "dpeft.config",
    "ModelConfig": "dpeft.config",
    "AdapterConfig": "dpeft.config",
    "DataConfig": "dpeft.config",
    "TrainConfig": "dpeft.config",
    "StrategyConfig": "dpeft.config",
    "SyncConfig": "dpeft.config",
    "SimulateConfig": "dpeft.config",
    "dump_config": "dpeft.config",
    "load_config": "dpeft.validate",
    "config_from_dict": "dpeft.validate",
    # errors
    "DpeftError": "dpeft.errors",
    "ConfigError": "dpeft.errors",
    "DataError": "dpeft.errors",
    # plug-ins
    "option": "dpeft.config.options",
    "load_plugins": "dpeft.plugins",
    "Strategy": "dpeft.strategies.base",
    "StrategyOptions": "dpeft.strategies.base",
    "register_strategy": "dpeft.strategies.base",
    "SyncPolicy": "dpeft.sync.base",
    "register_policy": "dpeft.sync.base",
    "UpdateCodec": "dpeft.codec.updates.base",
    "register_codec": "dpeft.codec.updates.registry",
    "TextDataset": "dpeft.data.datasets",
    "register_dataset": "dpeft.data.loaders",
    "LossContext": "dpeft.train.losses",
    "register_loss": "dpeft.train.losses",
    "AdapterState": "dpeft.state",
    "load_adapter": "dpeft.adapters",
    # runs (the launch service; see the module docstring)
    "RunResult": "dpeft_launch.api",
    "simulate": "dpeft_launch.api",
    "serve": "dpeft_launch.api",
    "run_worker": "dpeft_launch.api",
}

__all__ = [
    "AdapterConfig",
    "AdapterState",
    "ConfigError",
    "DataConfig",
    "DataError",
    "DpeftError",
    "LossContext",
    "ModelConfig",
    "RunConfig",
    "RunResult",
    "SimulateConfig",
    "Strategy",
    "StrategyConfig",
    "StrategyOptions",
    "SyncConfig",
    "SyncPolicy",
    "TextDataset",
    "TrainConfig",
    "UpdateCodec",
    "config_from_dict",
    "dump_config",
    "load_adapter",
    "load_config",
    "load_plugins",
    "option",
    "register_codec",
    "register_dataset",
    "register_loss",
    "register_policy",
    "register_strategy",
    "run_worker",
    "serve",
    "simulate",
]

if TYPE_CHECKING:  # static types of the library names (the run functions resolve at run time)
    from dpeft.adapters import load_adapter
    from dpeft.codec.updates.base import UpdateCodec
    from dpeft.codec.updates.registry import register_codec
    from dpeft.config import (
        AdapterConfig,
        DataConfig,
        ModelConfig,
        RunConfig,
        SimulateConfig,
        StrategyConfig,
        SyncConfig,
        TrainConfig,
        dump_config,
    )
    from dpeft.config.options import option
    from dpeft.data.datasets import TextDataset
    from dpeft.data.loaders import register_dataset
    from dpeft.errors import ConfigError, DataError, DpeftError
    from dpeft.plugins import load_plugins
    from dpeft.state import AdapterState
    from dpeft.strategies.base import Strategy, StrategyOptions, register_strategy
    from dpeft.sync.base import SyncPolicy, register_policy
    from dpeft.train.losses import LossContext, register_loss
    from dpeft.validate import config_from_dict, load_config


def __getattr__(name: str) -> Any:
    """Import the module that defines public ``name`` on first use, and cache the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dpeft' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("dpeft_"):
            raise AttributeError(
                f"dpeft.{name} needs the dpeft services ({exc.name}), which are not installed with this copy of dpeft"
            ) from exc
        raise
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
