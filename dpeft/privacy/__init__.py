"""Differential privacy of federated runs: central DP-FedAvg and local DP-SGD, with their accounting.

:func:`make_privacy` gives the coordinator's privacy engine of a run config (None with
``privacy.mode: none``). Its hooks, called by every round driver that supports DP:

- ``stop_reason(round_num)``: why a round must not run (its release would exceed the budget), or None;
- ``hyperparams()``: what each task carries (the clip bound when clients clip);
- ``wrap(aggregator, round_num)``: the strategy's aggregator behind clipping and noise (central)
  or per-client accounting (local);
- ``close_round()``: charge the round to the accountant; the row's privacy fields
  (``epsilon``, ``delta``, ``noise_multiplier``, ``clip_norm``, ...);
- ``fields()``: those fields without charging anything (the round-0 row);
- ``state_dict()`` / ``load_state_dict()``: JSON state kept with each checkpoint.

Central DP's noise on an already summed aggregate (secure aggregation):
:meth:`dpeft.privacy.central.CentralDP.release`. Local DP-SGD training lives in
:mod:`dpeft.privacy.local_dp` (imports Opacus when it runs).
"""

from __future__ import annotations

from typing import Any, Protocol

from dpeft.config import RunConfig
from dpeft.strategies.aggregator import Aggregator


class Privacy(Protocol):
    """The coordinator's privacy hooks (see the module docstring)."""

    @property
    def epsilon(self) -> float: ...

    def stop_reason(self, round_num: int) -> str | None: ...

    def hyperparams(self) -> dict[str, Any]: ...

    def wrap(self, aggregator: Aggregator, round_num: int) -> Aggregator: ...

    def close_round(self) -> dict[str, Any]: ...

    def fields(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def make_privacy(cfg: RunConfig) -> Privacy | None:
    """The privacy engine of ``cfg`` (checked by :mod:`dpeft.config.privacy_checks`); None without DP."""
    mode = cfg.privacy.mode
    if mode == "central":
        from dpeft.privacy.central import CentralDP

        return CentralDP(cfg)
    if mode == "local":
        from dpeft.privacy.local_accounting import LocalDPLedger

        return LocalDPLedger(cfg)
    return None


__all__ = ["Privacy", "make_privacy"]
