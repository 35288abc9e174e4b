"""Seeded client sampling: which clients train in a round (or fill a free asynchronous slot)."""

from __future__ import annotations

import numpy as np


def sample_clients(seed: int, round_num: int, eligible: list[int], size: int) -> list[int]:
    """The seeded per-round client sample: min(size, len(eligible)) of ``eligible``, sorted."""
    rng = np.random.default_rng([seed, round_num])
    return sorted(int(c) for c in rng.choice(eligible, size=min(size, len(eligible)), replace=False))


def sample_free(seed: int, step: int, seq: int, free: list[int], size: int) -> list[int]:
    """The seeded choice of ``size`` idle clients for asynchronous dispatch ``seq`` during step ``step``, sorted."""
    rng = np.random.default_rng([seed, step, seq])
    return sorted(int(c) for c in rng.choice(free, size=size, replace=False))
