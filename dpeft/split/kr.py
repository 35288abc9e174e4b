"""Kill-and-Revive (DLoRA): train only the few LoRA modules whose factors move most.

The rule, with ``W = window``, ``k = max(1, round(budget * M))`` over ``M`` modules, and
``t`` the number of optimizer steps taken so far (checked after every step):

1. Every active module's factors ``theta_m = (A_m, B_m)`` are snapshotted when its window starts.
2. At every window boundary (``t % W == 0``):
   - each module that was active for the whole window gets a window score ``s_m``:
     ``score=change`` (the paper's): ``|| theta_m(t) - theta_m(t - W) ||_2``, the L2 norm of
     the change of A and B together over the window; ``score=relative``: that change divided
     by ``|| theta_m(t - W) ||_2`` (scale-free across module sizes); ``score=loss_drop``
     (gradient-based): ``sum over the window's steps of -g_m . (theta_m after - theta_m
     before)``, the first-order decrease of the training loss that the module's own updates
     bought (``g_m``: its clipped gradient at that step, recorded by :meth:`before_update`);
   - its running score is ``S_m = ema * S_m + (1 - ema) * s_m`` (``S_m = s_m`` the first
     time, and always when ``ema = 0``); a killed module keeps its last ``S_m``;
   - if ``revive_every > 0`` and ``t % revive_every == 0``, killed modules are **revived**:
     all of them when ``revive_count = 0``, else the ``revive_count`` killed modules with the
     highest ``S_m`` (``revive_order=score``) or the ones killed longest ago
     (``revive_order=oldest``; ties: lower index). They train for the next window, are
     scored, and compete at the next boundary;
   - otherwise, once ``t >= warmup`` (rounded up to a multiple of W) and more than ``k``
     modules are active, the ``k`` active modules with the largest ``S_m`` stay active (ties:
     lower module index first), the others are **killed**;
   - snapshots of the active modules restart.
3. A killed module is frozen and skipped on the edge: no gradient, no optimizer update, no
   forward or backward compute, no activation traffic. Its (frozen) factors are uploaded to
   the cloud once, which applies ``scaling * B A x`` itself, so killing changes neither the
   model function nor the exported adapter.

Hyperparameters: ``enabled``, ``budget``, ``window``, ``warmup``, ``revive_every``,
``revive_count``, ``revive_order``, ``score``, ``ema`` (see
:class:`dpeft.split.config.KillReviveConfig`). ``revive_count=0, score=change, ema=0`` is the
original rule (every killed module revived at once, last window's raw change).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dpeft.split.config import KillReviveConfig

SCORES = ("change", "relative", "loss_drop")
REVIVE_ORDERS = ("score", "oldest")


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


def pick_revived(killed: set[int], count: int, order: str, scores: dict[int, float], killed_at: dict[int, int]) -> list[int]:
    """Which killed modules come back: all (count 0 or >= len), else the ``count`` first by ``order``."""
    if count <= 0 or count >= len(killed):
        return sorted(killed)
    if order == "oldest":
        ranked = sorted(killed, key=lambda i: (killed_at.get(i, 0), i))
    else:
        ranked = sorted(killed, key=lambda i: (-scores.get(i, 0.0), i))
    return sorted(ranked[:count])


def window_score(now: torch.Tensor, snap: torch.Tensor, kind: str) -> float:
    """The module's score over one window: L2 change, or L2 change relative to the start."""
    change = float(torch.linalg.vector_norm(now - snap))
    if kind == "relative":
        return change / max(float(torch.linalg.vector_norm(snap)), 1e-12)
    return change


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
        #: running (EMA) score per module; killed modules keep theirs
        self.scores: dict[int, float] = {}
        #: step at which each currently killed module was killed
        self.killed_at: dict[int, int] = {}
        self.history: list[tuple[int, KRDecision]] = []
        #: loss_drop: (factors, gradient) of each active module before this step's update, and
        #: the sum of -g . delta over the current window
        self._pre: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._drop: dict[int, float] = {}
        self._restart(range(modules))

    def _flat(self, i: int) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in self.factors(i)])

    def _restart(self, modules) -> None:
        for i in modules:
            self._snap[i] = self._flat(i)
            self._full.add(i)
            self._drop[i] = 0.0

    def before_update(self) -> None:
        """Record the active modules' factors and gradients just before the optimizer step (``score=loss_drop``)."""
        if not self.cfg.enabled or self.cfg.score != "loss_drop":
            return
        self._pre = {}
        for i in self.active:
            ts = list(self.factors(i))
            grad = torch.cat(
                [(t.grad if t.grad is not None else torch.zeros_like(t)).detach().reshape(-1).to(torch.float64) for t in ts]
            )
            self._pre[i] = (self._flat(i), grad)

    def _window_score(self, i: int) -> float:
        if self.cfg.score == "loss_drop":
            return self._drop.get(i, 0.0)
        return window_score(self._flat(i), self._snap[i], self.cfg.score)

    def after_step(self, t: int) -> KRDecision:
        """Apply the rule after optimizer step ``t`` (1-based); returns what changed."""
        decision = KRDecision()
        cfg = self.cfg
        if not cfg.enabled:
            return decision
        for i, (before, grad) in self._pre.items():
            if i in self._drop:
                self._drop[i] += -float(torch.dot(grad, self._flat(i) - before))
        self._pre = {}
        if t % cfg.window:
            return decision
        scores = {i: self._window_score(i) for i in sorted(self.active) if i in self._full}
        decision.scores = scores
        self.last_scores = scores
        for i, s in scores.items():
            self.scores[i] = s if (i not in self.scores or not cfg.ema) else cfg.ema * self.scores[i] + (1.0 - cfg.ema) * s
        killed = set(range(self.modules)) - self.active
        if cfg.revive_every and t % cfg.revive_every == 0 and killed:
            decision.revived = pick_revived(killed, cfg.revive_count, cfg.revive_order, self.scores, self.killed_at)
            self.active |= set(decision.revived)
            for i in decision.revived:
                self.killed_at.pop(i, None)
        elif t >= self.warmup and len(self.active) > self.k:
            keep = select_active({i: self.scores.get(i, float("inf")) for i in self.active}, self.k)
            decision.killed = sorted(self.active - keep)
            self.active = keep
            for i in decision.killed:
                self.killed_at[i] = t
        self._full = set()
        self._snap = {}
        self._drop = {}
        self._restart(sorted(self.active))
        if decision.killed or decision.revived:
            self.history.append((t, decision))
        return decision

    # -- checkpoints -----------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able info): the active set, the window snapshots and the scores."""
        tensors = {f"snap/{i}": snap for i, snap in sorted(self._snap.items())}
        info = {
            "active": sorted(self.active),
            "full": sorted(self._full),
            "last_scores": {str(i): s for i, s in self.last_scores.items()},
            "scores": {str(i): s for i, s in self.scores.items()},
            "killed_at": {str(i): s for i, s in self.killed_at.items()},
            "drop": {str(i): s for i, s in self._drop.items()},
        }
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
        # states written before running scores existed: the last window's scores stand in
        self.scores = {int(i): float(s) for i, s in info.get("scores", info["last_scores"]).items()}
        self.killed_at = {int(i): int(s) for i, s in info.get("killed_at", {}).items()}
        self._drop = {int(i): float(s) for i, s in info.get("drop", {}).items()} or {i: 0.0 for i in self._full}
