"""Every worker call re-reads its session after a re-join (a call retried with the old session
would be refused again, join after join). Real gRPC, loopback."""

from __future__ import annotations

from dpeft.codec.tensors import StateDecoder
from dpeft.transport.grpc.server import GrpcCoordinatorTransport
from dpeft.transport.grpc.worker import GrpcWorkerConnection


def test_calls_after_a_lost_session_rejoin_once() -> None:
    t = GrpcCoordinatorTransport(
        "127.0.0.1:0", run_id="rejoin", config_yaml="{}", num_clients=1, poll_timeout_s=0.1, decoder_factory=lambda tid, cid: StateDecoder()
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
