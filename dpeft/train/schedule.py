"""The learning rate of a local step: a pure function of (round, step), never of what ran before.

``train.lr_schedule`` is constant, linear or cosine, after ``train.warmup_steps`` of linear
warmup, over the span ``train.lr_schedule_scope`` names:

- ``run`` (the default): the whole run's local steps, ``rounds * local_steps``; a client's
  step ``s`` of round ``r`` is position ``(r - 1) * local_steps + s``, so every client's
  learning rate decays across rounds the way centralised fine-tuning's does (FlowerTune's
  recipe anneals the client lr over the rounds the same way), and warmup happens once;
- ``round``: one client's local steps of one round, warmup and decay again every round.

Because the rate depends only on the position, a re-run task, a restarted worker or another
launcher computes the same rates; no scheduler state travels or is saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dpeft.config import TrainConfig


@dataclass(frozen=True)
class LrSchedule:
    """Learning rates of a run's local steps."""

    kind: str  # constant | linear | cosine
    base_lr: float
    warmup: int
    scope: str  # run | round
    local_steps: int
    rounds: int

    @classmethod
    def from_config(cls, cfg: TrainConfig, rounds: int) -> LrSchedule:
        return cls(cfg.lr_schedule, cfg.lr, cfg.warmup_steps, cfg.lr_schedule_scope, cfg.local_steps, max(1, rounds))

    @property
    def is_constant(self) -> bool:
        """True when every step gets ``base_lr`` (the optimizer's own lr is left alone)."""
        return self.kind == "constant" and self.warmup == 0

    def span(self) -> int:
        """How many steps the schedule spans."""
        return self.local_steps if self.scope == "round" else self.local_steps * self.rounds

    def position(self, round_num: int, step: int) -> int:
        """Index of step ``step`` of round ``round_num`` (rounds count from 1) in the span."""
        if self.scope == "round":
            return step
        return max(round_num - 1, 0) * self.local_steps + step

    def lr(self, round_num: int, step: int) -> float:
        """The learning rate of local step ``step`` (from 0) of round ``round_num``."""
        t = self.position(round_num, step)
        if t < self.warmup:
            return self.base_lr * (t + 1) / self.warmup
        if self.kind == "constant":
            return self.base_lr
        progress = min(1.0, (t - self.warmup) / max(1, self.span() - self.warmup))
        if self.kind == "linear":
            return self.base_lr * (1.0 - progress)
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, round_num: int, step: int) -> None:
        """Set every parameter group of ``optimizer`` to this step's rate (no-op when constant)."""
        if self.is_constant:
            return
        lr = self.lr(round_num, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
