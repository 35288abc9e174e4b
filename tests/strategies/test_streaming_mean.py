"""StreamingWeightedMean: order independence, the blocked cast-and-add path, the float32 accumulator."""

from __future__ import annotations

import itertools
from collections import OrderedDict

import pytest
import torch
from strategy_testlib import make

import dpeft.strategies.aggregate as aggregate
from dpeft.errors import ConfigError, RejectedUpdate
from dpeft.state import AdapterState
from dpeft.strategies.aggregate import BLOCK, StreamingWeightedMean
from dpeft.strategies.base import ClientUpdate

# sizes around the block: below it (one plain add_), a multiple of it, and ragged tails
SHAPES = {"small": (7, 5), "one_block": (BLOCK,), "ragged": (2 * BLOCK + 13,), "matrix": (300, 700)}


def _updates(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        tensors = OrderedDict((k, (torch.randn(s, generator=g) * 10 ** (i % 3)).to(dtype)) for k, s in SHAPES.items())
        out.append(ClientUpdate(i, AdapterState(tensors), num_examples=1 + 37 * i % 101))
    return out


def _template() -> AdapterState:
    return AdapterState(OrderedDict((k, torch.zeros(s)) for k, s in SHAPES.items()))


def _fold(updates: list[ClientUpdate], dtype: torch.dtype = torch.float64) -> StreamingWeightedMean:
    agg = StreamingWeightedMean(_template(), dtype=dtype)
    for u in updates:
        agg.add(u)
    return agg


def _reference_sum(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    """sum_i n_i * delta_i, every product and partial sum in float64 (products of fp32 values and small ints are exact)."""
    return {k: torch.stack([u.delta[k].double() * float(u.num_examples) for u in updates]).sum(0) for k in SHAPES}


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_arrival_order_does_not_change_the_float64_sum() -> None:
    updates = _updates(5)
    ref = _reference_sum(updates)
    results = []
    for order in itertools.islice(itertools.permutations(range(5)), 0, 120, 17):  # 8 orders
        agg = _fold([updates[i] for i in order])
        assert agg.total_weight == sum(u.num_examples for u in updates)
        for k in SHAPES:
            assert agg._sum[k].dtype == torch.float64
            assert _max_rel(agg._sum[k], ref[k]) < 1e-12
        results.append(agg.result())
    first = results[0]
    for r in results[1:]:
        for k in SHAPES:
            # the fp32 means of sums equal to 1e-12 agree up to fp32 rounding (nearly always bit for bit)
            assert r[k].dtype == torch.float32
            assert _max_rel(r[k].double(), first[k].double()) < 1e-6


def test_blocked_fold_is_bit_identical_to_mixed_dtype_add() -> None:
    updates = _updates(4, seed=1) + _updates(2, seed=2, dtype=torch.bfloat16)
    agg = _fold(updates)
    for k, acc in agg._sum.items():
        expected = torch.zeros(SHAPES[k], dtype=torch.float64)
        for u in updates:
            expected.add_(u.delta[k], alpha=float(u.num_examples))  # torch casts the whole tensor, then adds
        assert torch.equal(acc, expected), k
    out = agg.result()
    for k, acc in agg._sum.items():
        assert torch.equal(out[k], (acc / agg.total_weight).to(torch.float32)), k


def test_float64_template_divides_in_place() -> None:
    tmpl = AdapterState({"w": torch.zeros(BLOCK + 3, dtype=torch.float64)})
    agg = StreamingWeightedMean(tmpl)
    x = torch.randn(BLOCK + 3, dtype=torch.float64)
    agg.add(ClientUpdate(0, AdapterState({"w": x}), 3))
    agg.add(ClientUpdate(1, AdapterState({"w": -x}), 1))
    out = agg.result()
    assert out["w"].dtype == torch.float64
    assert torch.equal(out["w"], (3 * x - x) / 4)


def test_release_every_few_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """A spooled update is asked to give its pages back while a large tensor is folded, and after it."""
    monkeypatch.setattr(aggregate, "_RELEASE_EVERY", 1000)
    released: list[str] = []

    class Spooled(AdapterState):
        def release(self, name: str) -> None:
            released.append(name)

    x = torch.randn(2500)
    agg = StreamingWeightedMean(AdapterState({"big": torch.zeros(2500), "tiny": torch.zeros(3)}))
    agg.add(ClientUpdate(0, Spooled(OrderedDict(big=x, tiny=torch.ones(3))), 2))
    assert released == ["big"] * 4 + ["tiny"]  # 3 pieces of at most 1000 elements, then the end of the tensor
    assert torch.equal(agg._sum["big"], x.double() * 2)


def test_bad_update_is_rejected_before_anything_is_folded() -> None:
    agg = _fold(_updates(1))
    before = {k: v.clone() for k, v in agg._sum.items()}
    good = _updates(1, seed=3)[0].delta.tensors
    missing = OrderedDict((k, v) for k, v in good.items() if k != "matrix")
    with pytest.raises(RejectedUpdate) as e:
        agg.add(ClientUpdate(7, AdapterState(missing), 5))
    assert e.value.reason == "missing_tensor"
    wrong = OrderedDict(good, matrix=torch.zeros(300, 699))
    with pytest.raises(RejectedUpdate) as e:
        agg.add(ClientUpdate(7, AdapterState(wrong), 5))
    assert e.value.reason == "shape"
    assert agg.count == 1
    assert all(torch.equal(agg._sum[k], before[k]) for k in before)


def test_float32_accumulator_close_to_float64_but_order_dependent_only_at_fp32_rounding() -> None:
    updates = _updates(6, seed=4)
    ref = _reference_sum(updates)
    exact = _fold(updates).result()
    for order in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 4, 2, 0]):
        agg = _fold([updates[i] for i in order], dtype=torch.float32)
        assert all(agg._sum[k].dtype == torch.float32 for k in SHAPES)
        for k in SHAPES:
            assert _max_rel(agg._sum[k].double(), ref[k]) < 1e-5
        out = agg.result()
        for k in SHAPES:
            assert out[k].dtype == torch.float32
            assert _max_rel(out[k].double(), exact[k].double()) < 1e-5


def test_accumulator_dtype_is_checked() -> None:
    with pytest.raises(ValueError):
        StreamingWeightedMean(_template(), dtype=torch.float16)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedavgm"])
def test_accumulator_option(name: str) -> None:
    assert make(name).accumulator == torch.float64
    s = make(name, accumulator="float32")
    assert s.accumulator == torch.float32
    assert s.begin_round(_template())._sum["small"].dtype == torch.float32  # type: ignore[attr-defined]
    assert make(name).begin_round(_template())._sum["small"].dtype == torch.float64  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "name, value",
    [
        ("fedavg", "float16"),
        ("fedavg", 32),
        ("fedadam", True),
        ("median", "float32"),
        ("flora", "float32"),
        ("flexlora", "float32"),
    ],
)
def test_bad_accumulator_names_the_key(name: str, value: object) -> None:
    with pytest.raises(ConfigError) as e:
        make(name, accumulator=value)
    assert e.value.key == "strategy.options.accumulator"


def test_allreduce_rejects_float32_accumulator() -> None:
    from dpeft.rounds.allreduce import check_strategy

    check_strategy(make("fedavg"), _template())
    with pytest.raises(ConfigError) as e:
        check_strategy(make("fedavg", accumulator="float32"), _template())
    assert e.value.key == "strategy.options.accumulator"
