"""Checks of the ``tracking:`` section: a switch that is on needs its package installed."""

from __future__ import annotations

import importlib.util

from dpeft.config.schema import RunConfig
from dpeft.errors import ConfigError

#: the package each switch needs (import name, the name to install)
NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}


def check_tracking(cfg: RunConfig) -> None:
    """A ConfigError naming the switch when it is on and its package is not installed."""
    t = cfg.tracking
    for key, (module, dist) in NEEDS.items():
        if getattr(t, key) and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"tracking.{key}", f"needs the {dist} package: pip install 'dpeft[tracking]' (or set tracking.{key}=false)"
            )
    if t.mlflow and not t.experiment.strip():
        raise ConfigError("tracking.experiment", "must not be empty")


def tracking_enabled(cfg: RunConfig | None) -> bool:
    return cfg is not None and (cfg.tracking.tensorboard or cfg.tracking.mlflow)
