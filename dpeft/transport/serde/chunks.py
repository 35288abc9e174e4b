"""The bulk messages of the coordinator protocol, on a zero-copy path.

The two bulk messages (``BlobChunk`` down, ``UpdateChunk`` carrying a ``DataChunk`` up) also
have a zero-copy path used as the gRPC (de)serializers of FetchBlob and PushUpdate: a chunk is
written as protobuf wire bytes straight from a memoryview of the payload (one copy, where a
message object costs three: into the message, into the serialization, out of a ``bytes``
slice), and read back as a :class:`BlobPiece` / :class:`DataPiece` whose ``data`` is a
memoryview into the received frame (no copy; the generated parser and each ``.data`` access
copy). The wire format is unchanged protobuf, so either end may use the generated classes;
anything but the canonical chunk layout (a header, the legacy ``data`` field, unknown or
repeated fields) falls back to the generated parser, which also refuses malformed frames.

Chunk checksums: a chunk carries either ``crc32`` (CRC-32, zlib; older peers) or ``crc32c``
(CRC-32C, the default between current peers), in separate fields, so a value is only ever
checked with the algorithm it was computed with (:func:`checked_chunk` takes the upload's
algorithm and refuses a chunk carrying the other one).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from dpeft._proto.dpeft.v1 import coordinator_pb2 as pb
from dpeft.codec.crc import CRC32, CRC32C, CrcAlgorithm
from dpeft.errors import ProtocolError


class BlobPiece(NamedTuple):
    """One FetchBlob chunk: ``data`` (bytes or a memoryview) at byte ``offset`` of the payload,
    with its CRC-32 or its CRC-32C (None where the coordinator sends none)."""

    offset: int
    data: bytes | memoryview
    crc32: int | None = None
    crc32c: int | None = None


class DataPiece(NamedTuple):
    """One upload chunk (``UpdateChunk.chunk``): data at ``offset`` with its CRC-32 (0 when it
    carries a CRC-32C instead) or its CRC-32C (None = none)."""

    offset: int
    data: bytes | memoryview
    crc32: int
    crc32c: int | None = None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or over-long varint")
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, pos
        shift += 7


def _fields(buf: memoryview, pos: int, end: int) -> dict[int, Any]:
    """Fields of a flat message: number -> int (varint) or (start, end) (length-delimited).

    Raises ValueError for anything else (other wire types, repeated fields, bad lengths): the
    caller then falls back to the generated parser."""
    out: dict[int, Any] = {}
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number in out:
            raise ValueError("repeated field")
        if wire == 0:
            out[number], pos = _read_varint(buf, pos, end)
        elif wire == 2:
            n, pos = _read_varint(buf, pos, end)
            if pos + n > end:
                raise ValueError("length beyond the frame")
            out[number] = (pos, pos + n)
            pos += n
        else:
            raise ValueError("unexpected wire type")
    return out


def encode_blob_chunk(msg: BlobPiece | pb.BlobChunk | bytes) -> bytes:
    """FetchBlob response serializer: a BlobChunk's (canonical) wire bytes in one copy of the data
    (``bytes`` are a frame made beforehand by :func:`blob_chunk_frame`, passed through as is)."""
    if isinstance(msg, bytes):
        return msg
    if not isinstance(msg, BlobPiece):
        return msg.SerializeToString()
    return blob_chunk_frame(msg)[0]


def blob_chunk_frame(msg: BlobPiece) -> tuple[bytes, int]:
    """A BlobChunk's canonical wire bytes and where its ``data`` starts in them (so a payload kept
    as frames can also be read back without a copy)."""
    head = (b"\x08" + _varint(msg.offset) if msg.offset else b"") + (b"\x12" + _varint(len(msg.data)) if len(msg.data) else b"")
    tail = b"\x18" + _varint(msg.crc32) if msg.crc32 is not None else b""
    if msg.crc32c is not None:
        tail += b"\x20" + _varint(msg.crc32c)
    return b"".join((head, msg.data, tail)), len(head)


def decode_blob_chunk(raw: bytes) -> BlobPiece:
    """FetchBlob response deserializer (worker side): data is a view into ``raw``."""
    view = memoryview(raw)
    try:
        f = _fields(view, 0, len(view))
        offset, data, crc, crcc = f.get(1, 0), f.get(2, (0, 0)), f.get(3), f.get(4)
        if set(f) <= {1, 2, 3, 4} and isinstance(offset, int) and isinstance(data, tuple) and _u32(crc) and _u32(crcc):
            if offset < 1 << 63:
                return BlobPiece(offset, view[data[0] : data[1]], crc, crcc)
    except ValueError:
        pass
    msg = pb.BlobChunk.FromString(raw)
    return BlobPiece(msg.offset, msg.data, msg.crc32 if msg.HasField("crc32") else None, msg.crc32c if msg.HasField("crc32c") else None)


def _u32(v: Any) -> bool:
    """An absent field (None) or an int that fits a uint32."""
    return v is None or (isinstance(v, int) and v < 1 << 32)


def encode_update_part(msg: DataPiece | pb.UpdateChunk) -> bytes:
    """PushUpdate request serializer: a DataPiece as ``UpdateChunk{chunk: DataChunk}`` in one copy."""
    if not isinstance(msg, DataPiece):
        return msg.SerializeToString()
    head = (b"\x08" + _varint(msg.offset) if msg.offset else b"") + (b"\x12" + _varint(len(msg.data)) if len(msg.data) else b"")
    tail = b"\x18" + _varint(msg.crc32) if msg.crc32 else b""
    if msg.crc32c is not None:
        tail += b"\x20" + _varint(msg.crc32c)
    inner = len(head) + len(msg.data) + len(tail)
    return b"".join((b"\x1a" + _varint(inner), head, msg.data, tail))


def decode_update_part(raw: bytes) -> DataPiece | pb.UpdateChunk:
    """PushUpdate request deserializer (coordinator side): a data chunk as a DataPiece viewing
    ``raw``; a header (or anything unusual) as the generated message (DecodeError if invalid)."""
    view = memoryview(raw)
    try:
        outer = _fields(view, 0, len(view))
        if set(outer) == {3} and isinstance(outer[3], tuple):
            f = _fields(view, *outer[3])
            offset, crc, crcc = f.get(1, 0), f.get(3, 0), f.get(4)
            data = f.get(2, (0, 0))
            if set(f) <= {1, 2, 3, 4} and isinstance(offset, int) and isinstance(data, tuple) and _u32(crc) and _u32(crcc):
                if offset < 1 << 63:
                    return DataPiece(offset, view[data[0] : data[1]], crc, crcc)
    except ValueError:
        pass
    return pb.UpdateChunk.FromString(raw)


def data_chunk_to_proto(offset: int, data: bytes, algo: CrcAlgorithm = CRC32) -> pb.UpdateChunk:
    """One upload chunk with its offset and CRC-32 (or CRC-32C, with ``algo=CRC32C``)."""
    if algo == CRC32C:
        return pb.UpdateChunk(chunk=pb.DataChunk(offset=offset, data=data, crc32c=algo.fn(data)))
    return pb.UpdateChunk(chunk=pb.DataChunk(offset=offset, data=data, crc32=algo.fn(data)))


def data_piece(offset: int, data: bytes | memoryview, algo: CrcAlgorithm = CRC32) -> DataPiece:
    """An upload chunk with its CRC-32 or CRC-32C (for :func:`encode_update_part`)."""
    if algo == CRC32C:
        return DataPiece(offset, data, 0, algo.fn(data))
    return DataPiece(offset, data, algo.fn(data))


def data_chunk_from_proto(msg: pb.UpdateChunk | DataPiece, expected_offset: int, algo: CrcAlgorithm = CRC32) -> tuple[bytes | memoryview, bool]:
    """(bytes, crc_ok) of a data piece; raises ProtocolError for a header or a misplaced chunk.

    Legacy ``data`` pieces carry no checksum (crc_ok is True)."""
    data, crc_ok, _ = checked_chunk(msg, expected_offset, algo)
    return data, crc_ok


def checked_chunk(msg: pb.UpdateChunk | DataPiece, expected_offset: int, algo: CrcAlgorithm = CRC32) -> tuple[bytes | memoryview, bool, int]:
    """(bytes, crc_ok, the CRC the data has) of a data piece, as :func:`data_chunk_from_proto`.

    ``algo`` is the upload's algorithm (its header's): a chunk must carry that checksum, in its
    own field (``crc32c`` for CRC-32C, ``crc32`` otherwise); one carrying the other algorithm's
    is a ProtocolError, never compared."""
    if isinstance(msg, DataPiece):
        offset, data, crc32, crc32c = msg
    else:
        kind = msg.WhichOneof("part")
        if kind == "data":
            data = msg.data
            return data, True, algo.fn(data)
        if kind != "chunk":
            raise ProtocolError("a second header inside one upload" if kind == "header" else "an empty upload message")
        offset, data, crc32 = msg.chunk.offset, msg.chunk.data, msg.chunk.crc32
        crc32c = msg.chunk.crc32c if msg.chunk.HasField("crc32c") else None
    if offset != expected_offset:
        raise ProtocolError(f"chunk at offset {offset}, expected {expected_offset}")
    if algo == CRC32C:
        if crc32c is None:
            raise ProtocolError(f"chunk at offset {offset} has no crc32c, but the upload's header declared CRC-32C")
        want = crc32c
    else:
        if crc32c is not None:
            raise ProtocolError(f"chunk at offset {offset} carries a crc32c, but the upload's header did not declare CRC-32C")
        want = crc32
    crc = algo.fn(data)
    return data, crc == want, crc
