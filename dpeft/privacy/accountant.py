"""Privacy accounting with Google's ``dp_accounting``: the epsilon of a run so far, and the noise a budget needs.

Central DP (user level). dpeft samples a seeded, fixed-size set of ``m`` clients out of ``N``
each round (:mod:`dpeft.rounds.sampling`): sampling *without replacement*. The accountant
composes one ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))`` per round with
the Renyi accountant under the replace-one neighbouring relation (the only relation that
sampling scheme is analysed under: the population size N is public, one client's data is
swapped for another's). Under replace-one the sum of updates clipped to ``C`` moves by up to
``2C`` when one client's update is swapped, so noise of standard deviation ``z * C`` is a
Gaussian mechanism of noise multiplier ``z / 2`` relative to that sensitivity.

``accountant: pld`` uses the privacy-loss-distribution accountant, which has no fixed-size
sampling: it composes the per-round Gaussian (noise multiplier ``z / 2``, the same replace-one
sensitivity) *without* amplification by sampling -- a valid upper bound, tight when every
client takes part in every round, loose otherwise.

Local DP-SGD (record level) samples each step's batch by Poisson sampling (every example of the
client with probability ``q = batch_size / n``, add-or-remove-one relation): a client's steps so
far compose ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``.

``dp_accounting`` is imported when a function runs, not with this module.
"""

from __future__ import annotations

import logging
import math
from typing import Any

#: noise multipliers tried by :func:`noise_for_epsilon` lie in [_LOW, _HIGH]
_LOW, _HIGH = 0.05, 500.0


def _quiet() -> Any:
    """``dp_accounting``, with absl's per-order convergence warnings silenced."""
    logging.getLogger("absl").setLevel(logging.ERROR)
    import dp_accounting

    return dp_accounting


def central_event(clients: int, per_round: int, noise_multiplier: float, rounds: int, accountant: str = "rdp") -> Any:
    """The ``DpEvent`` of ``rounds`` rounds of DP-FedAvg (see the module docstring)."""
    dpa = _quiet()
    gaussian = dpa.GaussianDpEvent(noise_multiplier / 2.0)
    if accountant == "pld":
        return dpa.SelfComposedDpEvent(gaussian, rounds)
    m = min(per_round, clients)
    return dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(clients, m, gaussian), rounds)


def _new_accountant(kind: str, replace_one: bool) -> Any:
    dpa = _quiet()
    if kind == "pld":
        from dp_accounting.pld import PLDAccountant

        return PLDAccountant()
    from dp_accounting.rdp import RdpAccountant

    relation = dpa.NeighboringRelation.REPLACE_ONE if replace_one else dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    return RdpAccountant(neighboring_relation=relation)


def central_epsilon(
    clients: int, per_round: int, noise_multiplier: float, rounds: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon after ``rounds`` DP-FedAvg rounds (0 rounds: 0; no noise: infinity)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = _new_accountant(accountant, replace_one=True)
    acc.compose(central_event(clients, per_round, noise_multiplier, rounds, accountant))
    return float(acc.get_epsilon(delta))


def local_epsilon(sample_rate: float, noise_multiplier: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of one client after ``steps`` DP-SGD steps with Poisson sampling rate ``sample_rate``."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    dpa = _quiet()
    acc = _new_accountant(accountant, replace_one=False)
    event = dpa.PoissonSampledDpEvent(min(sample_rate, 1.0), dpa.GaussianDpEvent(noise_multiplier))
    acc.compose(dpa.SelfComposedDpEvent(event, steps))
    return float(acc.get_epsilon(delta))


def noise_for_epsilon(
    target: float, clients: int, per_round: int, rounds: int, delta: float, accountant: str = "rdp", tol: float = 1e-3
) -> float:
    """The smallest noise multiplier (to relative ``tol``) whose ``rounds`` rounds stay within ``target`` epsilon.

    Epsilon falls as the noise grows: bracket it by doubling or halving from 1, then bisect on a
    log scale (small multipliers are slow to account, so the search starts in the middle). Raises
    ``ValueError`` when even the largest multiplier tried exceeds the budget."""

    def fits(z: float) -> bool:
        return central_epsilon(clients, per_round, z, rounds, delta, accountant) <= target

    lo = hi = 1.0
    if fits(hi):
        while True:
            lo = hi / 2
            if lo < _LOW:
                return hi
            if not fits(lo):
                break
            hi = lo
    else:
        while True:
            hi = lo * 2
            if hi > _HIGH:
                raise ValueError(f"epsilon {target} over {rounds} rounds needs a noise multiplier above {_HIGH}")
            if fits(hi):
                break
            lo = hi
    while hi / lo > 1.0 + tol:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi
