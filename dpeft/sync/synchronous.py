"""`sync`: wait for every sampled client; fail loudly after ``round_timeout_s``.

With ``task_timeout_s`` set, a task without a reply by then is re-submitted as a fresh
attempt (to any worker that may train that client), so a dropped task costs time, not the
run. Without it, a lost task makes the round fail at ``round_timeout_s``.
"""

from __future__ import annotations

from dpeft.sync.base import SyncPolicy, register_policy


@register_policy("sync")
class Synchronous(SyncPolicy):
    """The round closes when all expected updates have arrived."""

    reassign_lost = True

    def round_closed(self, arrived: int, expected: int, elapsed_s: float, lost: int = 0, min_updates: int = 1) -> bool:
        return arrived >= expected

