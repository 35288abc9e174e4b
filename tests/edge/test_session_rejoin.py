"""Every worker call re-reads its session after a re-join (a call retried with the old session
would be refused again, join after join); a new session under a known worker id releases the
tasks of the old one at once. Real gRPC, loopback."""

from __future__ import annotations

import hashlib

import pytest

from dpeft.codec.tensors import StateDecoder
from dpeft.config import TransportConfig
from dpeft.transport.base import TrainTask
from dpeft.transport.grpc.server import GrpcCoordinatorTransport
from dpeft.transport.grpc.servicer import StaleSession
from dpeft.transport.grpc.worker import GrpcWorkerConnection


def test_calls_after_a_lost_session_rejoin_once() -> None:
    t = GrpcCoordinatorTransport(
        "127.0.0.1:0", TransportConfig(poll_timeout_s=0.1), run_id="rejoin", config_yaml="{}", num_clients=1, decoder_factory=lambda tid, cid: StateDecoder()
    )
    conn = GrpcWorkerConnection(t.start(), patience_s=5, heartbeat=False)
    try:
        conn.join("w0", None)
        for call in (lambda: conn.query_upload("t1"), conn.heartbeat, conn.poll):
            with t.lock:
                t.registry.get("w0").session = "lost"  # as after a coordinator restart
            before = conn.rejoins
            call()
            assert conn.rejoins == before + 1
    finally:
        conn.leave()
        t.shutdown("over", grace_s=0.1)


def test_a_new_session_requeues_the_tasks_of_the_old_one(caplog) -> None:
    """A worker process killed while holding a task and restarted at once (long before
    ``dead_after_s``): the new process's join puts the task back in the queue, it gets the task
    itself, and the old session can no longer call (its upload would be refused as stale)."""
    t = GrpcCoordinatorTransport(
        "127.0.0.1:0", TransportConfig(poll_timeout_s=0.1, dead_after_s=600.0), run_id="restart", config_yaml="{}", num_clients=1,
        decoder_factory=lambda tid, cid: StateDecoder(),
    )
    address = t.start()
    killed = GrpcWorkerConnection(address, patience_s=5, heartbeat=False)
    restarted = GrpcWorkerConnection(address, patience_s=5, heartbeat=False)
    try:
        old = killed.join("w0", None).session
        t.publish_blob("blob1", b"g")
        t.submit([TrainTask("r1-c0", 1, 0, "blob1", 1, hashlib.sha256(b"g").digest())], {})
        assert killed.poll().task_id == "r1-c0"
        assert t.queue.in_flight() == {"r1-c0": "w0"}
        with caplog.at_level("INFO", logger="dpeft.events"):
            restarted.join("w0", None)
        assert t.queue.in_flight() == {} and t.queue.pending_ids() == ["r1-c0"]
        assert "event=session_replaced worker=w0 requeued=1" in caplog.text
        assert restarted.poll().task_id == "r1-c0"
        with pytest.raises(StaleSession):
            t.session_worker("w0", old)
    finally:
        restarted.leave()
        t.shutdown("over", grace_s=0.1)
