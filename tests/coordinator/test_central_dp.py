"""Central DP-FedAvg in the round engine: clipping bounds every client's contribution, the
aggregate is a fixed-denominator mean with Gaussian noise of the expected size, the budget stops a
run cleanly, a derived noise multiplier meets the budget, and a resumed run continues epsilon."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from enginelib import Reply, lora_state, make_engine

from dpeft.privacy.accountant import central_epsilon
from dpeft.privacy.central import SECRET_ENV, CentralDP, DPAggregator, clip_update
from dpeft.rounds.checkpoint import latest_checkpoint
from dpeft.state import AdapterState
from dpeft.strategies import ClientUpdate
from dpeft.strategies.aggregate import StreamingWeightedMean
from dpeft.strategies.clipping import global_norm
from dpeft.validate import load_config

ALL = ["clients=10", "clients_per_round=10"]  # every client every round: epsilon is the plain Gaussian's (fast)


@pytest.fixture(autouse=True)
def _noise_secret(monkeypatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "test")  # reproducible noise


def central(overrides: list[str]) -> CentralDP:
    return CentralDP(load_config(None, ["privacy.mode=central", *overrides]))


def state(values: dict[str, torch.Tensor]) -> AdapterState:
    return AdapterState(OrderedDict(values))


def test_noise_has_the_expected_size_and_is_seeded() -> None:
    """Zero updates from 3 clients, denominator 5: each number of the result is N(0, (z C / 5)^2)."""
    dp = central(["clients=20", "clients_per_round=5", "privacy.noise_multiplier=2.0", "privacy.clip_norm=0.5"])
    template = state({"w": torch.zeros(200, 100)})
    results = []
    for round_num in (1, 1, 2):
        agg = DPAggregator(StreamingWeightedMean(template), dp, round_num)
        for c in range(3):
            agg.add(ClientUpdate(c, state({"w": torch.zeros(200, 100)}), 10 * (c + 1)))
        results.append(agg.result()["w"])
    out = results[0].double()
    expected = 2.0 * 0.5 / 5
    # 20000 draws: the sample std is within ~0.5% of the true one (1 sigma); mean within ~0.7% of it
    assert float(out.std()) == pytest.approx(expected, rel=0.03)
    assert abs(float(out.mean())) < 4 * expected / math.sqrt(out.numel())
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])  # seed + round


def test_clipping_bounds_each_client_and_weights_are_uniform() -> None:
    """Nearly no noise: m * result is the sum of the clipped updates, whatever num_examples says."""
    dp = central(
        ["clients=10", "clients_per_round=4", "privacy.noise_multiplier=1e-9", "privacy.clip_norm=1.0", "privacy.clipping=server"]
    )
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(50, generator=g) * s for s in (10.0, 0.1, 3.0)]
    agg = DPAggregator(StreamingWeightedMean(state({"w": torch.zeros(50)})), dp, 1)
    for c, (d, n) in enumerate(zip(deltas, (1, 1000, 7), strict=True)):
        agg.add(ClientUpdate(c, state({"w": d}), n))
    summed = agg.result()["w"].double() * 4
    clipped = [d.double() * min(1.0, 1.0 / float(d.norm())) for d in deltas]
    assert torch.allclose(summed, sum(clipped), atol=1e-5)
    assert all(float(c.norm()) <= 1.0 + 1e-6 for c in clipped)
    assert agg.unclipped == 1.0  # only the 0.1-scaled update was within the bound
    # the worker's side (privacy.clipping=client): clipped before it leaves, with its bit
    sent, bit = clip_update(state({"w": deltas[0]}), {"dp_clip": 1.0})
    assert global_norm(sent) == pytest.approx(1.0) and bit == {"dp_unclipped": 0.0}


def test_adaptive_clipping_splits_the_noise_and_tracks_the_quantile() -> None:
    dp = central(
        [
            *ALL,
            "privacy.noise_multiplier=0.5",
            "privacy.adaptive_clipping=true",
            "privacy.clip_norm=0.1",
            "privacy.target_quantile=0.5",
        ]
    )
    # count and update compose to one Gaussian of multiplier z: 1/z^2 = 1/z_u^2 + 1/(2 sigma_b)^2
    assert dp.noise_multiplier**-2 == pytest.approx(dp.update_multiplier**-2 + (2 * dp.count_std) ** -2)
    assert dp.update_multiplier > dp.noise_multiplier and (2 * dp.count_std) ** -2 <= 0.1 * dp.noise_multiplier**-2 + 1e-12
    engine, tr = make_engine_dp(
        [
            "rounds=6",
            *ALL,
            "privacy.noise_multiplier=0.5",
            "privacy.adaptive_clipping=true",
            "privacy.clip_norm=0.1",
            "privacy.clip_lr=1.0",
        ]
    )
    rows = engine.run(tr)
    # every update (+1 per number, norm ~10) is clipped: the bound grows towards the median norm
    clips = [r["clip_norm"] for r in rows[1:]]
    assert clips[-1] > 3 * clips[0] and all("dp_unclipped_fraction" in r for r in rows[1:])


def make_engine_dp(overrides: list[str], tmp=None, resume: bool = False):
    return make_engine(_TMP[0] if tmp is None else tmp, ["privacy.mode=central", *overrides], lambda t, s: Reply(), resume=resume)


_TMP: list = []


@pytest.fixture(autouse=True)
def _tmp(tmp_path) -> None:
    _TMP[:] = [tmp_path]


def test_target_epsilon_stops_before_the_round_that_would_exceed_it(capsys) -> None:
    z = 4.0
    budget = (central_epsilon(10, 10, z, 3, 1e-5) + central_epsilon(10, 10, z, 4, 1e-5)) / 2  # 3 rounds fit, 4 do not
    engine, tr = make_engine_dp(["rounds=10", *ALL, f"privacy.noise_multiplier={z}", f"privacy.target_epsilon={budget}"])
    rows = engine.run(tr)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all({"epsilon", "delta", "noise_multiplier", "clip_norm"} <= set(r) for r in rows)
    assert rows[3]["epsilon"] <= budget < central_epsilon(10, 10, z, 4, 1e-5)
    round_num, _, _, info = latest_checkpoint(engine.run_dir / "checkpoints")
    assert round_num == 3 and info["privacy"]["rounds_accounted"] == 3
    engine.metrics.print_summary(rows, t_start=0.0)
    assert "stopped early: privacy budget: round 4 would raise epsilon" in capsys.readouterr().err


def test_noise_multiplier_derived_from_the_budget() -> None:
    engine, tr = make_engine_dp(["rounds=3", *ALL, "privacy.target_epsilon=3"])
    z = engine.privacy.noise_multiplier
    assert central_epsilon(10, 10, z, 3, 1e-5) <= 3.0 < central_epsilon(10, 10, z * 0.99, 3, 1e-5)
    rows = engine.run(tr)
    assert rows[-1]["round"] == 3 and rows[-1]["epsilon"] == pytest.approx(3.0, rel=0.01)


def test_resume_continues_epsilon(tmp_path) -> None:
    base = [*ALL, "privacy.noise_multiplier=3", "privacy.adaptive_clipping=true"]
    first, tr = make_engine_dp(["rounds=2", *base], tmp=tmp_path)
    before = first.run(tr)
    resumed, tr = make_engine_dp(["rounds=4", *base], tmp=tmp_path, resume=True)
    assert resumed.privacy.rounds_accounted == 2 and resumed.privacy.clip == pytest.approx(first.privacy.clip)
    rows = resumed.run(tr)
    eps = [r["epsilon"] for r in rows]
    assert eps[2] == before[2]["epsilon"] and eps[3] == pytest.approx(central_epsilon(10, 10, 3.0, 3, 1e-5))
    assert eps == sorted(eps) and eps[4] > eps[3]


def test_ffa_lora_keeps_a_and_gets_noise_on_b() -> None:
    engine, tr = make_engine_dp(["rounds=1", *ALL, "strategy.name=ffa_lora", "privacy.noise_multiplier=1.0"])
    start = lora_state()
    engine.run(tr)
    out = engine.global_state
    for k in start.tensors:
        if "lora_A" in k:
            assert torch.equal(out[k], start[k])
        else:  # clipped mean + noise: not the unclipped +1 of every client
            assert not torch.allclose(out[k], start[k] + 1.0)


def test_fedadam_steps_on_the_noisy_mean() -> None:
    engine, tr = make_engine_dp(["rounds=2", *ALL, "strategy.name=fedadam", "privacy.noise_multiplier=1.0"])
    rows = engine.run(tr)
    assert rows[-1]["round"] == 2 and rows[-1]["epsilon"] > rows[1]["epsilon"] > 0
