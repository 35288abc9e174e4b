"""Property tests of the upload path of the servicer (serde + validating decoder), without a
network: random bytes, random header fields, truncated and bit-flipped payloads never crash
the coordinator (only a clean gRPC abort or an ack) and never allocate beyond the limits."""

from __future__ import annotations

import hashlib
import zlib
from collections import OrderedDict

import crc32c
import grpc
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpeft._proto.dpeft.v1 import coordinator_pb2 as pb
from dpeft.codec import encode_state
from dpeft.codec.crc import CRC32, CRC32C, CrcAlgorithm
from dpeft.codec.tensors import Limits, StateDecoder
from dpeft.config import TransportConfig
from dpeft.state import AdapterState
from dpeft.transport import serde
from dpeft.transport.grpc.server import GrpcCoordinatorTransport
from dpeft.transport.grpc.servicer import CoordinatorServicer
from dpeft.transport.registry import WorkerRecord

SCHEMA = OrderedDict([("a", ((8, 16), torch.float32)), ("b", ((4,), torch.float16))])
LIMIT = 4096
ALLOCATED: list[int] = []


class _Abort(Exception):
    pass


class _Ctx:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None

    def invocation_metadata(self):
        return ()

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        assert isinstance(details, str) and details
        raise _Abort()

    def peer(self) -> str:
        return "fuzz"

    def is_active(self) -> bool:
        return True


class _RecordingDecoder(StateDecoder):
    def feed(self, chunk) -> None:  # noqa: ANN001
        super().feed(chunk)
        if self._data is not None:
            ALLOCATED.append(len(self._data))


def _transport() -> tuple[GrpcCoordinatorTransport, CoordinatorServicer]:
    t = GrpcCoordinatorTransport(
        "127.0.0.1:0", TransportConfig(max_update_bytes=LIMIT), run_id="fuzz", config_yaml="{}", num_clients=2,
        decoder_factory=lambda tid, cid: _RecordingDecoder(SCHEMA, Limits(max_total_bytes=LIMIT, max_header_bytes=2048)),
    )
    t.registry.add(WorkerRecord("w", session="s", alive=True))
    return t, CoordinatorServicer(t)


TRANSPORT, SERVICER = _transport()
GOOD = encode_state(AdapterState(OrderedDict((k, torch.ones(s, dtype=d)) for k, (s, d) in SCHEMA.items()), {}))
OK_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS,
            grpc.StatusCode.ABORTED, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.PERMISSION_DENIED}


def _run(messages: list[pb.UpdateChunk]) -> grpc.StatusCode:
    TRANSPORT.uploads.reset()
    ALLOCATED.clear()
    ctx = _Ctx()
    try:
        ack = SERVICER.PushUpdate(iter(messages), ctx)
    except _Abort:
        assert ctx.code in OK_CODES, ctx.code
        code = ctx.code
    else:
        assert isinstance(ack, pb.UpdateAck)
        # OK = accepted; an upload that stopped early is acked as "incomplete" (kept for a resume)
        code = grpc.StatusCode.OK if ack.accepted else "incomplete"
        assert ack.accepted or (ack.reason == "incomplete" and ack.received < len(GOOD) + LIMIT)
    assert all(n <= LIMIT for n in ALLOCATED), ALLOCATED
    while TRANSPORT.next_event(0) is not None:
        pass
    return code


def _header(payload: bytes, **kw) -> pb.UpdateChunk:
    fields = dict(worker_id="w", session="s", task_id="t1", client_id=0, num_examples=3, size=len(payload), sha256=hashlib.sha256(payload).digest())
    fields.update(kw)
    return pb.UpdateChunk(header=pb.UpdateHeader(**fields))


def _chunks(payload: bytes, size: int, algo: CrcAlgorithm = CRC32) -> list[pb.UpdateChunk]:
    return [serde.data_chunk_to_proto(p, payload[p : p + size], algo) for p in range(0, len(payload), size)]


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_good_payload_is_accepted() -> None:
    assert _run([_header(GOOD), *_chunks(GOOD, 100)]) == grpc.StatusCode.OK
    # identified by its whole-payload CRC-32C (current workers) or CRC-32 (older ones) instead of sha256
    assert _run([_header(GOOD, sha256=b"", crc32c=crc32c.crc32c(GOOD)), *_chunks(GOOD, 100, CRC32C)]) == grpc.StatusCode.OK
    assert _run([_header(GOOD, sha256=b"", crc32=zlib.crc32(GOOD)), *_chunks(GOOD, 100)]) == grpc.StatusCode.OK
    # a chunk checked with the other algorithm is never accepted
    assert _run([_header(GOOD, sha256=b"", crc32c=crc32c.crc32c(GOOD)), *_chunks(GOOD, 100)]) == grpc.StatusCode.INVALID_ARGUMENT
    assert _run([_header(GOOD, sha256=b"", crc32=zlib.crc32(GOOD)), *_chunks(GOOD, 100, CRC32C)]) == grpc.StatusCode.INVALID_ARGUMENT


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_random_protobuf_frames(frames: list[bytes]) -> None:
    msgs = []
    for f in frames:
        try:
            msgs.append(pb.UpdateChunk.FromString(f))
        except DecodeError:
            continue  # gRPC itself refuses frames that do not parse
    _run(msgs)


