"""gRPC channel settings shared by both ends: message limits, keepalive, reconnect and retry backoff."""

from __future__ import annotations

import random

from dpeft.transport.serde.rpc import SERVICE_NAME

__all__ = ["SERVICE_NAME", "backoff_s", "channel_options"]


def channel_options(chunk_bytes: int, receive_chunk_bytes: int | None = None) -> list[tuple[str, int]]:
    """gRPC options sized so one chunk plus framing always fits in a message: chunks of
    ``chunk_bytes`` sent, of ``receive_chunk_bytes`` (default the same) received."""
    limit = chunk_bytes + (1 << 20)
    return [
        ("grpc.max_receive_message_length", (receive_chunk_bytes or chunk_bytes) + (1 << 20)),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # the server side of the keepalive above: a peer's pings every 30 s on an idle connection are
        # welcome (grpc's default minimum of 5 min answers them with GOAWAY "too_many_pings")
        ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
        # a client's reconnect backoff grows 1.6x per refused attempt and would reach minutes,
        # longer than a worker's --patience: a worker started before its coordinator (or across
        # a coordinator restart) dials again at least every 5 s
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]


def backoff_s(attempt: int) -> float:
    """Exponential backoff with full jitter: uniform(0, min(10, 0.2 * 2^attempt)) (>= 50 ms)."""
    return max(0.05, random.uniform(0, min(10.0, 0.2 * (2**attempt))))
