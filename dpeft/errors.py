"""Exception types that carry a user-facing message (and, for config errors, exit code 2)."""

from __future__ import annotations


class DpeftError(Exception):
    """Base class of every error dpeft raises on purpose; its message is meant for a person."""

    exit_code = 1


class ConfigError(DpeftError):
    """A bad configuration value or command-line argument. The message names the key."""

    exit_code = 2

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"config error: {key}: {problem}" if key else f"config error: {problem}")


class DataError(DpeftError):
    """A data file that cannot be used (missing, wrong columns, unreadable labels)."""

    exit_code = 2


class ProtocolError(DpeftError):
    """A network message that is malformed, oversized, or does not match the expected schema."""


class PayloadGone(DpeftError):
    """The payload a task refers to is no longer served (its round closed meanwhile): the task
    is stale and a worker lets it go."""


class RejectedUpdate(DpeftError):
    """A worker update that failed validation; `reason` is a short stable tag for metrics."""

    #: reasons that are part of normal operation (an update for a round or run that closed meanwhile): logged at info
    ROUTINE = frozenset({"late", "closed"})

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"update rejected ({reason}): {detail}")

    @property
    def routine(self) -> bool:
        return self.reason in self.ROUTINE
