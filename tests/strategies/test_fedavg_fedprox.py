"""FedAvg against hand-computed means, its properties, and FedProx."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategy_testlib import close, make, run_round, state, upd

from dpeft.state import AdapterState

floats = st.floats(min_value=-10, max_value=10, allow_nan=False, width=32)
vectors = st.lists(floats, min_size=1, max_size=6)


def test_fedavg_hand_computed() -> None:
    g = state(w=[1.0, 1.0], b=[0.0])
    ups = [upd(0, state(w=[1.0, 2.0], b=[4.0]), n=1), upd(1, state(w=[-1.0, 2.0], b=[0.0]), n=3)]
    # mean: w = [(1 - 3) / 4, (2 + 6) / 4] = [-0.5, 2.0]; b = 4 / 4 = 1
    new = run_round(make("fedavg", server_lr=0.5), g, ups)
    assert close(new["w"], torch.tensor([0.75, 2.0]))
    assert close(new["b"], torch.tensor([0.5]))
    assert list(new.tensors) == ["w", "b"]


def test_fedavg_keeps_meta_and_dtype() -> None:
    g = AdapterState({"w": torch.zeros(2, dtype=torch.float16)}, {"round": 3})
    new = run_round(make("fedavg"), g, [upd(0, AdapterState({"w": torch.ones(2, dtype=torch.float16)}))])
    assert new.meta == {"round": 3}
    assert new["w"].dtype == torch.float16


@settings(max_examples=30, deadline=None)
@given(vectors, st.integers(1, 5), st.lists(st.integers(1, 100), min_size=5, max_size=5))
def test_fedavg_of_identical_updates_is_the_update(values: list[float], n: int, counts: list[int]) -> None:
    g = state(w=[0.5] * len(values))
    d = state(w=values)
    new = run_round(make("fedavg"), g, [upd(i, d, counts[i]) for i in range(n)])
    assert close(new["w"], g["w"] + d["w"], 1e-5)


@settings(max_examples=30, deadline=None)
@given(st.lists(vectors.filter(lambda v: len(v) == 3), min_size=1, max_size=5), st.integers(1, 50))
def test_equal_weights_give_arithmetic_mean(rows: list[list[float]], n: int) -> None:
    g = state(w=[0.0, 0.0, 0.0])
    new = run_round(make("fedavg"), g, [upd(i, state(w=r), n) for i, r in enumerate(rows)])
    expected = torch.tensor(rows, dtype=torch.float64).mean(0)
    assert close(new["w"], expected, 1e-4)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(vectors.filter(lambda v: len(v) == 2), st.integers(1, 20)), min_size=1, max_size=5))
def test_weights_normalised(items: list[tuple[list[float], int]]) -> None:
    """The result is a convex combination: scaling every count changes nothing, weights sum to one."""
    g = state(w=[0.0, 0.0])
    a = run_round(make("fedavg"), g, [upd(i, state(w=v), n) for i, (v, n) in enumerate(items)])
    b = run_round(make("fedavg"), g, [upd(i, state(w=v), 7 * n) for i, (v, n) in enumerate(items)])
    assert close(a["w"], b["w"], 1e-5)
    ones = run_round(make("fedavg"), g, [upd(i, state(w=[1.0, 1.0]), n) for i, (_, n) in enumerate(items)])
    assert close(ones["w"], torch.ones(2), 1e-6)  # sum of normalised weights == 1


def test_zero_example_updates_are_ignored() -> None:
    g = state(w=[0.0])
    new = run_round(make("fedavg"), g, [upd(0, state(w=[2.0]), 2), upd(1, state(w=[100.0]), 0)])
    assert close(new["w"], torch.tensor([2.0]))


def test_fedprox_configures_mu_and_aggregates_like_fedavg() -> None:
    g = state(w=[1.0, -1.0])
    assert make("fedprox").configure_train(0, g) == {"prox_mu": 0.01}
    prox = make("fedprox", server_lr=0.7, mu=0.3)
    assert prox.configure_train(5, g) == {"prox_mu": 0.3}
    ups = [upd(0, state(w=[1.0, 0.0]), 2), upd(1, state(w=[0.0, 3.0]), 1)]
    assert close(run_round(prox, g, ups)["w"], run_round(make("fedavg", server_lr=0.7), g, ups)["w"])
    assert make("fedavg").configure_train(0, g) == {}
