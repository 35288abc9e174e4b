"""A spooled global is served from a file of ready-made response frames, over real gRPC on loopback."""

from __future__ import annotations

import hashlib
import os
import zlib
from collections import OrderedDict

import crc32c
import pytest
import torch
from edge_testlib import RawClient

from dpeft._proto.dpeft.v1 import coordinator_pb2 as pb
from dpeft.codec.crc import CRC32
from dpeft.codec.spool import BLOCK, SpooledBlob, SpoolPolicy
from dpeft.codec.tensors import Limits, StateDecoder
from dpeft.config import TransportConfig
from dpeft.transport import serde
from dpeft.transport.base import TrainTask
from dpeft.transport.grpc import FramedSpool, GrpcCoordinatorTransport, GrpcWorkerConnection

STEP = 2 * BLOCK


@pytest.fixture
def coordinator():
    t = GrpcCoordinatorTransport(
        "127.0.0.1:0", TransportConfig(chunk_bytes=STEP, poll_timeout_s=0.2), run_id="fs", config_yaml="{}", num_clients=1,
        decoder_factory=lambda tid, cid: StateDecoder(OrderedDict([("w", ((1,), torch.float32))]), Limits()),
    )
    address = t.start()
    yield t, address
    t.shutdown("done", grace_s=0.2)


def test_a_spooled_global_is_served_as_published_frames_and_fetched_intact(coordinator, tmp_path) -> None:
    t, address = coordinator
    payload = os.urandom(2 * STEP + BLOCK + 123)  # two whole chunks and a short one
    blob = SpooledBlob.write([memoryview(payload)[:7], memoryview(payload)[7:]], SpoolPolicy(0, tmp_path))
    t.publish_blob("g", blob)
    t.submit([TrainTask("t1", 1, 0, "g", len(payload), hashlib.sha256(payload).digest(), blob_crc32=zlib.crc32(payload))], {})
    served = t.payloads.get("g")
    assert isinstance(served, FramedSpool) and len(served) == len(payload)
    frames = [serde.blob_chunk_frame(serde.BlobPiece(i, payload[i : i + STEP], crc32c=crc32c.crc32c(payload[i : i + STEP])))[0] for i in range(0, len(payload), STEP)]
    assert [served.frame(i) for i in range(len(frames))] == frames  # exactly what framing each download would send
    raw = RawClient(address, "raw")
    conn = GrpcWorkerConnection(address, chunk_bytes=STEP, patience_s=5, heartbeat=False)
    try:
        raw.join()
        req = pb.FetchRequest(worker_id="raw", session=raw.session, blob_id="g", crc32c=True)
        assert [c.SerializeToString() for c in raw.stub.FetchBlob(req, timeout=10, metadata=raw.md)] == frames
        for offset in (1, STEP - 5, STEP, 2 * STEP + 100):  # resumes, on and off the grid
            req = pb.FetchRequest(worker_id="raw", session=raw.session, blob_id="g", offset=offset, crc32c=True)
            chunks = list(raw.stub.FetchBlob(req, timeout=10, metadata=raw.md))
            assert b"".join(c.data for c in chunks) == payload[offset:]
            assert all(c.crc32c == crc32c.crc32c(c.data) for c in chunks)
        req = pb.FetchRequest(worker_id="raw", session=raw.session, blob_id="g")  # an older worker: CRC-32
        chunks = list(raw.stub.FetchBlob(req, timeout=10, metadata=raw.md))
        assert b"".join(c.data for c in chunks) == payload and [c.crc32 for c in chunks] == [zlib.crc32(c.data) for c in chunks]
        assert t.payloads.crcs_of("g", served).by_algo[CRC32.name] == [c.crc32 for c in chunks]
        conn.join("w", None)
        task = conn.poll()
        assert task.blob_crc32c == crc32c.crc32c(payload)
        assert bytes(conn.fetch(task)) == payload  # the worker checks every chunk and the whole
    finally:
        raw.close()
        conn.leave()


def test_a_grid_that_is_not_whole_blocks_serves_the_spooled_file_directly(tmp_path) -> None:
    t = GrpcCoordinatorTransport(
        "127.0.0.1:0", TransportConfig(chunk_bytes=BLOCK + 4096, poll_timeout_s=0.2), run_id="fs", config_yaml="{}", num_clients=1,
        decoder_factory=lambda tid, cid: StateDecoder(OrderedDict([("w", ((1,), torch.float32))]), Limits()),
    )
    try:
        payload = os.urandom(3 * BLOCK)
        t.publish_blob("g", SpooledBlob.write([payload], SpoolPolicy(0, tmp_path)))
        served = t.payloads.get("g")
        assert isinstance(served, SpooledBlob) and served.read(0, len(payload)) == payload
    finally:
        t.shutdown("done", grace_s=0.2)
