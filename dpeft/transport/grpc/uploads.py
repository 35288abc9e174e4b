"""Resumable, checked uploads: the state machine behind PushUpdate and QueryUpload.

An upload feeds its chunks into a validating decoder supplied by the round engine (so nothing
is allocated before the header matches the adapter schema). Each chunk carries a CRC in the
header's algorithm (CRC-32C from current workers, CRC-32 from older ones); the whole payload is
checked by a running CRC combined from the chunk CRCs (no second pass), or by its sha256.
An upload that breaks off keeps its verified prefix, keyed by task id, for ``resume_window_s``;
a corrupted chunk is refused and re-sent from the verified offset. At most
``max_concurrent`` partial uploads are held (the oldest idle one is evicted).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dpeft.codec.crc import CRC32, CRC32C, CrcAlgorithm, crc32_combine
from dpeft.codec.tensors import StateDecoder
from dpeft.codec.validation import RunningCheck, check_norm, check_update
from dpeft.errors import RejectedUpdate
from dpeft.state import AdapterState
from dpeft.transport import serde
from dpeft.transport.base import DecoderFactory
from dpeft.transport.messages import UpdateHeader


class UploadConflict(Exception):
    """An upload cannot go on now; ``kind`` says why: ``offset`` (query and resume elsewhere) or ``busy`` (retry)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class CorruptChunk(Exception):
    """A chunk failed its CRC: the upload keeps its verified prefix (resume from ``offset``)."""

    def __init__(self, offset: int, algo: CrcAlgorithm) -> None:
        super().__init__(f"chunk at offset {offset} failed its {algo.name}; resume from {offset}")
        self.offset = offset


@dataclass
class Upload:
    """The verified prefix of one task's upload (what a resumed upload continues).

    The whole payload is checked against the header's ``crc32c`` or ``crc32`` (the running CRC
    ``crc`` in that algorithm, combined from the verified chunk CRCs: no second pass) or, from
    workers that send one, its ``sha256`` (hashed as chunks arrive)."""

    header: UpdateHeader
    decoder: StateDecoder
    crc: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    received: int = 0
    resumed: int = 0
    updated: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock)
    checked_tensors: bool = False
    content: RunningCheck | None = field(init=False)

    def __post_init__(self) -> None:
        # finiteness and norm as the chunks arrive; only a plain payload is the update itself (a
        # codec's wire form, e.g. int8 codes and scales, is checked once decoded, in complete)
        self.content = RunningCheck(self.decoder) if isinstance(self.decoder, StateDecoder) else None

    @property
    def worker_id(self) -> str:
        return self.header.worker_id

    @property
    def size(self) -> int:
        return self.header.size

    @property
    def algo(self) -> CrcAlgorithm:
        """The upload's checksum (every chunk's and the whole payload's): its header's choice."""
        return CRC32C if self.header.crc32c is not None else CRC32

    def continued_by(self, header: UpdateHeader) -> bool:
        """Whether ``header`` resumes this upload (same worker, task, size and checksums)."""
        h = self.header
        return (h.worker_id, h.client_id, h.size, h.sha256, h.crc32, h.crc32c) == (
            header.worker_id,
            header.client_id,
            header.size,
            header.sha256,
            header.crc32,
            header.crc32c,
        )

    def receive(self, messages: Iterable[Any], max_tensor_bytes: int, on_bytes: Callable[[int], None]) -> None:
        """Feed upload chunks (after the header) until the stream ends. Raises
        :class:`CorruptChunk` (prefix kept), ``RejectedUpdate`` or ``ProtocolError``."""
        algo = self.algo
        for msg in messages:
            data, crc_ok, crc = serde.checked_chunk(msg, self.received, algo)
            on_bytes(len(data))
            if not crc_ok:
                raise CorruptChunk(self.received, algo)
            if self.received + len(data) > self.size:
                raise RejectedUpdate("malformed", f"more than the declared {self.size} bytes")
            self.decoder.feed(data)
            if not self.checked_tensors:
                self._check_tensor_sizes(max_tensor_bytes)
            if self.header.sha256:
                self.digest.update(data)
            self.crc = crc32_combine(self.crc, crc, len(data), algo.poly)
            self.received += len(data)

    def _check_tensor_sizes(self, max_tensor_bytes: int) -> None:
        sizes = self.decoder.tensor_sizes()
        if sizes is None:  # header not complete yet
            return
        self.checked_tensors = True
        for name, nbytes in sizes:
            if nbytes > max_tensor_bytes:
                raise RejectedUpdate("too_large", f"tensor {name!r} has {nbytes} bytes (transport.max_tensor_bytes={max_tensor_bytes})")

    def complete(self, max_norm: float | None) -> tuple[AdapterState, float]:
        """The decoded update of a fully received upload, with its global L2 norm, after its
        checksum, content and norm checks (``RejectedUpdate`` / ``ProtocolError`` otherwise)."""
        h = self.header
        if h.sha256 and self.digest.digest() != h.sha256:
            raise RejectedUpdate("checksum", "sha256 of the received bytes does not match the header")
        expected = h.crc32c if h.crc32c is not None else h.crc32
        if expected is not None and self.crc != expected:
            raise RejectedUpdate("checksum", f"{self.algo.name} of the received bytes does not match the header")
        state = self.decoder.finish()
        norm = self.content.result() if self.content is not None else check_update(state)
        check_norm(norm, max_norm)
        return state, norm


