"""Central (user-level) differential privacy: DP-FedAvg with fixed or adaptive clipping.

Each round every client's update is clipped to the L2 norm ``C`` (on the client, before it
leaves the worker, with ``privacy.clipping: client``; always again on the coordinator, which
bounds what a misbehaving client or a codec's rounding could add), the clipped updates are
summed with weight 1 each, Gaussian noise of standard deviation ``z * C`` is added to the sum
and the result is divided by a fixed denominator, the clients sampled per round (never by the
clients that replied, nor by example counts: both would leak and break the sensitivity bound).

Adaptive clipping (Andrew et al. 2021, "Differentially private learning with adaptive
clipping"): each client also contributes the bit ``norm <= C``; the noisy fraction of such bits
moves ``C`` geometrically towards ``privacy.target_quantile`` of the update norms,
``C <- C * exp(-clip_lr * (b - target_quantile))``. The count query is a second Gaussian
mechanism; its noise ``sigma_b = max(m / 20, 1.58 z)`` takes at most 10% of the budget, and the
update's noise multiplier grows to ``z_u = (z^-2 - (2 sigma_b)^-2)^-1/2`` so that the pair
composes to exactly one Gaussian mechanism of multiplier ``z``, which the accountant charges.

:meth:`CentralDP.release` is the one entry for the noise: it takes the *sum* of the round's
clipped, unit-weighted updates (and the sum of their clip bits), so a secure-aggregation
driver that only learns the sum calls it the same way :class:`DPAggregator` does.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
from collections import OrderedDict
from typing import Any

import torch

from dpeft.config import RunConfig
from dpeft.errors import ConfigError
from dpeft.privacy.accountant import central_epsilon, noise_for_epsilon
from dpeft.state import AdapterState
from dpeft.strategies.aggregator import Aggregator, ClientUpdate
from dpeft.strategies.clipping import clip_by_global_norm

#: environment variable holding the coordinator's noise secret (set: reproducible noise across fresh runs)
SECRET_ENV = "DPEFT_DP_NOISE_SECRET"
#: share of the privacy budget adaptive clipping may spend on the clip-bit count, at most
COUNT_SHARE = 0.1
#: metrics key of the bit ``norm <= clip`` a client that clipped its own update reports
UNCLIPPED_KEY = "dp_unclipped"
#: task hyperparameter telling a worker to clip its update to this norm (``privacy.clipping: client``)
CLIP_HP = "dp_clip"


def scaled(state: AdapterState, factor: float) -> AdapterState:
    """``state`` times ``factor`` (float64 arithmetic, dtypes kept)."""
    return AdapterState(OrderedDict((k, (t.double() * factor).to(t.dtype)) for k, t in state.items()), dict(state.meta))


class CentralDP:
    """Clip bound, noise and accounting of a DP-FedAvg run; checkpointed through :meth:`state_dict`."""

    def __init__(self, cfg: RunConfig) -> None:
        p = cfg.privacy
        self.cfg = p
        self.seed = cfg.seed
        self.clients = cfg.clients
        self.denominator = min(cfg.clients_per_round, cfg.clients)  # expected (= sampled) clients per round
        self.planned_rounds = cfg.rounds
        self.clip = float(p.clip_norm)
        if p.noise_multiplier is None:
            assert p.target_epsilon is not None  # privacy_checks requires one of them
            try:
                self.noise_multiplier = noise_for_epsilon(
                    p.target_epsilon, self.clients, self.denominator, cfg.rounds, p.delta, p.accountant
                )
            except ValueError as exc:
                raise ConfigError("privacy.target_epsilon", f"{exc}; raise it, or lower rounds or clients_per_round") from None
        else:
            self.noise_multiplier = float(p.noise_multiplier)
        z = self.noise_multiplier
        if p.adaptive_clipping:
            self.count_std = max(self.denominator / 20.0, z / (2.0 * math.sqrt(COUNT_SHARE)))
            self.update_multiplier = (z**-2 - (2.0 * self.count_std) ** -2) ** -0.5
        else:
            self.count_std = 0.0
            self.update_multiplier = z
        env = os.environ.get(SECRET_ENV)
        self.secret = env if env else secrets.token_hex(16)
        self.rounds_accounted = 0
        self.epsilon = 0.0
        self.last: dict[str, float] = {}

    # -- accounting ---------------------------------------------------------------
    def epsilon_after(self, rounds: int) -> float:
        """Epsilon once ``rounds`` rounds have been released."""
        p = self.cfg
        return central_epsilon(self.clients, self.denominator, self.noise_multiplier, rounds, p.delta, p.accountant)

    def stop_reason(self, round_num: int) -> str | None:
        """Why round ``round_num`` must not run (its release would exceed ``target_epsilon``); None: it may."""
        target = self.cfg.target_epsilon
        if target is None:
            return None
        after = self.epsilon_after(self.rounds_accounted + 1)
        if after <= target * (1 + 1e-9):
            return None
        return (
            f"privacy budget: round {round_num} would raise epsilon from {self.epsilon:.3f} to {after:.3f}, "
            f"above privacy.target_epsilon={target:g} (delta {self.cfg.delta:g}); stopped after round {round_num - 1}"
        )

    def fields(self) -> dict[str, Any]:
        """The privacy fields of a metrics row."""
        return {
            "epsilon": self.epsilon,
            "delta": self.cfg.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.last.get("clip_norm", self.clip),
        }

    # -- one round ----------------------------------------------------------------
    def hyperparams(self) -> dict[str, Any]:
        """What each task of the next round carries: the clip bound when clients clip."""
        return {CLIP_HP: self.clip} if self.cfg.clipping == "client" else {}

    def wrap(self, aggregator: Aggregator, round_num: int) -> Aggregator:
        """``aggregator`` behind clipping, unit weights and the noisy release of round ``round_num``."""
        return DPAggregator(aggregator, self, round_num)

    def noise_generator(self, round_num: int) -> torch.Generator:
        """The seeded generator of round ``round_num``'s noise (run seed, round, coordinator secret)."""
        digest = hashlib.sha256(f"dpeft-central-dp/{self.seed}/{round_num}/{self.secret}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))

    def release(self, summed: AdapterState, unclipped: float, round_num: int) -> AdapterState:
        """The noisy mean of round ``round_num``: ``(summed + N(0, (z_u C)^2)) / m``.

        ``summed``: the sum of the round's clipped updates, each with weight 1 (a secure
        aggregate's unmasked sum qualifies); ``unclipped``: how many of them had norm <= C
        before clipping (used by adaptive clipping only). Updates the clip bound for the next
        round and the round's metrics (:attr:`last`)."""
        gen = self.noise_generator(round_num)
        std = self.update_multiplier * self.clip
        # noise drawn in sorted-name order: the same draw whatever order the sum's tensors come in
        # (a plain aggregate and a secure aggregate's unmasked sum list them differently)
        noise = {k: torch.randn(summed[k].shape, generator=gen, dtype=torch.float64) * std for k in sorted(summed)}
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for k, t in summed.items():
            out[k] = ((t.double() + noise[k]) / self.denominator).to(t.dtype)
        self.last = {"clip_norm": self.clip, "dp_noise_std": std / self.denominator}
        if self.cfg.adaptive_clipping:
            noisy = float(unclipped) + float(torch.randn((), generator=gen, dtype=torch.float64)) * self.count_std
            fraction = noisy / self.denominator
            self.clip *= math.exp(-self.cfg.clip_lr * (fraction - self.cfg.target_quantile))
            self.last["dp_unclipped_fraction"] = fraction
        return AdapterState(out, dict(summed.meta))

    def close_round(self) -> dict[str, Any]:
        """Charge one released round to the accountant; the row's privacy fields."""
        self.rounds_accounted += 1
        self.epsilon = self.epsilon_after(self.rounds_accounted)
        fields = self.fields()
        fields.update({k: v for k, v in self.last.items() if k != "clip_norm"})
        self.last = {}
        return fields

    # -- checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON state: rounds charged, epsilon, the (adaptive) clip bound, the noise multiplier and secret."""
        return {
            "mode": "central",
            "rounds_accounted": self.rounds_accounted,
            "epsilon": self.epsilon,
            "clip": self.clip,
            "noise_multiplier": self.noise_multiplier,
            "secret": self.secret,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds_accounted = int(state["rounds_accounted"])
        self.epsilon = float(state["epsilon"])
        self.clip = float(state["clip"])
        self.noise_multiplier = float(state["noise_multiplier"])
        if not os.environ.get(SECRET_ENV):
            self.secret = str(state["secret"])


class DPAggregator(Aggregator):
    """Clips each update to the current bound and folds it with weight 1; :meth:`result` is the noisy mean."""

    def __init__(self, inner: Aggregator, dp: CentralDP, round_num: int) -> None:
        self.inner = inner
        self.dp = dp
        self.round_num = round_num
        self.unclipped = 0.0
        self._result: AdapterState | None = None

    def add(self, update: ClientUpdate) -> None:
        delta, norm = clip_by_global_norm(update.delta, self.dp.clip)
        reported = update.metrics.get(UNCLIPPED_KEY)
        bit = float(reported) if reported is not None and self.dp.cfg.clipping == "client" else float(norm <= self.dp.clip)
        self.inner.add(ClientUpdate(update.client_id, delta, 1, dict(update.metrics)))
        self.unclipped += 1.0 if bit >= 0.5 else 0.0

    @property
    def count(self) -> int:
        return self.inner.count

    def result(self) -> AdapterState:
        if self._result is None:  # noise drawn once, however often the strategy asks
            summed = scaled(self.inner.result(), float(self.inner.count))  # unit weights: mean * count = sum
            self._result = self.dp.release(summed, self.unclipped, self.round_num)
        return self._result


def clip_update(delta: AdapterState, hyperparams: dict[str, Any]) -> tuple[AdapterState, dict[str, float]]:
    """A worker's side of ``privacy.clipping: client``: ``delta`` clipped to the task's bound, and the clip bit."""
    bound = hyperparams.get(CLIP_HP)
    if bound is None:
        return delta, {}
    clipped, norm = clip_by_global_norm(delta, float(bound))
    return clipped, {UNCLIPPED_KEY: float(norm <= float(bound))}
