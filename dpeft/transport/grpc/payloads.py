"""Published payloads as the gRPC coordinator serves them: framed, with chunk CRCs computed once.

A round's global is published once and downloaded by every worker, so per-download work is
done at publish instead: the chunk CRCs are computed once (CRC-32C at publish, CRC-32 for older
workers on their first fetch) and an in-memory payload is kept as its ready-made response
frames (:class:`FramedBlob`), so a current worker's download costs the coordinator no copy of
its own and no checksum. Chunks are cut on a fixed grid of ``chunk_bytes`` (a download resuming
off the grid gets one short chunk first). A :class:`~dpeft.codec.spool.SpooledBlob` (large
adapters) stays in its file and is served chunk by chunk.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from dpeft.codec.crc import CRC32, CRC32C, CrcAlgorithm, chunk_crcs, combine_chunks
from dpeft.codec.spool import SpooledBlob, pread_exact, write_all
from dpeft.codec.spool_pool import Lease, open_file
from dpeft.transport import serde
from dpeft.transport.base import Blob


class FramedBlob:
    """An in-memory payload kept as the FetchBlob responses that carry it: one BlobChunk frame
    (wire bytes, with its CRC-32C) per ``step`` bytes, built once when the payload is published.
    A current worker's download of a chunk on the grid is that frame, handed to gRPC as is: no
    serialization copy per worker. Memory is the payload's (the caller's copy is not kept);
    :meth:`read` views the data inside the frames."""

    def __init__(self, payload: bytes | memoryview, step: int) -> None:
        view = memoryview(payload).cast("B")
        self.size = len(view)
        self.step = step
        self.crc32c = chunk_crcs(view, step, CRC32C.fn)
        frames = [serde.blob_chunk_frame(serde.BlobPiece(i * step, view[i * step : (i + 1) * step], crc32c=c)) for i, c in enumerate(self.crc32c)]
        self.frames = [f for f, _ in frames]
        self._starts = [start for _, start in frames]

    def __len__(self) -> int:
        return self.size

    def frame(self, index: int) -> bytes:
        """The response frame of chunk ``index``."""
        return self.frames[index]

    def read(self, offset: int, length: int) -> bytes | memoryview:
        """``length`` bytes from ``offset`` (fewer at the end): a view when they lie in one chunk."""
        end = min(self.size, offset + length)
        if end <= offset:
            return b""
        i = offset // self.step
        if end <= (i + 1) * self.step:
            at = self._starts[i] + offset - i * self.step
            return memoryview(self.frames[i])[at : at + end - offset]
        pieces = []
        while offset < end:
            stop = min(end, (offset // self.step + 1) * self.step)
            pieces.append(self.read(offset, stop - offset))
            offset = stop
        return b"".join(pieces)


class FramedSpool:
    """A spooled payload rewritten once, when it is published, as its FetchBlob response frames
    in a spool file of its own (one chunk in memory at a time): a current worker's download of
    a chunk on the grid is then one read of its ready-made frame, where framing it on the fly
    costs a second copy per chunk and per worker. Needs the chunk CRC-32Cs on the grid (known
    without reading the file: :meth:`SpooledBlob.chunk_crc32c`)."""

    def __init__(self, blob: SpooledBlob, step: int, crc32c: list[int]) -> None:
        self.size = len(blob)
        self.step = step
        self.crc32c = crc32c
        self._fh = open_file(blob.directory, "dpeft-frames-", self.size)
        self._where: list[tuple[int, int, int]] = []  # per frame: file offset, length, where its data starts
        pos = 0
        for i, c in enumerate(crc32c):
            frame, start = serde.blob_chunk_frame(serde.BlobPiece(i * step, blob.read(i * step, step), crc32c=c))
            write_all(self._fh, frame)
            self._where.append((pos, len(frame), start))
            pos += len(frame)
        Lease(self, blob.directory, self._fh)

    def __len__(self) -> int:
        return self.size

    def frame(self, index: int) -> bytes:
        """The response frame of chunk ``index``, as published."""
        pos, length, _ = self._where[index]
        return pread_exact(self._fh.fileno(), length, pos)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the payload from ``offset`` (fewer at the end), read from the frames' data."""
        end = min(self.size, offset + length)
        pieces = []
        while offset < end:
            i = offset // self.step
            stop = min(end, (i + 1) * self.step)
            pos, _, start = self._where[i]
            pieces.append(pread_exact(self._fh.fileno(), stop - offset, pos + start + offset - i * self.step))
            offset = stop
        return b"".join(pieces)


Served = Blob | FramedBlob | FramedSpool


def blob_piece(blob: Served, start: int, length: int) -> bytes | memoryview:
    """``length`` bytes of a published payload from ``start``: a view of an in-memory payload,
    or one copy read from a spooled one's file."""
    if isinstance(blob, SpooledBlob | FramedBlob | FramedSpool):
        return blob.read(start, length)
    return memoryview(blob)[start : start + length]


