"""Byzantine-robust aggregation rules as pure functions over flattened client deltas.

Each takes a list of 1-D tensors of equal length (one per client) and ignores example
counts: robust rules bound each client's influence, and weighting by a self-reported
example count would hand that influence back to an attacker.

* :func:`coordinate_median` — per-coordinate median (mean of the two middle values for an
  even count).
* :func:`trimmed_mean` — per coordinate, drop the ``floor(beta * n)`` smallest and largest
  values and average the rest (Yin et al. 2018).
* :func:`krum` — Krum / Multi-Krum (Blanchard et al. 2017): score each update by the sum of
  squared distances to its ``n - f - 2`` nearest neighbours and average the ``m`` best.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _stack(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(vectors) == 0:
        raise ValueError("no updates to aggregate")
    first = vectors[0]
    for v in vectors:
        if v.dim() != 1 or v.numel() != first.numel():
            raise ValueError("updates must be 1-D tensors of equal length")
    return torch.stack([v.to(torch.float64) for v in vectors])


def coordinate_median(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Coordinate-wise median of ``vectors`` (float64)."""
    x = _stack(vectors)
    n = x.shape[0]
    s = torch.sort(x, dim=0).values
    if n % 2 == 1:
        return s[n // 2].clone()
    return (s[n // 2 - 1] + s[n // 2]) / 2


def trimmed_mean(vectors: Sequence[torch.Tensor], beta: float) -> torch.Tensor:
    """Coordinate-wise mean after dropping the ``floor(beta * n)`` lowest and highest values."""
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta}")
    x = _stack(vectors)
    n = x.shape[0]
    k = math.floor(beta * n)
    if k == 0:
        return x.mean(dim=0)
    s = torch.sort(x, dim=0).values
    return s[k : n - k].mean(dim=0)


def krum_scores(vectors: Sequence[torch.Tensor], f: int) -> torch.Tensor:
    """Krum score of each update: summed squared distance to its ``n - f - 2`` nearest others.

    Needs ``n >= 2f + 3`` updates, the condition under which Krum tolerates ``f`` Byzantine ones.
    """
    if f < 0:
        raise ValueError(f"f must be >= 0, got {f}")
    x = _stack(vectors)
    n = x.shape[0]
    if n < 2 * f + 3:
        raise ValueError(f"krum with f={f} needs at least 2f+3={2 * f + 3} updates, got {n}")
    # row by row: extra memory O(n * d) rather than the O(n^2 * d) of one broadcast
    d2 = torch.stack([(x - x[i]).pow(2).sum(dim=-1) for i in range(n)])
    closest = n - f - 2
    scores = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        others = torch.cat([d2[i, :i], d2[i, i + 1 :]])
        scores[i] = torch.sort(others).values[:closest].sum()
    return scores


def krum(vectors: Sequence[torch.Tensor], f: int, m: int = 1) -> tuple[list[int], torch.Tensor]:
    """Multi-Krum: indices of the ``m`` lowest-scoring updates (ties by index) and their mean.

    ``m = 1`` is plain Krum: the mean of one is the selected update itself.
    """
    n = len(vectors)
    if not 1 <= m <= n:
        raise ValueError(f"m must be in [1, {n}], got {m}")
    scores = krum_scores(vectors, f)
    order = sorted(range(n), key=lambda i: (float(scores[i]), i))
    selected = sorted(order[:m])
    return selected, _stack([vectors[i] for i in selected]).mean(dim=0)
