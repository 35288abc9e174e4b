"""The accountant's epsilon: dp_accounting's own value for the same events, an independent direct
computation of the Gaussian mechanism (Balle & Wang 2018), and the noise derived from a budget."""

from __future__ import annotations

import math

import dp_accounting as dpa
import pytest
from dp_accounting.rdp import RdpAccountant

from dpeft.privacy.accountant import central_epsilon, local_epsilon, noise_for_epsilon


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with sensitivity / sigma = mu at ``delta`` (Balle & Wang
    2018, Theorem 8: delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)), by bisection."""

    def delta_of(eps: float) -> float:
        return _phi(mu / 2 - eps / mu) - math.exp(eps) * _phi(-mu / 2 - eps / mu)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def test_rdp_matches_dp_accountings_own_composition() -> None:
    """100 clients, 10 a round, z=2, 20 rounds: the same number as composing the events by hand."""
    acc = RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(100, 10, dpa.GaussianDpEvent(1.0)), 20))
    assert central_epsilon(100, 10, 2.0, 20, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    # sampling amplifies: fewer clients per round, smaller epsilon; more rounds, larger
    assert (
        central_epsilon(100, 5, 2.0, 20, 1e-5) < central_epsilon(100, 10, 2.0, 20, 1e-5) < central_epsilon(100, 10, 2.0, 40, 1e-5)
    )


@pytest.mark.parametrize(("z", "rounds"), [(2.0, 1), (4.0, 10)])
def test_every_client_every_round_is_the_gaussian_mechanism(z: float, rounds: int) -> None:
    """All clients in every round: T Gaussian releases of the replace-one sensitivity 2C with noise zC,
    i.e. one Gaussian of mu = 2 sqrt(T) / z. PLD gives its exact epsilon (to discretisation); RDP an
    upper bound no worse than the classic conversion min_a T a / (2 (z/2)^2) + log(1/delta) / (a - 1)."""
    delta = 1e-5
    exact = analytic_gaussian_epsilon(2.0 * math.sqrt(rounds) / z, delta)
    pld = central_epsilon(10, 10, z, rounds, delta, accountant="pld")
    rdp = central_epsilon(10, 10, z, rounds, delta, accountant="rdp")
    assert pld == pytest.approx(exact, rel=0.01)
    classic = min(rounds * a / (2 * (z / 2) ** 2) + math.log(1 / delta) / (a - 1) for a in [1 + x / 10 for x in range(1, 2000)])
    assert exact * 0.999 <= rdp <= classic


def test_local_epsilon_is_the_poisson_subsampled_gaussian() -> None:
    acc = RdpAccountant()
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.05, dpa.GaussianDpEvent(1.1)), 300))
    assert local_epsilon(0.05, 1.1, 300, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert local_epsilon(0.05, 1.1, 0, 1e-5) == 0.0


def test_noise_for_epsilon_is_the_smallest_within_budget() -> None:
    z = noise_for_epsilon(3.0, 10, 10, 5, 1e-5)
    assert central_epsilon(10, 10, z, 5, 1e-5) <= 3.0 < central_epsilon(10, 10, z * 0.99, 5, 1e-5)
    with pytest.raises(ValueError, match="noise multiplier above"):
        noise_for_epsilon(1e-3, 10, 10, 1000, 1e-9)
