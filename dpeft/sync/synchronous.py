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


@register_policy("allreduce")
class AllReduce(Synchronous):
    """Synchronous rounds whose updates are summed by torch.distributed all-reduce among the workers.

    There is no coordinator in the data path: ``dpeft simulate`` starts a local gloo group,
    ``dpeft ray`` forms the group out of its actors, torchrun runs
    :mod:`dpeft_launch.torchrun_allreduce` (see :mod:`dpeft.transport.distributed_allreduce`).
    Only weighted-mean strategies can be all-reduced; simulated stragglers and dropouts do not
    apply (every rank waits for the collective).
    """

    collective = True
