"""Seeded partitioners: IID shards and Dirichlet label skew."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from dpeft.data import dirichlet_partition, iid_partition, partition
from dpeft.errors import ConfigError


def _labels(n: int = 1000, classes: int = 2, seed: int = 0) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(0, classes, size=n)]


def _assert_exact_cover(shards: list[list[int]], n: int) -> None:
    flat = [i for s in shards for i in s]
    assert len(flat) == n, "some index is missing or duplicated"
    assert sorted(flat) == list(range(n))


def _majority_fraction(shards: list[list[int]], labels: list[int]) -> float:
    fracs = [Counter(labels[i] for i in s).most_common(1)[0][1] / len(s) for s in shards]
    return float(np.mean(fracs))


# ---------------------------------------------------------------------- iid


@pytest.mark.parametrize("n, k", [(1000, 10), (1003, 10), (7, 7), (100, 3), (50, 49)])
def test_iid_sizes_and_cover(n: int, k: int) -> None:
    shards = iid_partition(n, k, seed=1)
    assert len(shards) == k
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    _assert_exact_cover(shards, n)


def test_iid_seeded() -> None:
    assert iid_partition(500, 7, seed=3) == iid_partition(500, 7, seed=3)
    assert iid_partition(500, 7, seed=3) != iid_partition(500, 7, seed=4)


def test_iid_is_shuffled_not_contiguous() -> None:
    shards = iid_partition(1000, 10, seed=0)
    assert shards[0] != list(range(100))


def test_iid_too_few_examples() -> None:
    with pytest.raises(ConfigError) as info:
        iid_partition(3, 5, seed=0)
    assert info.value.key == "clients"


# ---------------------------------------------------------------------- dirichlet


def test_dirichlet_cover_and_min_size() -> None:
    labels = _labels(1000, 2)
    shards = dirichlet_partition(labels, 10, alpha=0.5, seed=0, min_size=20)
    assert len(shards) == 10
    _assert_exact_cover(shards, len(labels))
    assert min(len(s) for s in shards) >= 20


def test_dirichlet_multiclass_cover() -> None:
    labels = _labels(900, 8, seed=2)
    shards = dirichlet_partition(labels, 6, alpha=1.0, seed=5, min_size=10)
    _assert_exact_cover(shards, len(labels))
    assert min(len(s) for s in shards) >= 10


def test_dirichlet_seeded() -> None:
    labels = _labels(600, 2)
    a = dirichlet_partition(labels, 5, alpha=1.0, seed=11, min_size=5)
    b = dirichlet_partition(labels, 5, alpha=1.0, seed=11, min_size=5)
    c = dirichlet_partition(labels, 5, alpha=1.0, seed=12, min_size=5)
    assert a == b
    assert a != c


def test_smaller_alpha_is_more_skewed() -> None:
    labels = _labels(2000, 2)
    skew = {}
    for alpha in (0.1, 1.0, 100.0):
        # average over a few seeds so the comparison is about alpha, not one draw
        skew[alpha] = np.mean(
            [_majority_fraction(dirichlet_partition(labels, 10, alpha, seed=s, min_size=10), labels) for s in range(5)]
        )
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[100.0] < 0.6  # near-uniform clients look like the global 50/50 mix
    assert skew[0.1] > 0.8  # very small alpha: clients nearly single-class


def test_dirichlet_impossible_min_size() -> None:
    with pytest.raises(ConfigError):
        dirichlet_partition(_labels(50), 10, alpha=1.0, seed=0, min_size=10)


def test_partition_dispatch() -> None:
    labels = _labels(200)
    assert partition(labels, 4, "iid", seed=0) == iid_partition(200, 4, seed=0)
    assert partition(labels, 4, "dirichlet", seed=0, alpha=0.7, min_size=3) == dirichlet_partition(labels, 4, 0.7, 0, 3)
    with pytest.raises(ConfigError) as info:
        partition(labels, 4, "zipf", seed=0)
    assert info.value.key == "data.partition"
