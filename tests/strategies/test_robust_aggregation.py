"""Median, trimmed mean, Krum/Multi-Krum: pure functions and strategies."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategy_testlib import close, make, run_round, state, upd

from dpeft.state import AdapterState
from dpeft.strategies.buffered import BufferedAggregator, flatten, unflatten
from dpeft.strategies.robust_rules import coordinate_median, krum, krum_scores, trimmed_mean

finite = st.floats(min_value=-100, max_value=100, allow_nan=False)


@st.composite
def matrices(draw, min_rows: int = 1, max_rows: int = 7):
    n = draw(st.integers(min_rows, max_rows))
    d = draw(st.integers(1, 4))
    rows = draw(st.lists(st.lists(finite, min_size=d, max_size=d), min_size=n, max_size=n))
    return [torch.tensor(r, dtype=torch.float64) for r in rows]


def test_median_hand_computed() -> None:
    vs = [torch.tensor([1.0, -2.0]), torch.tensor([5.0, 0.0]), torch.tensor([3.0, 9.0])]
    assert torch.equal(coordinate_median(vs), torch.tensor([3.0, 0.0], dtype=torch.float64))
    vs.append(torch.tensor([10.0, 1.0]))  # even count: mean of the middle two
    assert torch.equal(coordinate_median(vs), torch.tensor([4.0, 0.5], dtype=torch.float64))


@settings(max_examples=50, deadline=None)
@given(matrices(), st.randoms(use_true_random=False))
def test_median_permutation_invariant(vs: list[torch.Tensor], rnd) -> None:
    shuffled = list(vs)
    rnd.shuffle(shuffled)
    assert torch.equal(coordinate_median(vs), coordinate_median(shuffled))


def test_trimmed_mean_hand_computed() -> None:
    vs = [torch.tensor([float(x)]) for x in (1, 2, 3, 4, 100)]
    assert float(trimmed_mean(vs, 0.2)) == 3.0  # drops 1 and 100
    assert float(trimmed_mean(vs, 0.1)) == 22.0  # floor(0.5) = 0: plain mean
    with pytest.raises(ValueError):
        trimmed_mean(vs, 0.5)


@settings(max_examples=50, deadline=None)
@given(matrices())
def test_trimmed_mean_beta_zero_is_mean(vs: list[torch.Tensor]) -> None:
    assert close(trimmed_mean(vs, 0.0), torch.stack(vs).mean(0), 1e-9)


@settings(max_examples=30, deadline=None)
@given(matrices(min_rows=3), st.randoms(use_true_random=False))
def test_trimmed_mean_permutation_invariant_and_bounded(vs: list[torch.Tensor], rnd) -> None:
    shuffled = list(vs)
    rnd.shuffle(shuffled)
    t = trimmed_mean(vs, 0.25)
    assert close(t, trimmed_mean(shuffled, 0.25), 1e-9)
    x = torch.stack(vs)
    assert bool((t >= x.min(0).values - 1e-9).all() and (t <= x.max(0).values + 1e-9).all())


def _honest_and_one_attacker(seed: int, bad: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, generator=g, dtype=torch.float64)
    vs = [base + 0.05 * torch.randn(6, generator=g, dtype=torch.float64) for _ in range(5)]
    vs[bad] = vs[bad] * 100.0
    return vs


@pytest.mark.parametrize("seed, bad", [(0, 0), (1, 2), (2, 4), (3, 1)])
def test_krum_picks_honest_when_one_of_five_scaled(seed: int, bad: int) -> None:
    vs = _honest_and_one_attacker(seed, bad)
    chosen, mean = krum(vs, f=1)
    assert len(chosen) == 1 and chosen[0] != bad
    assert torch.equal(mean, vs[chosen[0]])
    chosen3, mean3 = krum(vs, f=1, m=3)
    assert bad not in chosen3 and len(chosen3) == 3
    assert close(mean3, torch.stack([vs[i] for i in chosen3]).mean(0), 1e-12)


def test_krum_scores_hand_computed() -> None:
    vs = [torch.tensor([float(x)]) for x in (0, 1, 2, 10, 11)]
    # f=1, n=5: each score sums the 2 smallest squared distances to others
    assert krum_scores(vs, 1).tolist() == [1 + 4, 1 + 1, 1 + 4, 1 + 64, 1 + 81]
    with pytest.raises(ValueError, match="2f\\+3"):
        krum(vs[:4], f=1)
    with pytest.raises(ValueError):
        krum(vs, f=1, m=6)


def test_buffered_aggregator_and_flatten_round_trip() -> None:
    g = AdapterState({"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([7.0], dtype=torch.float16)})
    v = flatten(g, list(g.tensors))
    assert v.dtype == torch.float64 and v.tolist() == [0, 1, 2, 3, 4, 5, 7]
    back = unflatten(v, g)
    assert torch.equal(back["a"], g["a"]) and back["b"].dtype == torch.float16
    seen = {}

    def reducer(vectors, weights, ids):
        seen.update(vectors=vectors, weights=weights, ids=ids)
        return vectors[0]

    agg = BufferedAggregator(g, reducer)
    agg.add(upd(4, g, 3))
    agg.add(upd(5, g, 0))  # no examples: skipped
    assert agg.count == 1
    assert torch.equal(agg.result()["a"], g["a"])
    assert seen["weights"] == [3.0] and seen["ids"] == [4]


def test_median_and_trimmed_strategies() -> None:
    g = state(w=[0.0, 0.0], b=[1.0])
    deltas = [([1.0, -1.0], [0.0]), ([2.0, 5.0], [3.0]), ([100.0, 0.0], [1.0])]
    ups = [upd(i, state(w=w, b=b), n=10 * (i + 1)) for i, (w, b) in enumerate(deltas)]
    med = run_round(make("median", server_lr=0.5), g, ups)
    assert close(med["w"], torch.tensor([1.0, 0.0])) and close(med["b"], torch.tensor([1.5]))
    tm = run_round(make("trimmed_mean", beta=0.34), g, ups)  # floor(1.02) = 1 per end: the median here
    assert close(tm["w"], torch.tensor([2.0, 0.0])) and close(tm["b"], torch.tensor([2.0]))


def test_krum_strategies_select_honest_clients() -> None:
    vs = _honest_and_one_attacker(5, 3)
    g = AdapterState({"x": torch.zeros(2, 3, dtype=torch.float64)})
    ups = [upd(100 + i, AdapterState({"x": v.reshape(2, 3)})) for i, v in enumerate(vs)]
    k = make("krum")
    new = run_round(k, g, ups)
    assert len(k.last_selected) == 1 and k.last_selected[0] != 103
    assert k.last_metrics["krum_client"] == k.last_selected[0]
    assert torch.equal(new["x"], vs[k.last_selected[0] - 100].reshape(2, 3))
    mk = make("multi_krum")  # default m = n - f = 4
    new = run_round(mk, g, ups)
    assert sorted(mk.last_selected) == [100, 101, 102, 104]
    assert close(new["x"], torch.stack([vs[i] for i in (0, 1, 2, 4)]).mean(0).reshape(2, 3), 1e-12)
    with pytest.raises(ValueError):
        run_round(make("multi_krum", m=6), g, ups)