class ChunkCrcs:
    """The chunk CRCs of one published payload on the grid of ``step`` bytes, computed once and
    shared by every download of it: CRC-32C (and its whole-payload value, for
    ``TrainTask.blob_crc32c``) at publish, CRC-32 (zlib) only when an older worker asks.

    A :class:`FramedBlob` or :class:`FramedSpool` (how a spooled global on a grid of whole blocks
    is served) brings its chunk CRC-32Cs (taken when it was framed); a spooled payload
    carries its whole CRC-32C and per-block CRC-32Cs (computed while it was written), from which
    the chunk CRCs of a grid of whole blocks follow (other grids fill them in as chunks are first
    served: the read happens anyway); anything else is scanned here. Concurrent fillers write
    the same values."""

    def __init__(self, blob: Served, step: int) -> None:
        self.step = step
        self.size = len(blob)
        n = -(-self.size // step)
        whole = blob.crc32c if isinstance(blob, SpooledBlob) else None
        if isinstance(blob, FramedBlob | FramedSpool) and blob.step == step:
            crcs: list[int | None] = list(blob.crc32c)
            whole = self._whole(blob.crc32c)
        elif whole is None:
            if isinstance(blob, SpooledBlob | FramedBlob | FramedSpool):  # chunk by chunk (memory stays one chunk)
                scanned = [CRC32C.fn(blob.read(i * step, step)) for i in range(n)]
            else:
                scanned = list(chunk_crcs(blob, step, CRC32C.fn))
            crcs = list(scanned)
            whole = self._whole(scanned)
        else:
            known = blob.chunk_crc32c(step) if isinstance(blob, SpooledBlob) else None
            crcs = list(known) if known is not None else [None] * n
        self.whole_crc32c: int = whole
        self.by_algo: dict[str, list[int | None]] = {CRC32C.name: crcs}

    def _whole(self, crcs: Sequence[int]) -> int:
        """The payload's CRC-32C from its chunk CRC-32Cs on the grid."""
        return combine_chunks(((c, min(self.step, self.size - i * self.step)) for i, c in enumerate(crcs)), poly=CRC32C.poly)

    def get(self, algo: CrcAlgorithm, index: int, data: bytes | memoryview) -> int:
        """The ``algo`` CRC of chunk ``index`` (whose bytes are ``data``), computed on first use."""
        crcs = self.by_algo.get(algo.name)
        if crcs is None:
            crcs = self.by_algo.setdefault(algo.name, [None] * len(self.by_algo[CRC32C.name]))
        crc = crcs[index]
        if crc is None:
            crc = crcs[index] = algo.fn(data)
        return crc


class PayloadStore:
    """Published payloads by blob id (in publish order) with their chunk CRCs; thread-safe."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self._lock = threading.Lock()
        self._blobs: OrderedDict[str, Served] = OrderedDict()
        self._crcs: dict[str, ChunkCrcs] = {}

    def publish(self, blob_id: str, payload: Blob) -> None:
        """An in-memory payload is kept as its response frames (:class:`FramedBlob`: one CRC-32C
        pass and one copy now, instead of a serialization copy per worker's download; the
        caller's bytes are not kept, so the payload is held once); a spooled one stays in its
        file. The work is done outside the lock."""
        served: Served
        if isinstance(payload, SpooledBlob):
            known = payload.chunk_crc32c(self.chunk_bytes)
            served = payload if known is None else FramedSpool(payload, self.chunk_bytes, known)
        else:
            served = FramedBlob(payload, self.chunk_bytes)
        crcs = ChunkCrcs(served, self.chunk_bytes)
        with self._lock:
            self._blobs[blob_id] = served
            self._crcs[blob_id] = crcs

    def get(self, blob_id: str) -> Served | None:
        return self._blobs.get(blob_id)

    def names(self) -> list[str]:
        """Blob ids, oldest first."""
        with self._lock:
            return list(self._blobs)

    def drop(self, blob_ids: list[str]) -> None:
        with self._lock:
            for name in blob_ids:
                self._blobs.pop(name, None)
                self._crcs.pop(name, None)

    def crcs_of(self, blob_id: str, blob: Served) -> ChunkCrcs:
        """The chunk CRC cache of a published payload (built again, not kept, when a prune raced this read)."""
        crcs = self._crcs.get(blob_id)
        if crcs is None or crcs.size != len(blob):
            crcs = ChunkCrcs(blob, self.chunk_bytes)
            with self._lock:
                if self._blobs.get(blob_id) is blob:  # not pruned meanwhile
                    self._crcs[blob_id] = crcs
        return crcs

    def whole_crc32c(self, blob_id: str) -> int | None:
        """The CRC-32C of a published payload (None when it is not published)."""
        blob = self._blobs.get(blob_id)
        return None if blob is None else self.crcs_of(blob_id, blob).whole_crc32c

    def chunks(self, blob_id: str, blob: Served, start: int, crc32c: bool) -> Iterator[tuple[int, serde.BlobPiece | bytes]]:
        """The FetchBlob responses of ``blob`` from byte ``start``: (data bytes, frame or piece)
        per chunk on the grid (a resume off the grid gets one short chunk first), with CRC-32C
        chunk checksums (``crc32c``) or CRC-32 ones (older workers)."""
        crcs = self.crcs_of(blob_id, blob)
        step = crcs.step
        algo = CRC32C if crc32c else CRC32
        size = len(blob)
        framed = crc32c and isinstance(blob, FramedBlob | FramedSpool) and blob.step == step
        while start < size:
            end = min(size, (start // step + 1) * step)
            if framed and start % step == 0:  # the frame made at publish: nothing to frame or hash
                yield end - start, blob.frame(start // step)  # type: ignore[union-attr]
                start = end
                continue
            data = blob_piece(blob, start, end - start)
            crc = crcs.get(algo, start // step, data) if start % step == 0 else algo.fn(data)
            yield len(data), (serde.BlobPiece(start, data, crc32c=crc) if crc32c else serde.BlobPiece(start, data, crc32=crc))
            start = end
