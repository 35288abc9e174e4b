"""Sync policy template and registry (no I/O: the round engine feeds it events)."""

from __future__ import annotations

from typing import Callable

from dpeft.config import SyncConfig


class SyncPolicy:
    """Decides which sampled clients get tasks and when a round is closed."""

    name = "base"

    def __init__(self, cfg: SyncConfig) -> None:
        self.cfg = cfg

    def tasks_for(self, sampled: list[int]) -> list[int]:
        """Clients that receive a task this round (over-selection policies add more)."""
        return list(sampled)

    def round_closed(self, arrived: int, expected: int, elapsed_s: float) -> bool:
        """True when the engine should stop waiting and aggregate."""
        raise NotImplementedError

    def timed_out(self, elapsed_s: float) -> bool:
        """True when waiting longer is a failure."""
        return elapsed_s > self.cfg.round_timeout_s


_REGISTRY: dict[str, Callable[[SyncConfig], SyncPolicy]] = {}


def register_policy(name: str) -> Callable[[type[SyncPolicy]], type[SyncPolicy]]:
    """Class decorator registering a policy under a lowercase unique name."""

    def wrap(cls: type[SyncPolicy]) -> type[SyncPolicy]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_policies() -> list[str]:
    """Registered policy names."""
    return sorted(_REGISTRY)


def make_policy(cfg: SyncConfig) -> SyncPolicy:
    """Instantiate the policy ``cfg.name`` names."""
    return _REGISTRY[cfg.name](cfg)
