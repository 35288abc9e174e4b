"""Sync policies, staleness discounts, config validation and simulated heterogeneity (pure, fast)."""

from __future__ import annotations

import math

import pytest

from dpeft.config import SyncConfig
from dpeft.errors import ConfigError
from dpeft.sync import available_policies, make_policy, staleness_weight, updates_per_step
from dpeft.transport.base import TrainTask
from dpeft.validate import load_config
from dpeft_workers.simulate import Heterogeneity


def test_registry_names() -> None:
    # plug-ins loaded earlier in this test process (tests/test_plugins.py) may add their own names
    assert [n for n in available_policies() if not n.startswith("demo_")] == ["async", "deadline", "sync"]


@pytest.mark.parametrize(
    "kind,tau,a,b,want",
    [
        ("constant", 7, 0.5, 4, 1.0),
        ("polynomial", 0, 0.5, 4, 1.0),
        ("polynomial", 3, 0.5, 4, 0.5),
        ("polynomial", 1, 1.0, 4, 0.5),
        ("hinge", 4, 0.5, 4, 1.0),
        ("hinge", 6, 0.5, 4, 0.5),
        ("hinge", 14, 0.2, 4, 1 / 3),
    ],
)
def test_staleness_weights(kind, tau, a, b, want) -> None:
    assert staleness_weight(tau, kind, a, b) == pytest.approx(want)


def test_staleness_is_monotone_and_bounded() -> None:
    for kind in ("constant", "polynomial", "hinge"):
        ws = [staleness_weight(t, kind, 0.7, 2) for t in range(30)]
        assert all(0 < w <= 1 for w in ws)
        assert all(x >= y for x, y in zip(ws, ws[1:], strict=False))
    with pytest.raises(ValueError):
        staleness_weight(-1)


def test_sync_closes_only_when_all_arrived() -> None:
    p = make_policy(SyncConfig(), 4)
    assert p.sample_size(4, 10) == 4
    assert not p.round_closed(3, 4, 1e6, lost=1)
    assert p.round_closed(4, 4, 0.0)
    assert p.reassign_lost and not p.asynchronous
    assert p.timed_out(901.0) and not p.timed_out(899.0)


def test_deadline_quorum_deadline_and_minimum() -> None:
    p = make_policy(SyncConfig(name="deadline", over_selection=1.5, deadline_s=10.0), 4)
    assert p.sample_size(4, 100) == 6 and p.sample_size(4, 5) == 5
    assert p.round_closed(4, 6, 0.0)  # quorum = clients_per_round
    assert not p.round_closed(3, 6, 9.9)
    assert p.round_closed(3, 6, 10.0)  # deadline
    assert not p.round_closed(0, 6, 100.0)  # never aggregates nothing
    assert not p.round_closed(4, 6, 100.0, min_updates=5)  # Krum's 2f+3
    assert p.round_closed(2, 6, 1.0, lost=4)  # everyone answered or was given up
    assert not p.reassign_lost and p.late_updates == "drop"
    q = make_policy(SyncConfig(name="deadline", quorum=2, late_updates="fold"), 4)
    assert q.round_closed(2, 6, 0.0) and q.late_updates == "fold"


def test_async_defaults() -> None:
    p = make_policy(SyncConfig(name="async"), 3)
    assert p.asynchronous and p.buffer_size() == 3 and p.concurrency(100) == 6 and p.concurrency(4) == 4
    p = make_policy(SyncConfig(name="async", buffer_size=5, concurrency=2), 3)
    assert p.buffer_size() == 5 and p.concurrency(100) == 2


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["sync.name=nope"], "sync.name"),
        (["sync.over_selection=0.5"], "sync.over_selection"),
        (["sync.deadline_s=0"], "sync.deadline_s"),
        (["sync.name=deadline", "sync.quorum=7"], "sync.quorum"),
        (["sync.quorum=0"], "sync.quorum"),
        (["sync.late_updates=keep"], "sync.late_updates"),
        (["sync.staleness=exp"], "sync.staleness"),
        (["sync.staleness_a=-1"], "sync.staleness_a"),
        (["sync.max_staleness=-1"], "sync.max_staleness"),
        (["sync.buffer_size=0"], "sync.buffer_size"),
        (["sync.concurrency=11"], "sync.concurrency"),
        (["sync.task_timeout_s=0"], "sync.task_timeout_s"),
        (["simulate.speed_factors=[1, 0.5]"], "simulate.speed_factors[1]"),
        (["simulate.dropout=1"], "simulate.dropout"),
        (["simulate.byzantine_clients=[10]"], "simulate.byzantine_clients[0]"),
        (["strategy.name=fedavg", "strategy.options={mu: 1}"], "strategy.options.mu"),
        (["strategy.name=trimmed_mean", "strategy.options={beta: 0.7}"], "strategy.options.beta"),
        (["strategy.name=krum"], "clients_per_round"),
        (["strategy.name=krum", "clients_per_round=5", "sync.name=async", "sync.buffer_size=3"], "clients_per_round"),
        (["strategy.name=flexlora", "strategy.options={client_ranks: [4, 16]}"], "strategy.options.client_ranks"),
        (["strategy.name=flexlora", "strategy.options={rank: 4}"], "strategy.options.rank"),
        (["strategy.name=ffa_lora", "adapter.method=ia3"], "strategy.name"),
    ],
)
def test_bad_config_names_the_key(overrides, key) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key


def test_good_configs_load() -> None:
    load_config(None, ["strategy.name=krum", "clients_per_round=5"])
    load_config(None, ["strategy.name=flexlora", "adapter.r=16", "strategy.options={client_ranks: [4, 8, 16]}"])
    cfg = load_config(None, ["sync.name=deadline", "sync.quorum=5", "clients_per_round=4", "sync.over_selection=1.5"])
    assert updates_per_step(cfg) == 5
    cfg = load_config(None, ["sync.name=async", "simulate.speed_factors=[1, 2.5]", "simulate.dropout=0.1"])
    assert updates_per_step(cfg) == 4


def _task(round_num: int, client: int, **hp) -> TrainTask:
    return TrainTask("t", round_num, client, "b", 0, b"", hp)


def test_heterogeneity_speed_and_seeded_dropout() -> None:
    cfg = load_config(None, ["simulate.speed_factors=[1, 2, 4]", "simulate.dropout=0.25", "seed=3"])
    h = Heterogeneity(cfg)
    assert [h.speed_factor(c) for c in range(5)] == [1, 2, 4, 1, 2]
    assert h.delay_s(2, 1.5) == pytest.approx(4.5) and h.delay_s(0, 9.0) == 0.0
    draws = [h.drops(_task(r, c)) for r in range(1, 41) for c in range(10)]
    assert draws == [Heterogeneity(cfg).drops(_task(r, c)) for r in range(1, 41) for c in range(10)]  # reproducible
    rate = sum(draws) / len(draws)
    assert abs(rate - 0.25) < 4 * math.sqrt(0.25 * 0.75 / len(draws))
    # a re-assigned attempt is an independent draw
    again = [h.drops(_task(r, c, attempt=1)) for r in range(1, 41) for c in range(10)]
    assert again != draws
    assert not Heterogeneity(load_config(None, [])).drops(_task(1, 1))
