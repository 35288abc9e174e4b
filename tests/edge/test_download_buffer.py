"""The worker's download buffer over real gRPC: reused for the next payload of the same size
only when nothing else refers to it (no caller variable, no tensor view), never overwritten
while in use, and the downloaded bytes are always the published ones."""

from __future__ import annotations

import hashlib
import zlib
from collections import OrderedDict

import pytest
import torch

from dpeft.codec import encode_state, tensors
from dpeft.codec.tensors import Limits, StateDecoder
from dpeft.config import TransportConfig
from dpeft.state import AdapterState
from dpeft.transport.base import TrainTask
from dpeft.transport.grpc import GrpcCoordinatorTransport, GrpcWorkerConnection, download

SCHEMA = OrderedDict([("w", ((96, 1024), torch.float32))])  # 384 KiB
CHUNK = 64 << 10


def _payload(seed: int, rows: int = 96) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return encode_state(AdapterState(OrderedDict([("w", torch.randn((rows, 1024), generator=g))]), {}))


@pytest.fixture
def pair():
    t = GrpcCoordinatorTransport(
        "127.0.0.1:0",
        TransportConfig(chunk_bytes=CHUNK, poll_timeout_s=0.2),
        run_id="buf",
        config_yaml="{}",
        num_clients=1,
        decoder_factory=lambda tid, cid: StateDecoder(SCHEMA, Limits(max_total_bytes=1 << 24)),
    )
    conn = GrpcWorkerConnection(t.start(), chunk_bytes=CHUNK, patience_s=10, heartbeat=False)
    conn.join("w0", None)
    yield t, conn
    conn.leave()
    t.shutdown("over", grace_s=0.1)


def _task_of(n: int, blob: bytes) -> TrainTask:
    return TrainTask(f"t{n}", 1, 0, f"b{n}", len(blob), hashlib.sha256(blob).digest(), blob_crc32=zlib.crc32(blob))


def _download(t: GrpcCoordinatorTransport, conn: GrpcWorkerConnection, n: int, blob: bytes):
    task = _task_of(n, blob)
    t.publish_blob(task.blob_id, blob)
    t.submit([task], {})
    got = conn.poll()
    while not isinstance(got, TrainTask):
        got = conn.poll()
    return conn.fetch(got)


def test_buffer_reused_only_when_released(pair, monkeypatch) -> None:
    t, conn = pair
    made: list[int] = []  # sizes of the buffers the connection allocated

    def counted(n: int):
        made.append(n)
        return tensors.zeroed_buffer(n)

    monkeypatch.setattr(download, "zeroed_buffer", counted)
    blobs = [_payload(i) for i in range(5)]
    held = _download(t, conn, 0, blobs[0])
    assert bytes(held) == blobs[0] and len(made) == 1
    second = _download(t, conn, 1, blobs[1])  # the first is still held: a new buffer, the old one untouched
    assert second is not held and bytes(held) == blobs[0] and bytes(second) == blobs[1] and len(made) == 2
    del second, held
    third = _download(t, conn, 2, blobs[2])  # released: its buffer is overwritten in place
    assert bytes(third) == blobs[2] and len(made) == 2
    view = torch.frombuffer(third, dtype=torch.uint8)  # a tensor viewing it keeps it in use
    del third
    fourth = _download(t, conn, 3, blobs[3])
    assert bytes(view.numpy()) == blobs[2] and bytes(fourth) == blobs[3] and len(made) == 3
    assert conn.fetch(_task_of(3, blobs[3])) is fourth  # the same payload again (a lockstep task): no download
    del view, fourth
    other = _payload(4, rows=64)  # another size: a buffer of that size
    fifth = _download(t, conn, 4, other)
    assert bytes(fifth) == other and made[-1] == len(other) and len(made) == 4
