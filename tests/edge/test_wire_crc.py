"""Wire integrity over real gRPC on loopback: CRC-32C between current peers, CRC-32 (zlib) with
older ones, never one algorithm's value checked against the other's; the coordinator's cached
chunk CRCs; corrupted chunks detected under CRC-32C."""

from __future__ import annotations

import dataclasses
import hashlib
import zlib
from collections import OrderedDict

import crc32c
import grpc
import pytest
import torch
from edge_testlib import RawClient

from dpeft._proto.dpeft.v1 import coordinator_pb2 as pb
from dpeft.codec import encode_state
from dpeft.codec.crc import CRC32, CRC32C
from dpeft.codec.tensors import Limits, StateDecoder
from dpeft.config import TransportConfig
from dpeft.errors import ProtocolError
from dpeft.state import AdapterState
from dpeft.transport import serde
from dpeft.transport.base import TaskResult, TrainTask
from dpeft.transport.grpc import FramedBlob, GrpcCoordinatorTransport, GrpcWorkerConnection

SCHEMA = OrderedDict([("a.weight", ((64, 1024), torch.float32)), ("b.bias", ((16,), torch.float32))])
CHUNK = 16 << 10


def _state(seed: int = 0) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    return AdapterState(OrderedDict((k, torch.randn(s, generator=g, dtype=d)) for k, (s, d) in SCHEMA.items()), {})


@pytest.fixture
def coordinator():
    t = GrpcCoordinatorTransport(
        "127.0.0.1:0", TransportConfig(chunk_bytes=CHUNK, poll_timeout_s=0.2), run_id="crc", config_yaml="{}", num_clients=4,
        decoder_factory=lambda tid, cid: StateDecoder(SCHEMA, Limits(max_total_bytes=1 << 24)),
    )
    address = t.start()
    yield t, address
    t.shutdown("over", grace_s=0.1)


def _publish(t: GrpcCoordinatorTransport, blob: bytes, task_id: str = "r1-c0-x", client: int = 0) -> TrainTask:
    task = TrainTask(task_id, 1, client, "blob1", len(blob), hashlib.sha256(blob).digest(), blob_crc32=zlib.crc32(blob))
    t.publish_blob("blob1", blob)
    t.submit([task], {})
    return task


def _joined(address: str, patience_s: float = 10) -> GrpcWorkerConnection:
    """A current worker (CRC-32C), joined as w0, no heartbeat thread."""
    conn = GrpcWorkerConnection(address, chunk_bytes=CHUNK, patience_s=patience_s, heartbeat=False)
    conn.join("w0", None)
    return conn


@pytest.fixture
def headers(monkeypatch) -> list:
    """The upload headers the coordinator parsed, in order."""
    seen: list = []
    real = serde.update_header_from_proto

    def record(msg):
        out = real(msg)
        seen.append(out)
        return out

    monkeypatch.setattr(serde, "update_header_from_proto", record)
    return seen


def test_current_peers_speak_crc32c_both_ways(coordinator, headers) -> None:
    t, address = coordinator
    blob = encode_state(_state(3))
    _publish(t, blob)
    conn = _joined(address)
    try:
        task = conn.poll()
        assert isinstance(task, TrainTask)
        assert task.blob_crc32c == crc32c.crc32c(blob)  # the coordinator announces CRC-32C with the task
        assert bytes(conn.fetch(task)) == blob
        payload = encode_state(_state(4))
        assert conn.push(task, payload, 5, {}) == (True, "")
        ev = t.next_event(5)
        assert isinstance(ev, TaskResult) and torch.equal(ev.delta["a.weight"], _state(4)["a.weight"])
        assert [(h.crc32, h.crc32c, h.sha256) for h in headers] == [(None, crc32c.crc32c(payload), b"")]
    finally:
        conn.leave()


def test_a_worker_of_an_older_coordinator_uses_crc32(coordinator, headers) -> None:
    """A task without blob_crc32c (what an older coordinator sends): fetch asks for CRC-32 chunks
    and checks blob_crc32; the upload declares crc32 and is accepted."""
    t, address = coordinator
    blob = encode_state(_state(5))
    _publish(t, blob)
    conn = _joined(address)
    try:
        task = dataclasses.replace(conn.poll(), blob_crc32c=None)
        assert bytes(conn.fetch(task)) == blob
        payload = encode_state(_state(6))
        assert conn.push(task, payload, 5, {}) == (True, "")
        assert [(h.crc32, h.crc32c) for h in headers] == [(zlib.crc32(payload), None)]
        assert isinstance(t.next_event(5), TaskResult)
    finally:
        conn.leave()


def test_old_style_uploads_are_still_accepted(coordinator) -> None:
    """What older workers send: CRC-32 chunks with a whole-payload crc32 (no sha256), or with a sha256."""
    t, address = coordinator
    _publish(t, b"g", "r1-c0-a", 0)
    _publish(t, b"g", "r1-c1-b", 1)
    raw = RawClient(address, "old")
    try:
        raw.join()
        tasks = []
        while len(tasks) < 2:
            reply = raw.poll()
            if reply.WhichOneof("kind") == "task":
                tasks.append(reply.task)
        payload = encode_state(_state(7))
        ack = raw.push(tasks[0].task_id, tasks[0].client_id, payload, chunk=CHUNK, sha256=b"", crc32=zlib.crc32(payload))
        assert ack.accepted
        ack = raw.push(tasks[1].task_id, tasks[1].client_id, payload, chunk=CHUNK)  # sha256 header, CRC-32 chunks
        assert ack.accepted
        for _ in range(2):
            ev = t.next_event(5)
            assert isinstance(ev, TaskResult) and torch.equal(ev.delta["a.weight"], _state(7)["a.weight"])
        # and an older worker's download: no crc32c asked, CRC-32 (zlib) chunks served
        chunks = list(raw.stub.FetchBlob(pb.FetchRequest(worker_id="old", session=raw.session, blob_id="blob1"), timeout=10, metadata=raw.md))
        assert chunks and all(c.HasField("crc32") and not c.HasField("crc32c") and c.crc32 == zlib.crc32(c.data) for c in chunks)
    finally:
        raw.close()


