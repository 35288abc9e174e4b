"""`async`: FedBuff-style buffered asynchronous aggregation (Nguyen et al., AISTATS 2022).

There are no rounds: the coordinator keeps up to ``concurrency`` tasks in flight (default
``2 x clients_per_round``), each started from the global current at dispatch; as soon as a
task answers, another client gets one. Every ``buffer_size`` accepted updates (default
``clients_per_round``) the strategy aggregates them into a new global — one "round" in
``metrics.jsonl`` and checkpoints, so ``rounds`` counts aggregation steps. An update that
started ``tau`` steps ago is weighted by ``s(tau)`` (``staleness``: constant, polynomial,
hinge) and dropped beyond ``max_staleness``. Lost tasks (``task_timeout_s``) free their slot.
The loop itself lives in :mod:`dpeft_coordinator.async_engine`.
"""

from __future__ import annotations

from dpeft.sync.base import SyncPolicy, register_policy


@register_policy("async")
class Asynchronous(SyncPolicy):
    """Parameters of the buffered asynchronous loop."""

    asynchronous = True

    def buffer_size(self) -> int:
        """Accepted updates per aggregation step."""
        return self.cfg.buffer_size if self.cfg.buffer_size is not None else (self.clients_per_round or 1)

    def concurrency(self, clients: int) -> int:
        """Tasks in flight at once."""
        c = self.cfg.concurrency if self.cfg.concurrency is not None else 2 * (self.clients_per_round or 1)
        return max(1, min(c, clients))

    def round_closed(self, arrived: int, expected: int, elapsed_s: float, lost: int = 0, min_updates: int = 1) -> bool:
        return arrived >= self.buffer_size()
