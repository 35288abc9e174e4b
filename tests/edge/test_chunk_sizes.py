"""A worker and a coordinator (and a split edge and cloud) with different chunk sizes, over real
gRPC on loopback.

`transport.chunk_bytes` sizes the coordinator's messages (and its limit on what it receives); a
worker learns it from the run config it is sent when it joins and uploads in chunks no larger,
and it accepts downloads in any chunk size a valid config allows. A message over a channel's
limit fails the same way every time, so it is not retried. A split edge adopts the cloud's
`split.chunk_bytes` from its welcome.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict

import grpc
import pytest
import torch

from dpeft.codec import encode_state
from dpeft.codec.tensors import Limits, StateDecoder
from dpeft.config import TransportConfig
from dpeft.errors import DpeftError, PayloadGone
from dpeft.state import AdapterState
from dpeft.transport.base import TaskResult, TrainTask
from dpeft.transport.grpc import GrpcCoordinatorTransport, GrpcWorkerConnection
from dpeft_workers.loop import _fetch_payloads

pytestmark = pytest.mark.integration


def _state(n: int) -> AdapterState:
    return AdapterState(OrderedDict([("w", torch.randn(n, generator=torch.Generator().manual_seed(n)))]), {})


def _transport(schema, chunk_bytes: int, config_yaml: str) -> GrpcCoordinatorTransport:
    return GrpcCoordinatorTransport(
        "127.0.0.1:0",
        TransportConfig(chunk_bytes=chunk_bytes, poll_timeout_s=0.2),
        run_id="chunks",
        config_yaml=config_yaml,
        num_clients=1,
        decoder_factory=lambda tid, cid: StateDecoder(schema, Limits(max_total_bytes=1 << 28)),
    )


def _task(payload: bytes) -> TrainTask:
    import hashlib

    return TrainTask("r1-c0-x", 1, 0, "g1", len(payload), hashlib.sha256(payload).digest())


def _round_trip(t: GrpcCoordinatorTransport, conn: GrpcWorkerConnection, global_payload: bytes, update: AdapterState) -> None:
    """The worker fetches the global and uploads ``update``; both arrive intact."""
    t.publish_blob("g1", global_payload)
    t.submit([_task(global_payload)], {})
    task = conn.poll()
    assert bytes(conn.fetch(task)) == global_payload
    assert conn.push(task, encode_state(update), 10, {}) == (True, "")
    ev = t.next_event(10)
    assert isinstance(ev, TaskResult) and torch.equal(ev.delta["w"], update["w"])


def test_worker_uploads_in_the_coordinators_smaller_chunks() -> None:
    update = _state(600_000)  # 2.4 MB: one 4 MiB chunk is over a 64 KiB coordinator's 1.06 MiB limit
    t = _transport(update.schema(), 64 << 10, "transport:\n  chunk_bytes: 65536\n")
    address = t.start()
    try:
        conn = GrpcWorkerConnection(address, patience_s=10, heartbeat=False)  # its own default: 4 MiB
        conn.join("w0", None)
        assert conn.chunk_bytes == 64 << 10
        _round_trip(t, conn, encode_state(_state(1000)), update)
        conn.leave()
    finally:
        t.shutdown("over", grace_s=0.1)


def test_worker_downloads_the_coordinators_larger_chunks() -> None:
    update = _state(1000)
    big = encode_state(_state(1_600_000))  # 6.4 MB in one 8 MiB chunk: over a 4 MiB worker's old 5 MiB limit
    t = _transport(update.schema(), 8 << 20, "transport:\n  chunk_bytes: 8388608\n")
    address = t.start()
    try:
        conn = GrpcWorkerConnection(address, patience_s=10, heartbeat=False)
        conn.join("w0", None)
        assert conn.chunk_bytes == 4 << 20  # uploads stay in its own, smaller chunks
        _round_trip(t, conn, big, update)
        conn.leave()
    finally:
        t.shutdown("over", grace_s=0.1)


def test_a_message_over_the_limit_is_not_retried() -> None:
    """A coordinator that does not say its chunk size (config without it) and a worker whose
    chunks exceed its limit: the upload fails at once with RESOURCE_EXHAUSTED, not after
    retrying for the worker's patience."""
    update = _state(600_000)
    t = _transport(update.schema(), 64 << 10, "{}")
    address = t.start()
    try:
        conn = GrpcWorkerConnection(address, patience_s=30, heartbeat=False)
        conn.join("w0", None)
        assert conn.chunk_bytes == 4 << 20
        t.publish_blob("g1", b"g")
        t.submit([_task(b"g")], {})
        task = conn.poll()
        starts: list[int] = []

        def count_attempts(offset: int, data: bytes) -> bytes:
            if offset == 0:
                starts.append(offset)
            return data

        conn.chunk_hook = count_attempts
        with pytest.raises(grpc.RpcError) as err:
            conn.push(task, encode_state(update), 10, {})
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in err.value.details()
        assert starts == [0]  # one attempt
        conn.leave()
    finally:
        t.shutdown("over", grace_s=0.1)


def test_split_edge_and_cloud_agree_on_large_chunks() -> None:
    """A split cloud with `split.chunk_bytes` over the edge's default: the edge adopts the
    cloud's chunk size from its welcome (as `dpeft split edge` does) and messages in 8 MiB
    chunks pass both ways."""
    from dpeft.transport.split_stream import EdgeConnection, SplitServer

    def echo(channel) -> None:
        got = channel.recv("round_update").tensors(None)
        channel.send("round_global", got)

    server = SplitServer(echo, "127.0.0.1:0", chunk_bytes=8 << 20).start()
    try:
        conn = EdgeConnection(server.address, patience_s=10)  # its default: 4 MiB
        conn.channel.chunk_bytes = 8 << 20
        sent = _state(1_600_000)["w"]  # 6.4 MB: one 8 MiB message
        conn.channel.send("round_update", {"w": sent})
        back = conn.channel.recv("round_global").tensors(None)
        assert torch.equal(back["w"], sent)
        conn.leave()
    finally:
        server.stop()


def test_a_download_over_the_limit_or_of_a_payload_gone_ends_at_once(caplog: pytest.LogCaptureFixture) -> None:
    """An oversized chunk (a coordinator outside what a valid config allows) fails the fetch with
    one clear error, without retrying; a payload no longer served (its round closed) is
    PayloadGone, which a worker treats as a stale task."""
    caplog.set_level(logging.INFO)
    big = bytes(70 << 20)
    t = _transport(_state(10).schema(), 100 << 20, "{}")
    address = t.start()
    try:
        conn = GrpcWorkerConnection(address, patience_s=30, heartbeat=False)
        conn.join("w0", None)
        t.publish_blob("g1", big)
        t.submit([_task(big)], {})
        task = conn.poll()
        with pytest.raises(DpeftError, match="download of payload 'g1' failed: RESOURCE_EXHAUSTED") as err:
            conn.fetch(task)
        assert "\n" not in str(err.value)
        assert "resuming" not in caplog.text  # not retried
        gone = dataclasses.replace(task, task_id="r1-c1-y", blob_id="closed")
        with pytest.raises(PayloadGone, match="no longer served"):
            conn.fetch(gone)
        # the worker loop lets a stale task go and stops on any other failure
        assert _fetch_payloads(conn, [gone], {}) == []
        with pytest.raises(DpeftError, match="RESOURCE_EXHAUSTED"):
            _fetch_payloads(conn, [task], {})
        conn.leave()
    finally:
        t.shutdown("over", grace_s=0.1)