def test_download_chunks_on_the_grid_with_cached_crc32c(coordinator) -> None:
    t, address = coordinator
    blob = encode_state(_state(8))
    _publish(t, blob)
    raw = RawClient(address, "w")
    try:
        raw.join()
        framed = t.payloads.get("blob1")
        cache = t.payloads.crcs_of("blob1", framed)
        n = -(-len(blob) // CHUNK)
        assert cache.whole_crc32c == crc32c.crc32c(blob) and len(cache.by_algo[CRC32C.name]) == n  # computed once, at publish
        # an in-memory payload is kept as its response frames: served as they are, nothing re-encoded
        assert isinstance(framed, FramedBlob) and len(framed.frames) == n
        req = pb.FetchRequest(worker_id="w", session=raw.session, blob_id="blob1", crc32c=True)
        assert [c.SerializeToString() for c in raw.stub.FetchBlob(req, timeout=10, metadata=raw.md)] == framed.frames
        for offset in (0, CHUNK, 5, CHUNK + 77):  # a resume off the grid gets one short chunk first
            req = pb.FetchRequest(worker_id="w", session=raw.session, blob_id="blob1", offset=offset, crc32c=True)
            chunks = list(raw.stub.FetchBlob(req, timeout=10, metadata=raw.md))
            assert b"".join(c.data for c in chunks) == blob[offset:]
            assert [c.offset for c in chunks[1:]] == list(range((offset // CHUNK + 1) * CHUNK, len(blob), CHUNK))
            assert all(c.HasField("crc32c") and not c.HasField("crc32") and c.crc32c == crc32c.crc32c(c.data) for c in chunks)
        # an older worker's CRC-32s are taken on its first download and kept for the next ones
        assert CRC32.name not in cache.by_algo
        req = pb.FetchRequest(worker_id="w", session=raw.session, blob_id="blob1")
        chunks = list(raw.stub.FetchBlob(req, timeout=10, metadata=raw.md))
        assert cache.by_algo[CRC32.name] == [zlib.crc32(c.data) for c in chunks] == [c.crc32 for c in chunks]
        cache.by_algo[CRC32.name][1] ^= 1  # served from the cache: a wrong cached value reaches the wire as is
        assert [c.crc32 != zlib.crc32(c.data) for c in raw.stub.FetchBlob(req, timeout=10, metadata=raw.md)][:3] == [False, True, False]
    finally:
        raw.close()


def test_a_corrupted_download_chunk_is_detected_under_crc32c(coordinator) -> None:
    """The payload changes after its CRCs were taken (bit rot, a bug): the worker refuses the
    chunk (fetching it again from its offset until its patience runs out), never the bad bytes."""
    t, address = coordinator
    blob = encode_state(_state(9))
    _publish(t, blob)
    conn = _joined(address, patience_s=0.5)
    try:
        task = conn.poll()
        assert task.blob_crc32c is not None
        framed = t.payloads.get("blob1")
        frame = bytearray(framed.frames[1])
        frame[framed._starts[1] + 3] ^= 0x10  # a bit flips in the coordinator's copy of chunk 1
        framed.frames[1] = bytes(frame)
        with pytest.raises(ProtocolError, match="failed its CRC-32C"):
            conn.fetch(task)
    finally:
        conn.leave()


def test_a_corrupted_upload_chunk_is_resent_under_crc32c(coordinator) -> None:
    t, address = coordinator
    _publish(t, encode_state(_state(1)))
    conn = _joined(address)
    try:
        task = conn.poll()
        assert task.blob_crc32c is not None
        flipped: list[int] = []

        def corrupt(offset: int, data: bytes) -> bytes:
            if offset > 0 and not flipped:
                flipped.append(offset)
                return bytes([data[0] ^ 0x40]) + data[1:]
            return data

        conn.chunk_hook = corrupt
        payload = encode_state(_state(2))
        assert conn.push(task, payload, 10, {}) == (True, "")
        ev = t.next_event(5)
        assert isinstance(ev, TaskResult) and torch.equal(ev.delta["a.weight"], _state(2)["a.weight"])
        assert t.stats()["corrupt_chunks"] == 1 and conn.bytes_resent > 0
    finally:
        conn.leave()


def test_mixed_up_algorithms_are_refused(coordinator) -> None:
    """A crc32c header with CRC-32 chunks (or the reverse) is malformed, whatever the values."""
    t, address = coordinator
    _publish(t, b"g")
    raw = RawClient(address, "w")
    try:
        raw.join()
        reply = raw.poll()
        while reply.WhichOneof("kind") != "task":
            reply = raw.poll()
        task = reply.task
        payload = encode_state(_state(0))
        with pytest.raises(grpc.RpcError) as err:
            raw.push(task.task_id, task.client_id, payload, chunk=CHUNK, sha256=b"", crc32c=crc32c.crc32c(payload))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no crc32c" in err.value.details()
    finally:
        raw.close()
