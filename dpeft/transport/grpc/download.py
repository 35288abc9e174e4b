"""A worker's download of a published payload, into one buffer reused round after round.

The FetchBlob stream is written chunk by chunk into one preallocated buffer (no second copy,
even for a multi-GiB global); each chunk is checked against its CRC-32C (CRC-32 from an older
coordinator) and the whole payload against the task's CRC, combined from the chunk CRCs
(:mod:`dpeft.codec.crc`: no second pass). A download that breaks off or meets a corrupted
chunk resumes from the offset reached. :class:`Downloads` is a part of
:class:`~dpeft.transport.grpc.worker.GrpcWorkerConnection`.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc

from dpeft.codec.crc import CRC32, CRC32C, CrcAlgorithm, crc32_combine
from dpeft.codec.tensors import write_into, zeroed_buffer
from dpeft.errors import DpeftError, PayloadGone, ProtocolError
from dpeft.transport import serde
from dpeft.transport.base import TrainTask
from dpeft.transport.grpc.channel import backoff_s
from dpeft.transport.messages import FetchAsk

log = logging.getLogger("dpeft.transport.grpc")

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


def retryable(exc: grpc.RpcError, codes: set[grpc.StatusCode] = RETRYABLE) -> bool:
    """Whether a failed call may succeed when tried again: its code is one of ``codes``, and it
    is not a message over a channel's size limit (RESOURCE_EXHAUSTED too, but it fails again
    the same way)."""
    return exc.code() in codes and "larger than max" not in (exc.details() or "")


class _CorruptChunk(Exception):
    """A downloaded chunk failed its CRC (fetched again from its offset)."""


def wire_crc(task: TrainTask) -> CrcAlgorithm:
    """The checksum for transfers of ``task``: CRC-32C when its coordinator announced it (the
    task carries ``blob_crc32c``), else CRC-32 (zlib)."""
    return CRC32C if task.blob_crc32c is not None else CRC32


class Downloads:
    """The download half of a worker connection (mixed into ``GrpcWorkerConnection``, which
    provides the channel, the session and the retry plumbing used here)."""

    _rpc: dict[str, Callable[..., Any]]
    _cache: tuple[str, bytes | bytearray | mmap.mmap] | None
    worker_id: str
    session: str
    patience_s: float
    bytes_down: int

    def _md(self) -> tuple[tuple[str, str], ...]:  # pragma: no cover - provided by the connection
        raise NotImplementedError

    def _final(self, exc: grpc.RpcError) -> None:  # pragma: no cover - provided by the connection
        raise NotImplementedError

    def _rejoin(self) -> None:  # pragma: no cover - provided by the connection
        raise NotImplementedError

    def fetch(self, task: TrainTask) -> bytes | bytearray | mmap.mmap:
        """The payload of ``task``: streamed into one preallocated buffer (no second copy, even
        for a multi-GiB global), each chunk checked against its CRC-32C (CRC-32 from an older
        coordinator) and the whole against the task's ``blob_crc32c`` / ``blob_crc32`` (combined
        from the chunk CRCs) or, without either, its sha256; resumed from the offset reached
        after a drop or a corrupted chunk. The previous payload's buffer is overwritten when it
        has the same size and the caller has let go of it (:meth:`_reusable_buffer`)."""
        if self._cache is not None and self._cache[0] == task.blob_id:
            return self._cache[1]
        buf = self._reusable_buffer(task.blob_size)  # never hold two payloads at once
        if buf is None:
            buf = zeroed_buffer(task.blob_size)
        algo = wire_crc(task)
        crc_fn, poly, use_c = algo.fn, algo.poly, algo == CRC32C
        expected = task.blob_crc32c if use_c else task.blob_crc32
        digest = hashlib.sha256() if expected is None else None
        crc = 0
        filled = 0
        attempts = 0
        start = time.time()
        while filled < task.blob_size:
            try:
                req = serde.fetch_to_proto(FetchAsk(self.worker_id, self.session, task.blob_id, filled, use_c))
                for chunk in self._rpc["FetchBlob"](req, timeout=600, metadata=self._md()):
                    data = chunk.data  # a view into the received frame
                    if chunk.offset != filled or filled + len(data) > task.blob_size:
                        raise ProtocolError("payload chunk out of order or beyond the declared size")
                    got = crc_fn(data)
                    want = chunk.crc32c if use_c else chunk.crc32  # never the other algorithm's field
                    if want is not None and got != want:
                        raise _CorruptChunk(f"payload chunk at offset {filled} failed its {algo.name}")
                    write_into(buf, filled, data)
                    if digest is not None:
                        digest.update(data)
                    crc = crc32_combine(crc, got, len(data), poly)
                    filled += len(data)
                    self.bytes_down += len(data)
            except (grpc.RpcError, _CorruptChunk) as exc:
                if isinstance(exc, grpc.RpcError):
                    self._final(exc)
                    if exc.code() == grpc.StatusCode.ABORTED:
                        self._rejoin()
                        continue
                    if exc.code() == grpc.StatusCode.NOT_FOUND:
                        raise PayloadGone(f"payload {task.blob_id!r} of task {task.task_id} is no longer served ({exc.details()})") from None
                    if not retryable(exc):
                        raise DpeftError(f"download of payload {task.blob_id!r} failed: {exc.code().name}: {exc.details()}") from None
                if time.time() - start > self.patience_s:
                    if isinstance(exc, grpc.RpcError):  # the coordinator stayed unreachable (or busy)
                        raise ConnectionError(
                            f"download of payload {task.blob_id!r} failed for {self.patience_s:.0f}s ({exc.code().name}: {exc.details()})"
                        ) from None
                    raise ProtocolError(f"download of {task.blob_id}: {exc} (again after {attempts} retries)") from None
                log.info("download of %s interrupted at %d bytes (%s); resuming", task.blob_id, filled, exc)
                time.sleep(backoff_s(attempts))
                attempts += 1
                continue  # resume from the offset reached
            if filled < task.blob_size:
                raise ProtocolError(f"payload ended at {filled} of {task.blob_size} bytes")
        if digest is not None and digest.digest() != task.blob_sha256:
            raise ProtocolError("payload checksum mismatch")
        if expected is not None and crc != expected:
            raise ProtocolError(f"payload {algo.name} mismatch")
        self._cache = (task.blob_id, buf)
        return buf

    def _reusable_buffer(self, size: int) -> bytearray | mmap.mmap | None:
        """The previous payload's buffer, to be overwritten by the next download, when it has
        ``size`` bytes and nothing but this connection refers to it (no caller variable, no
        tensor or memoryview viewing it: each of those holds a reference); else None (the old
        buffer is let go first, so two payloads are never held by this connection).

        Every round's global adapter has the same size: reusing its buffer spares the download
        the kernel's page faults of fresh memory, which cost more than the copy itself."""
        cached, self._cache = self._cache, None
        if cached is None:
            return None
        old = cached[1]
        del cached
        # references to ``old`` now: this frame's and getrefcount's argument
        if isinstance(old, mmap.mmap | bytearray) and len(old) == size and sys.getrefcount(old) == 2:
            return old
        return None