@FUZZ
@given(st.binary(max_size=2 * LIMIT), st.integers(1, 512))
def test_random_payload_bytes(payload: bytes, chunk: int) -> None:
    assert _run([_header(payload), *_chunks(payload, chunk)]) != grpc.StatusCode.OK or payload == GOOD


@FUZZ
@given(st.data())
def test_truncated_and_bit_flipped_payloads(data: st.DataObject) -> None:
    payload = bytearray(GOOD)
    cut = data.draw(st.integers(0, len(payload)))
    flips = data.draw(st.lists(st.integers(0, len(payload) * 8 - 1), max_size=4))
    for bit in flips:
        payload[bit // 8] ^= 1 << (bit % 8)
    payload = bytes(payload[:cut] if data.draw(st.booleans()) else payload)
    honest_header = data.draw(st.booleans())
    header = _header(payload) if honest_header else _header(GOOD)
    code = _run([header, *_chunks(payload, data.draw(st.integers(1, 400)))])
    if payload != GOOD and code == grpc.StatusCode.OK:
        # only flips inside tensor data with an honest sha can pass; the update must still decode finitely
        assert honest_header and len(payload) == len(GOOD)


@FUZZ
@given(
    size=st.integers(-5, 1 << 40),
    offset=st.integers(-5, 1 << 40),
    num_examples=st.integers(-5, 1 << 40),
    sha=st.binary(max_size=40),
    task=st.text(max_size=300),
    worker=st.sampled_from(["w", "x", ""]),
    metrics=st.dictionaries(st.text(max_size=10), st.floats(allow_nan=True), max_size=5),
)
def test_random_header_fields(size, offset, num_examples, sha, task, worker, metrics) -> None:
    try:
        h = _header(GOOD, size=size, offset=offset, num_examples=num_examples, sha256=sha, task_id=task, worker_id=worker, metrics=metrics)
    except ValueError:
        return  # protobuf refuses out-of-range ints itself
    _run([h, *_chunks(GOOD, 256)])


def _agree(raw: bytes) -> None:
    """serde's zero-copy PushUpdate deserializer reads exactly what the generated parser reads."""
    try:
        ref = pb.UpdateChunk.FromString(raw)
    except DecodeError:
        ref = None
    try:
        got = serde.decode_update_part(raw)
    except DecodeError:
        got = None
    if ref is None or got is None:
        assert ref is None and got is None, (ref, got)
    elif isinstance(got, serde.DataPiece):
        assert ref.WhichOneof("part") == "chunk"
        ref_c = ref.chunk.crc32c if ref.chunk.HasField("crc32c") else None
        assert (ref.chunk.offset, ref.chunk.data, ref.chunk.crc32, ref_c) == (got.offset, bytes(got.data), got.crc32, got.crc32c)
    else:
        assert got == ref


@FUZZ
@given(st.binary(max_size=300))
def test_zero_copy_deserializer_on_random_frames(raw: bytes) -> None:
    _agree(raw)


@FUZZ
@given(st.integers(0, (1 << 63) - 1), st.binary(max_size=200), st.integers(0, (1 << 32) - 1), st.none() | st.integers(0, (1 << 32) - 1), st.data())
def test_zero_copy_serializers_round_trip_and_survive_bit_flips(offset: int, data: bytes, crc: int, crcc: int | None, flips: st.DataObject) -> None:
    raw = serde.encode_update_part(serde.DataPiece(offset, memoryview(data), crc, crcc))
    assert raw == pb.UpdateChunk(chunk=pb.DataChunk(offset=offset, data=data, crc32=crc, crc32c=crcc)).SerializeToString()
    _agree(raw)
    blob = serde.encode_blob_chunk(serde.BlobPiece(offset, memoryview(data)))
    back = serde.decode_blob_chunk(blob)
    assert (back.offset, bytes(back.data)) == (offset, data) and pb.BlobChunk.FromString(blob) == pb.BlobChunk(offset=offset, data=data)
    # a download chunk with either checksum: canonical protobuf, read back field for field
    for piece in (serde.BlobPiece(offset, memoryview(data), crc32=crc), serde.BlobPiece(offset, memoryview(data), crc32c=crc)):
        blob = serde.encode_blob_chunk(piece)
        assert blob == pb.BlobChunk(offset=offset, data=data, crc32=piece.crc32, crc32c=piece.crc32c).SerializeToString()
        back = serde.decode_blob_chunk(blob)
        assert (back.offset, bytes(back.data), back.crc32, back.crc32c) == (offset, data, piece.crc32, piece.crc32c)
    mutated = bytearray(raw)
    for bit in flips.draw(st.lists(st.integers(0, len(raw) * 8 - 1), max_size=3)):
        mutated[bit // 8] ^= 1 << (bit % 8)
    _agree(bytes(mutated[: flips.draw(st.integers(0, len(mutated)))]))
