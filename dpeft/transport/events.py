"""Structured event lines (``event=NAME key=value ...``) shared by transports and launchers."""

from __future__ import annotations

import json
import logging
from typing import Any

events_log = logging.getLogger("dpeft.events")


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """One structured ``event=NAME key=value ...`` line (values with spaces are JSON-quoted)."""
    if not events_log.isEnabledFor(level):
        return
    parts = [f"event={event}"]
    for k, v in fields.items():
        if isinstance(v, float):
            text = f"{v:.3f}"
        else:
            text = str(v)
            if not text or any(c.isspace() or c in "\"=" for c in text):
                text = json.dumps(text)
        parts.append(f"{k}={text}")
    events_log.log(level, " ".join(parts))
