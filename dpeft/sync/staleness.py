"""Staleness discounts ``s(tau)`` for updates computed from an older global (FedBuff, FedAsync).

``tau`` is how many aggregation steps the global advanced between the moment a client was
sent its starting point and the moment its update is aggregated.

- ``constant``: ``s = 1``;
- ``polynomial``: ``s = (1 + tau) ** -a``;
- ``hinge``: ``s = 1`` for ``tau <= b``, else ``1 / (a (tau - b) + 1)``.

The engine multiplies an update's aggregation weight (its example count) by ``s(tau)``.
"""

from __future__ import annotations

KINDS = ("constant", "polynomial", "hinge")


def staleness_weight(tau: int, kind: str = "polynomial", a: float = 0.5, b: float = 4.0) -> float:
    """``s(tau)`` in (0, 1] for ``tau >= 0``."""
    if tau < 0:
        raise ValueError(f"staleness must be >= 0, got {tau}")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((1.0 + tau) ** -a)
    if kind == "hinge":
        return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
    raise ValueError(f"unknown staleness function {kind!r}; one of {', '.join(KINDS)}")
