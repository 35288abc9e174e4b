"""Strategy option parsing, validation and registry behaviour."""

from __future__ import annotations

import pytest
from strategy_testlib import make

from dpeft.errors import ConfigError
from dpeft.strategies import available_strategies

ALL = [
    "fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "median", "trimmed_mean",
    "krum", "multi_krum", "ffa_lora", "flora", "flexlora", "fedsa_lora",
]  # fmt: skip


def test_all_registered() -> None:
    assert set(ALL) <= set(available_strategies())


@pytest.mark.parametrize("name", ALL)
def test_defaults_construct_and_know_clip_norm(name: str) -> None:
    s = make(name)
    assert s.name == name
    assert "clip_norm" in s.known_options()
    assert s.state_dict() == {} or name in ("fedavgm", "fedadam", "fedyogi", "fedadagrad")


def test_defaults() -> None:
    assert make("fedavgm").momentum == 0.9
    adam = make("fedadam")
    assert (adam.beta1, adam.beta2, adam.tau) == (0.9, 0.99, 1e-3)
    assert make("fedprox").mu == 0.01
    assert make("trimmed_mean").beta == 0.1
    assert make("krum").f == 1
    mk = make("multi_krum")
    assert (mk.f, mk.m) == (1, None)
    assert make("flora").rank is None
    assert make("fedavg").clip_norm is None


@pytest.mark.parametrize(
    "name, options, key",
    [
        ("fedavg", {"bogus": 1}, "bogus"),
        ("fedavgm", {"momentum": 1.0}, "momentum"),
        ("fedavgm", {"momentum": -0.1}, "momentum"),
        ("fedadam", {"beta1": 1.5}, "beta1"),
        ("fedadam", {"beta2": 1.0}, "beta2"),
        ("fedyogi", {"tau": 0}, "tau"),
        ("fedadagrad", {"beta2": 0.9}, "beta2"),  # adagrad has no beta2
        ("fedprox", {"mu": -1}, "mu"),
        ("fedprox", {"mu": "abc"}, "mu"),
        ("fedprox", {"mu": True}, "mu"),
        ("fedprox", {"mu": float("nan")}, "mu"),
        ("trimmed_mean", {"beta": 0.5}, "beta"),
        ("krum", {"f": -1}, "f"),
        ("krum", {"f": 1.5}, "f"),
        ("krum", {"m": 2}, "m"),  # m is multi_krum's
        ("multi_krum", {"m": 0}, "m"),
        ("flora", {"rank": 0}, "rank"),
        ("fedavg", {"clip_norm": 0}, "clip_norm"),
        ("median", {"clip_norm": -1.0}, "clip_norm"),
        ("flexlora", {"clip_norm": 1.0}, "clip_norm"),
        ("flexlora", {"rank": 4, "client_ranks": [2, 8]}, "client_ranks"),
        ("flexlora", {"client_ranks": []}, "client_ranks"),
        ("flexlora", {"client_ranks": "2,4"}, "client_ranks"),
    ],
)
def test_bad_options_name_the_key(name: str, options: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        make(name, **options)
    assert e.value.key == f"strategy.options.{key}"


def test_numeric_strings_accepted() -> None:
    # YAML 1.1 reads 1e-3 as a string
    assert make("fedadam", tau="1e-3").tau == 1e-3
    assert make("krum", f="2").f == 2
    assert make("fedavg", clip_norm="2.5").clip_norm == 2.5
    assert make("fedavg", clip_norm=None).clip_norm is None


def test_unknown_strategy_is_config_error() -> None:
    with pytest.raises(ConfigError) as e:
        make("nope")
    assert e.value.key == "strategy.name"
