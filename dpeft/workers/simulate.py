"""Simulated client heterogeneity for `dpeft simulate`: slow clients and dropped tasks.

``simulate.speed_factors`` (cycled over client ids) makes client ``c`` with factor ``f``
answer ``(f - 1) x compute time`` after it finished training; the worker process trains other
clients' tasks meanwhile, as separate devices would. ``simulate.dropout`` is the probability
that a task is dropped without a reply, drawn from (seed, round, client, attempt, dispatch),
so a run is reproducible and a re-assigned attempt is an independent draw.
"""

from __future__ import annotations

import numpy as np

from dpeft.config import RunConfig
from dpeft.transport.base import TrainTask


class Heterogeneity:
    """Per-client speed and dropout decisions of one run."""

    def __init__(self, cfg: RunConfig) -> None:
        self.seed = cfg.seed
        self.speed_factors = list(cfg.simulate.speed_factors)
        self.dropout = cfg.simulate.dropout

    def speed_factor(self, client_id: int) -> float:
        """The slowdown of ``client_id`` (1 = full speed)."""
        if not self.speed_factors:
            return 1.0
        return float(self.speed_factors[client_id % len(self.speed_factors)])

    def delay_s(self, client_id: int, compute_s: float) -> float:
        """Seconds to hold a finished update back."""
        return max(0.0, (self.speed_factor(client_id) - 1.0) * compute_s)

    def drops(self, task: TrainTask) -> bool:
        """Whether this task is dropped without a reply."""
        if self.dropout <= 0:
            return False
        hp = task.hyperparams
        key = [self.seed, task.round, task.client_id, int(hp.get("attempt", 0)), int(hp.get("task_seq", 0)), 0xD0]
        return bool(np.random.default_rng(key).random() < self.dropout)