class UploadTable:
    """Partial uploads by task id, and the ids of tasks already uploaded (duplicates are refused)."""

    #: task ids remembered as uploaded
    max_completed = 100_000

    def __init__(self, max_concurrent: int, resume_window_s: float) -> None:
        self.max_concurrent = max(1, max_concurrent)
        self.resume_window_s = resume_window_s
        self._lock = threading.Lock()
        self._uploads: dict[str, Upload] = {}
        self._completed: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._uploads)

    def progress(self, task_id: str, worker_id: str) -> tuple[int, int]:
        """(bytes held, size) of ``worker_id``'s upload of ``task_id`` ((0, 0) when none)."""
        with self._lock:
            up = self._uploads.get(task_id)
            return (0, 0) if up is None or up.worker_id != worker_id else (up.received, up.size)

    def open(self, header: UpdateHeader, decoder_factory: DecoderFactory) -> tuple[Upload, list[str]]:
        """The partial upload ``header`` continues, or a new one (validated by the engine's
        decoder; ``RejectedUpdate`` for unknown or closed tasks). Also returns the task ids of
        uploads evicted to make room. Raises :class:`UploadConflict`."""
        task_id = header.task_id
        evicted: list[str] = []
        with self._lock:
            up = self._uploads.get(task_id)
            if up is not None and header.offset > 0 and up.continued_by(header):
                return up, evicted
            if header.offset > 0:
                raise UploadConflict("offset", f"no partial upload of task {task_id!r} to resume; start again at offset 0")
            if up is not None and not up.lock.locked():
                self._uploads.pop(task_id, None)
            elif up is not None:
                raise UploadConflict("busy", f"another upload of task {task_id!r} is in progress; retry")
            if len(self._uploads) >= self.max_concurrent:
                idle = [(u.updated, tid) for tid, u in self._uploads.items() if not u.lock.locked()]
                if not idle:
                    raise UploadConflict("busy", f"{len(self._uploads)} uploads in progress (transport.max_concurrent_uploads); retry")
                _, oldest = min(idle)
                self._uploads.pop(oldest, None)
                evicted.append(oldest)
        decoder = decoder_factory(task_id, header.client_id)  # RejectedUpdate for unknown/closed tasks
        up = Upload(header, decoder)
        with self._lock:
            self._uploads[task_id] = up
        return up, evicted

    def drop(self, task_id: str, up: Upload | None = None) -> None:
        """Forget the partial upload of ``task_id`` (only if it is still ``up``, when given)."""
        with self._lock:
            if up is None or self._uploads.get(task_id) is up:
                self._uploads.pop(task_id, None)

    def clear(self) -> None:
        with self._lock:
            self._uploads.clear()

    def expire(self, now: float) -> list[tuple[str, int]]:
        """Drop idle partial uploads older than the resume window: (task id, bytes held) of each."""
        with self._lock:
            old = [(tid, up) for tid, up in self._uploads.items() if not up.lock.locked() and now - up.updated > self.resume_window_s]
            for tid, _ in old:
                self._uploads.pop(tid, None)
        return [(tid, up.received) for tid, up in old]

    # -- completed tasks -------------------------------------------------------------------
    def is_done(self, task_id: str) -> bool:
        with self._lock:
            return task_id in self._completed

    def mark_done(self, task_id: str, up: Upload) -> bool:
        """Record ``task_id`` as uploaded and drop its partial upload; False when a racing duplicate was first."""
        with self._lock:
            if self._uploads.get(task_id) is up:
                del self._uploads[task_id]
            if task_id in self._completed:
                return False
            self._completed[task_id] = None
            while len(self._completed) > self.max_completed:
                self._completed.popitem(last=False)
            return True

    def allow_again(self, task_ids: Iterable[str]) -> None:
        """Re-submitted tasks may be uploaded again."""
        with self._lock:
            for tid in task_ids:
                self._completed.pop(tid, None)

    def reset(self) -> None:
        """Forget partial uploads and completed tasks (tests)."""
        with self._lock:
            self._uploads.clear()
            self._completed.clear()
