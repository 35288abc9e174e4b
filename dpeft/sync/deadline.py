"""`deadline`: over-select, close at a deadline or a quorum, whichever comes first.

The round samples ``ceil(clients_per_round x over_selection)`` clients and closes as soon as
``quorum`` (default ``clients_per_round``) updates arrived, or ``deadline_s`` after it
started — but never with fewer updates than the strategy can aggregate (at least one; Krum
needs ``2f + 3``), and early when every task has answered or been given up
(``task_timeout_s``). Updates that miss their round are rejected (``late_updates: drop``) or
aggregated in a later round with weight ``s(tau)`` (``fold``; ``tau`` = rounds late, at most
``max_staleness``). A round still short of updates at ``round_timeout_s`` fails loudly.
"""

from __future__ import annotations

import math

from dpeft.sync.base import SyncPolicy, register_policy


@register_policy("deadline")
class Deadline(SyncPolicy):
    """Close at ``quorum`` arrivals or at ``deadline_s``."""

    def sample_size(self, clients_per_round: int, eligible: int) -> int:
        return min(eligible, math.ceil(clients_per_round * self.cfg.over_selection - 1e-9))

    def quorum(self, expected: int) -> int:
        """Arrivals that close the round early."""
        q = self.cfg.quorum if self.cfg.quorum is not None else (self.clients_per_round or expected)
        return min(q, expected)

    def round_closed(self, arrived: int, expected: int, elapsed_s: float, lost: int = 0, min_updates: int = 1) -> bool:
        if arrived < max(1, min_updates):
            return False
        if arrived >= self.quorum(expected):
            return True
        return elapsed_s >= self.cfg.deadline_s or arrived + lost >= expected

    def wait_s(self, elapsed_s: float, poll_s: float = 0.2) -> float:
        return max(0.005, min(poll_s, self.cfg.deadline_s - elapsed_s)) if elapsed_s < self.cfg.deadline_s else poll_s

    @property
    def late_updates(self) -> str:
        return self.cfg.late_updates
