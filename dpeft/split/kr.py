"""Kill-and-Revive (DLoRA): keep only the LoRA modules whose factors still move.

The rule, with ``W = window``, ``k = max(1, round(budget * M))`` over ``M`` modules, and
``t`` the number of optimizer steps taken so far (checked after every step):

1. Every module's factors ``theta_m = (A_m, B_m)`` are snapshotted when its window starts.
2. At every window boundary (``t % W == 0``):
   - the score of each module that was active for the whole window is
     ``s_m = || theta_m(t) - theta_m(t - W) ||_2`` (L2 norm of the change of A and B
     together over the window);
   - if ``revive_every > 0`` and ``t % revive_every == 0``: every killed module is revived
     (it trains again and is scored at the end of the next window);
   - otherwise, once ``t >= warmup`` (warmup rounded up to a multiple of W) and more than
     ``k`` modules are active: the ``k`` active modules with the largest scores stay active
     (ties: lower module index first), the others are killed;
   - snapshots of the active modules restart.
3. A killed module is frozen and skipped on the edge: no gradient, no optimizer update, no
   forward or backward compute, no activation traffic. Its (frozen) factors are uploaded to
   the cloud once, which applies ``scaling * B A x`` itself, so killing changes neither the
   model function nor the exported adapter.

Hyperparameters: ``enabled``, ``budget``, ``window``, ``warmup``, ``revive_every``
(see :class:`dpeft.split.config.KillReviveConfig`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dpeft.split.config import KillReviveConfig


@dataclass
class KRDecision:
    """What changed at one step."""

    killed: list[int] = field(default_factory=list)
    revived: list[int] = field(default_factory=list)
    scores: dict[int, float] = field(default_factory=dict)


def active_budget(budget: float, modules: int) -> int:
    """k = max(1, round(budget * modules))."""
    return max(1, min(modules, int(round(budget * modules))))


def select_active(scores: dict[int, float], k: int) -> set[int]:
    """The k keys with the largest scores (ties: lower index first)."""
    ranked = sorted(scores, key=lambda i: (-scores[i], i))
    return set(ranked[:k])


class KillRevive:
    """Stateful Kill-and-Revive over ``modules`` LoRA modules; ``factors(i)`` gives module i's tensors."""

    def __init__(self, cfg: KillReviveConfig, modules: int, factors: Callable[[int], Sequence[torch.Tensor]]) -> None:
        self.cfg = cfg
        self.modules = modules
        self.factors = factors
        self.k = active_budget(cfg.budget, modules) if cfg.enabled else modules
        self.warmup = -(-cfg.warmup // cfg.window) * cfg.window
        self.active: set[int] = set(range(modules))
        self._snap: dict[int, torch.Tensor] = {}
        self._full: set[int] = set()
        self.last_scores: dict[int, float] = {}
        self.history: list[tuple[int, KRDecision]] = []
        self._restart(range(modules))

    def _flat(self, i: int) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in self.factors(i)])

    def _restart(self, modules) -> None:
        for i in modules:
            self._snap[i] = self._flat(i)
            self._full.add(i)

    def after_step(self, t: int) -> KRDecision:
        """Apply the rule after optimizer step ``t`` (1-based); returns what changed."""
        decision = KRDecision()
        if not self.cfg.enabled or t % self.cfg.window:
            return decision
        scores = {i: float(torch.linalg.vector_norm(self._flat(i) - self._snap[i])) for i in sorted(self.active) if i in self._full}
        decision.scores = scores
        self.last_scores = scores
        if self.cfg.revive_every and t % self.cfg.revive_every == 0:
            decision.revived = sorted(set(range(self.modules)) - self.active)
            self.active = set(range(self.modules))
        elif t >= self.warmup and len(self.active) > self.k:
            keep = select_active({i: scores.get(i, float("inf")) for i in self.active}, self.k)
            decision.killed = sorted(self.active - keep)
            self.active = keep
        self._full = set()
        self._snap = {}
        self._restart(sorted(self.active))
        if decision.killed or decision.revived:
            self.history.append((t, decision))
        return decision

    # -- checkpoints -----------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able info): the active set, the window snapshots and the last scores."""
        tensors = {f"snap/{i}": snap for i, snap in sorted(self._snap.items())}
        info = {"active": sorted(self.active), "full": sorted(self._full), "last_scores": {str(i): s for i, s in self.last_scores.items()}}
        return tensors, info

    def load_state_dict(self, tensors: dict[str, torch.Tensor], info: dict) -> None:
        """Restore what :meth:`state_dict` saved (module count and factor sizes must match)."""
        active = {int(i) for i in info["active"]}
        if not active <= set(range(self.modules)) or not active:
            raise ValueError("Kill-and-Revive state is for a different set of LoRA modules")
        snaps = {}
        for name, t in tensors.items():
            i = int(name.split("/", 1)[1])
            if i >= self.modules or t.shape != self._flat(i).shape:
                raise ValueError(f"Kill-and-Revive snapshot {name} does not fit this adapter")
            snaps[i] = t.to(torch.float64)
        self.active = active
        self._snap = snaps
        self._full = {int(i) for i in info["full"]}
        self.last_scores = {int(i): float(s) for i, s in info["last_scores"].items()}
