"""`sync`: wait for every sampled client; fail loudly after ``round_timeout_s``."""

from __future__ import annotations

from dpeft.sync.base import SyncPolicy, register_policy


@register_policy("sync")
class Synchronous(SyncPolicy):
    """The round closes when all expected updates have arrived."""

    def round_closed(self, arrived: int, expected: int, elapsed_s: float) -> bool:
        return arrived >= expected
