"""The coordinator's view of local (record-level) DP-SGD: each client's epsilon so far.

Every DP-SGD update reports the Poisson sampling rate of its steps (``dp_sample_rate``) and how
many steps it took (``dp_steps``); the coordinator adds the steps up per client and composes
them with the accountant (:func:`dpeft.privacy.accountant.local_epsilon`). A row's ``epsilon``
is the largest epsilon of any client so far (the guarantee every client has at least);
``client_epsilon_max`` is the largest epsilon a worker reported for its task alone.
"""

from __future__ import annotations

from typing import Any

from dpeft.config import RunConfig
from dpeft.privacy.accountant import local_epsilon
from dpeft.state import AdapterState
from dpeft.strategies.aggregator import Aggregator, ClientUpdate

#: update metrics a DP-SGD worker reports
RATE_KEY, STEPS_KEY, TASK_EPSILON_KEY = "dp_sample_rate", "dp_steps", "dp_task_epsilon"


class LocalDPLedger:
    """Per-client DP-SGD steps and epsilon; checkpointed through :meth:`state_dict`."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg.privacy
        assert self.cfg.noise_multiplier is not None  # privacy_checks requires it in local mode
        self.noise_multiplier = float(self.cfg.noise_multiplier)
        self.steps: dict[int, int] = {}
        self.rates: dict[int, float] = {}
        self.epsilons: dict[int, float] = {}
        self._round: list[ClientUpdate] = []

    def hyperparams(self) -> dict[str, Any]:
        return {}

    def stop_reason(self, round_num: int) -> str | None:
        return None

    def wrap(self, aggregator: Aggregator, round_num: int) -> Aggregator:
        self._round = []
        return _Observer(aggregator, self._round)

    @property
    def epsilon(self) -> float:
        return max(self.epsilons.values(), default=0.0)

    def fields(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "delta": self.cfg.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.cfg.clip_norm,
        }

    def close_round(self) -> dict[str, Any]:
        task_eps = []
        for u in self._round:
            c = u.client_id
            self.steps[c] = self.steps.get(c, 0) + int(u.metrics.get(STEPS_KEY, 0))
            self.rates[c] = float(u.metrics.get(RATE_KEY, 1.0))
            self.epsilons[c] = local_epsilon(
                self.rates[c], self.noise_multiplier, self.steps[c], self.cfg.delta, self.cfg.accountant
            )
            if TASK_EPSILON_KEY in u.metrics:
                task_eps.append(float(u.metrics[TASK_EPSILON_KEY]))
        self._round = []
        fields = self.fields()
        if task_eps:
            fields["client_epsilon_max"] = max(task_eps)
        return fields

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": "local",
            "clients": {str(c): [self.steps[c], self.rates[c], self.epsilons[c]] for c in self.steps},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for c, (steps, rate, eps) in state.get("clients", {}).items():
            self.steps[int(c)], self.rates[int(c)], self.epsilons[int(c)] = int(steps), float(rate), float(eps)


class _Observer(Aggregator):
    """Passes updates through to ``inner``, keeping them for the round's accounting."""

    def __init__(self, inner: Aggregator, seen: list[ClientUpdate]) -> None:
        self.inner = inner
        self.seen = seen

    def add(self, update: ClientUpdate) -> None:
        self.inner.add(update)
        self.seen.append(ClientUpdate(update.client_id, AdapterState(), update.num_examples, dict(update.metrics)))

    @property
    def count(self) -> int:
        return self.inner.count

    def result(self) -> AdapterState:
        return self.inner.result()
