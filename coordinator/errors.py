"""Errors of the coordinator's round drivers."""

from __future__ import annotations

from dpeft.errors import DpeftError


class RoundTimeout(DpeftError):
    """A round did not complete within ``sync.round_timeout_s``."""
