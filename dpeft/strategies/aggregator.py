"""What a strategy folds: one client's update, the streaming aggregator interface, and unwrapping
aggregator wrappers (such as clipping) to the strategy's own aggregator."""

from __future__ import annotations

from dataclasses import dataclass, field

from dpeft.state import AdapterState


@dataclass
class ClientUpdate:
    """One client's contribution: the change it made to the global adapter."""

    client_id: int
    delta: AdapterState
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Aggregator:
    """Folds client updates one at a time; ``result()`` returns the aggregated delta."""

    def add(self, update: ClientUpdate) -> None:
        raise NotImplementedError

    def result(self) -> AdapterState:
        raise NotImplementedError

    @property
    def count(self) -> int:
        raise NotImplementedError


def unwrap(aggregator: Aggregator) -> Aggregator:
    """The innermost aggregator beneath wrappers (such as clipping) that expose ``inner``."""
    while hasattr(aggregator, "inner"):
        aggregator = aggregator.inner
    return aggregator
