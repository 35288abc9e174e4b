"""Seeded client partitioners over example indices: IID shards, Dirichlet label skew, and by a column's values."""

from __future__ import annotations

import numpy as np

from dpeft.errors import ConfigError


def iid_partition(n_examples: int, n_clients: int, seed: int) -> list[list[int]]:
    """Shuffle, then deal into ``n_clients`` shards whose sizes differ by at most one."""
    if n_examples < n_clients:
        raise ConfigError("clients", f"{n_clients} clients but only {n_examples} training examples")
    perm = np.random.default_rng(seed).permutation(n_examples)
    return [sorted(int(i) for i in shard) for shard in np.array_split(perm, n_clients)]


def dirichlet_partition(
    labels: list[int], n_clients: int, alpha: float, seed: int, min_size: int = 1, max_tries: int = 1000
) -> list[list[int]]:
    """Per label, split its examples among clients with proportions ~ Dir(alpha).

    Redraws until every client has at least ``min_size`` examples (``max_tries`` at most).
    """
    labels_arr = np.asarray(labels)
    if len(labels_arr) < n_clients * min_size:
        raise ConfigError("clients", f"{n_clients} clients x {min_size} examples exceeds {len(labels_arr)} examples")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels_arr)
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = np.flatnonzero(labels_arr == c)
            rng.shuffle(idx)
            props = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for client, part in enumerate(np.split(idx, cuts)):
                shards[client].extend(int(i) for i in part)
        if min(len(s) for s in shards) >= min_size:
            return [sorted(s) for s in shards]
    raise ConfigError(
        "data.dirichlet_alpha",
        f"could not give every one of {n_clients} clients {min_size} examples (data.min_examples_per_client) out of {len(labels_arr)} "
        f"in {max_tries} draws; raise alpha, lower data.min_examples_per_client or clients, or use more examples or data.partition=iid",
    )


def column_partition(groups: list[str], n_clients: int, seed: int, key: str = "data.partition_column") -> list[list[int]]:
    """Each distinct value's examples go to one client; values are dealt so client sizes stay even.

    Values are shuffled by ``seed``, then taken largest first, each to the client with the fewest
    examples so far (the first ``n_clients`` values go to distinct clients, so none is empty).
    """
    by_value: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_value.setdefault(g, []).append(i)
    if len(by_value) < n_clients:
        raise ConfigError(
            key,
            f"has {len(by_value)} distinct values among the training examples but there are {n_clients} clients; each client needs at least one value",
        )
    values = sorted(by_value)
    order = np.random.default_rng(seed).permutation(len(values))
    shuffled = [values[int(k)] for k in order]
    shuffled.sort(key=lambda v: -len(by_value[v]))  # stable: equal sizes keep the seeded order
    shards: list[list[int]] = [[] for _ in range(n_clients)]
    for v in shuffled:
        target = min(range(n_clients), key=lambda c: (len(shards[c]), c))
        shards[target].extend(by_value[v])
    return [sorted(s) for s in shards]


def partition(
    labels: list[int], n_clients: int, method: str, seed: int, alpha: float = 1.0, min_size: int = 1
) -> list[list[int]]:
    """Dispatch on ``method`` (``iid``, or ``dirichlet``; ``auto`` reads dirichlet over these labels).

    Runs resolve ``data.partition`` (column splits included) with :func:`dpeft.data.split_among`."""
    if method == "iid":
        return iid_partition(len(labels), n_clients, seed)
    if method in ("dirichlet", "auto"):
        return dirichlet_partition(labels, n_clients, alpha, seed, min_size)
    raise ConfigError("data.partition", f"unknown partition {method!r}")
