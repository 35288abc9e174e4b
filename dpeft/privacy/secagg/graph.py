"""The sparse masking graph of a SecAgg+ round and its secret-sharing threshold.

Each client masks with, and shares its secrets among, its neighbours only: a circulant graph
over a seeded random ordering of the round's clients (every client linked to the ``h`` next
and ``h`` previous clients on the shuffled ring, ``h = ceil(degree / 2)``), so every client has
``2h`` neighbours (all other clients when ``2h >= n - 1``). The ordering depends only on the
round's public context, so every client can recompute the graph the coordinator announces.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np


def default_degree(n: int) -> int:
    """``privacy.secagg_neighbours: null``: about 3 log2(n) neighbours (all others for small rounds)."""
    return min(n - 1, max(2, math.ceil(3 * math.log2(max(n, 2)))))


def neighbours(clients: list[int], degree: int, seed: bytes) -> dict[int, list[int]]:
    """Client id -> its neighbours (sorted) in the round's graph."""
    n = len(clients)
    h = math.ceil(degree / 2)
    ordered = sorted(clients)
    if 2 * h >= n - 1:
        return {c: [v for v in ordered if v != c] for c in ordered}
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(b"dpeft-secagg-graph/" + seed).digest()[:8], "little"))
    ring = [ordered[i] for i in rng.permutation(n)]
    out: dict[int, list[int]] = {}
    for i, c in enumerate(ring):
        out[c] = sorted({ring[(i + d) % n] for d in range(1, h + 1)} | {ring[(i - d) % n] for d in range(1, h + 1)})
    return out


def graph_degree(n: int, degree: int) -> int:
    """The number of neighbours each client actually gets for ``degree`` asked."""
    return min(n - 1, 2 * math.ceil(degree / 2))


def threshold(degree: int, fraction: float) -> int:
    """Shares needed to recover a secret: ``ceil(fraction x degree)``, at least 2 (one neighbour
    alone never holds a secret) and at most ``degree``."""
    return min(degree, max(2, math.ceil(fraction * degree - 1e-9)))
