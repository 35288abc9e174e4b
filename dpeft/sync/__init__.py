"""Sync policies: who trains in a round and when the round closes. Selected by name."""

from dpeft.sync.base import SyncPolicy, available_policies, make_policy, register_policy
from dpeft.sync import synchronous as _synchronous  # noqa: F401  (registers)

__all__ = ["SyncPolicy", "available_policies", "make_policy", "register_policy"]
