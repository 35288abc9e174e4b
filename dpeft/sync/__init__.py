"""Sync policies: who trains in a round and when the round closes. Selected by name."""

from dpeft.sync import asynchronous as _asynchronous  # noqa: F401  (registers)
from dpeft.sync import deadline as _deadline  # noqa: F401  (registers)
from dpeft.sync import synchronous as _synchronous  # noqa: F401  (registers)
from dpeft.sync.base import (
    SyncPolicy,
    available_policies,
    make_policy,
    register_policy,
    updates_per_step,
    validate_run_sync,
)
from dpeft.sync.staleness import staleness_weight

__all__ = [
    "SyncPolicy",
    "available_policies",
    "make_policy",
    "register_policy",
    "staleness_weight",
    "updates_per_step",
    "validate_run_sync",
]
