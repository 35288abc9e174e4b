"""Sync policy template and registry (no I/O: the round engine feeds it events).

A policy answers the engine's questions: how many clients to sample (``sample_size``),
when a round may close (``round_closed``), when waiting is a failure (``timed_out``), what
to do with a task that never answers (``reassign_lost``: try again, or give up on it) and
with an update that arrives after its round closed (``late_updates``). ``asynchronous``
policies replace rounds with a continuous loop (see :mod:`dpeft_coordinator.async_engine`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from dpeft.config import RunConfig, SyncConfig
from dpeft.errors import ConfigError
from dpeft.plugins import replaces_same_definition
from dpeft.sync.staleness import KINDS, staleness_weight


class SyncPolicy:
    """Decides which sampled clients get tasks and when a round is closed."""

    name = "base"
    asynchronous = False
    #: a task lost after ``task_timeout_s`` is re-submitted (True) or given up (False)
    reassign_lost = False

    def __init__(self, cfg: SyncConfig, clients_per_round: int | None = None) -> None:
        self.cfg = cfg
        self.clients_per_round = clients_per_round

    def sample_size(self, clients_per_round: int, eligible: int) -> int:
        """How many clients to sample (and send tasks to) this round."""
        return min(clients_per_round, eligible)

    def tasks_for(self, sampled: list[int]) -> list[int]:
        """Clients that receive a task this round."""
        return list(sampled)

    def round_closed(self, arrived: int, expected: int, elapsed_s: float, lost: int = 0, min_updates: int = 1) -> bool:
        """True when the engine should stop waiting and aggregate."""
        raise NotImplementedError

    def wait_s(self, elapsed_s: float, poll_s: float = 0.2) -> float:
        """How long the engine may block for the next event: ``poll_s``, or less where the round
        can close by time before that (so a deadline is not overshot by a whole poll)."""
        return poll_s

    def timed_out(self, elapsed_s: float) -> bool:
        """True when waiting longer is a failure."""
        return elapsed_s > self.cfg.round_timeout_s

    @property
    def late_updates(self) -> str:
        """``drop`` or ``fold`` (aggregate an update that missed its round in a later one)."""
        return "drop"

    def staleness_weight(self, tau: int) -> float:
        """Weight multiplier of an update ``tau`` aggregation steps stale."""
        return staleness_weight(tau, self.cfg.staleness, self.cfg.staleness_a, self.cfg.staleness_b)


_REGISTRY: dict[str, Callable[..., SyncPolicy]] = {}


def register_policy(name: str) -> Callable[[type[SyncPolicy]], type[SyncPolicy]]:
    """Class decorator registering a policy under a lowercase unique name (``sync.name``).

    Registering the same class again (a reloaded module) replaces it; another class under a taken
    name is an error. A policy reads its settings from the ``sync:`` section."""
    if not name or name != name.strip().lower():
        raise ValueError(f"bad sync policy name {name!r} (lowercase, no surrounding spaces)")

    def wrap(cls: type[SyncPolicy]) -> type[SyncPolicy]:
        old = _REGISTRY.get(name)
        if old is not None and not replaces_same_definition(old, cls):
            raise ValueError(f"sync policy {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_policies() -> list[str]:
    """Registered policy names."""
    return sorted(_REGISTRY)


def make_policy(cfg: SyncConfig, clients_per_round: int | None = None) -> SyncPolicy:
    """Instantiate the policy ``cfg.name`` names."""
    return _REGISTRY[cfg.name](cfg, clients_per_round)


def check_coordinated(run_cfg: RunConfig) -> None:
    """Config error for a run whose updates meet without a coordinator (``aggregation=allreduce``)."""
    if run_cfg.aggregation == "allreduce":
        raise ConfigError(
            "aggregation",
            "allreduce sums the updates among the workers' process group, without a coordinator: run it with "
            "`dpeft simulate`, `dpeft ray` or `torchrun -m dpeft_launch.torchrun_allreduce` (see the documentation's 'All-reduce with torchrun' guide)",
        )


def deadline_sample_size(run_cfg: RunConfig) -> int:
    """Clients a deadline round samples: ceil(clients_per_round x over_selection), at most ``clients``."""
    return min(run_cfg.clients, math.ceil(run_cfg.clients_per_round * run_cfg.sync.over_selection - 1e-9))


def updates_per_step(run_cfg: RunConfig) -> int:
    """How many updates one aggregation step of the configured policy normally gets."""
    sync = run_cfg.sync
    if sync.name == "deadline":
        return sync.quorum if sync.quorum is not None else run_cfg.clients_per_round
    if sync.name == "async":
        return sync.buffer_size if sync.buffer_size is not None else run_cfg.clients_per_round
    return run_cfg.clients_per_round


def validate_run_sync(run_cfg: RunConfig) -> None:
    """Config errors (naming the key) for ``sync.*`` and the ``simulate.*`` heterogeneity keys."""
    s = run_cfg.sync
    if s.name not in _REGISTRY:
        raise ConfigError("sync.name", f"must be one of {', '.join(available_policies())}; got {s.name!r}")
    if s.task_timeout_s is not None and s.task_timeout_s <= 0:
        raise ConfigError("sync.task_timeout_s", f"must be > 0 or null, got {s.task_timeout_s}")
    if s.over_selection < 1.0:
        raise ConfigError("sync.over_selection", f"must be >= 1, got {s.over_selection}")
    if s.deadline_s <= 0:
        raise ConfigError("sync.deadline_s", f"must be > 0, got {s.deadline_s}")
    if s.late_updates not in ("drop", "fold"):
        raise ConfigError("sync.late_updates", f"must be one of drop, fold; got {s.late_updates!r}")
    if s.staleness not in KINDS:
        raise ConfigError("sync.staleness", f"must be one of {', '.join(KINDS)}; got {s.staleness!r}")
    for key, value in (("sync.staleness_a", s.staleness_a), ("sync.staleness_b", s.staleness_b)):
        if value < 0:
            raise ConfigError(key, f"must be >= 0, got {value}")
    if s.max_staleness < 0:
        raise ConfigError("sync.max_staleness", f"must be >= 0, got {s.max_staleness}")
    if s.quorum is not None:
        if s.quorum < 1:
            raise ConfigError("sync.quorum", f"must be >= 1, got {s.quorum}")
        if s.quorum > deadline_sample_size(run_cfg):
            raise ConfigError(
                "sync.quorum", f"{s.quorum} exceeds the {deadline_sample_size(run_cfg)} clients a deadline round samples"
            )
    if s.buffer_size is not None and s.buffer_size < 1:
        raise ConfigError("sync.buffer_size", f"must be >= 1, got {s.buffer_size}")
    if s.concurrency is not None:
        if s.concurrency < 1:
            raise ConfigError("sync.concurrency", f"must be >= 1, got {s.concurrency}")
        if s.concurrency > run_cfg.clients:
            raise ConfigError("sync.concurrency", f"{s.concurrency} tasks in flight but only {run_cfg.clients} clients")
    sim = run_cfg.simulate
    for i, f in enumerate(sim.speed_factors):
        if not f >= 1.0:
            raise ConfigError(f"simulate.speed_factors[{i}]", f"must be >= 1 (a slowdown), got {f}")
    if not 0.0 <= sim.dropout < 1.0:
        raise ConfigError("simulate.dropout", f"must be in [0, 1), got {sim.dropout}")
    for i, c in enumerate(sim.byzantine_clients):
        if not 0 <= c < run_cfg.clients:
            raise ConfigError(f"simulate.byzantine_clients[{i}]", f"client {c} is not in 0..{run_cfg.clients - 1}")
