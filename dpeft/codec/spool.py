"""Payloads too large to hold in memory twice: spooled to an unlinked temporary file.

A coordinator with a multi-GiB adapter must not keep every upload, nor the serialized global
it serves, as a Python ``bytearray``. Two pieces here keep its memory bounded by a few chunks
(plus the global state and the aggregate, which it needs anyway):

- :class:`SpoolFile`: the data region of one incoming payload, written chunk by chunk as the
  (already schema-checked) chunks arrive. Its tensors are then *mapped* from the file
  (:meth:`SpoolFile.tensor`), each through its own private, copy-on-write ``mmap``; a pass
  over a tensor (validation, folding into the aggregate) calls :meth:`SpooledState.release`
  every few slices so the kernel drops the pages it touched from this process (they stay in
  the page cache, or go back to disk under pressure). The resident cost of a pass over a
  spooled update is a few slices, not the update.
- :class:`SpooledBlob`: a payload written once to a file (e.g. the encoded global adapter of a
  round) and served in ranges with ``os.pread``: no full in-memory copy exists.

Both files are unlinked temporary files, so they vanish when the last reference goes, including
on a crash; a file whose payload is done is kept for the next one (:mod:`~dpeft.codec.spool_pool`). Nothing here parses untrusted bytes: the
layout (dtypes, shapes, offsets) comes from a header the caller validated first.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import crc32c
import torch

from dpeft.codec.crc import POLY_CRC32C, combine_chunks
from dpeft.codec.spool_pool import Lease, open_file
from dpeft.state import AdapterState

_GRANULARITY = mmap.ALLOCATIONGRANULARITY
#: a spooled blob's CRC-32C is kept per block of this many bytes, so the chunk CRCs of any
#: transfer grid that is a whole number of blocks follow without reading the file again
BLOCK = 1 << 20


@dataclass(frozen=True)
class SpoolPolicy:
    """Where and from which size payloads are spooled to disk (``None`` dir = system temp dir)."""

    threshold: int = 64 << 20
    directory: str | os.PathLike[str] | None = None

    def applies(self, size: int) -> bool:
        return size >= self.threshold

    def make_dir(self) -> str | None:
        if self.directory is None:
            return None
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        return str(self.directory)


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes of file ``fd`` from ``offset`` (OSError if the file ends first)."""
    out = os.pread(fd, length, offset)
    while len(out) < length:  # pragma: no cover - short reads on regular files are rare
        more = os.pread(fd, length - len(out), offset + len(out))
        if not more:
            raise OSError("spool file ended early")
        out += more
    return out


def write_all(fh: BinaryIO, data: memoryview | bytes) -> int:
    """Write all of ``data`` to the unbuffered file ``fh`` (which may take it in parts); returns
    its length."""
    view = memoryview(data).cast("B")
    total = len(view)
    while len(view):
        n = fh.write(view)
        if n is None or n <= 0:  # pragma: no cover - unbuffered writes on a regular file
            raise OSError("short write to a spool file")
        view = view[n:]
    return total


class SpoolFile:
    """An unlinked temporary file receiving one payload's data region sequentially."""

    def __init__(self, size: int, policy: SpoolPolicy) -> None:
        self.size = size
        directory = policy.make_dir()
        self._fh = open_file(directory, "dpeft-spool-", size)
        self._lease = Lease(self, directory, self._fh)
        self.written = 0

    def fileno(self) -> int:
        return self._fh.fileno()

    def write(self, data: memoryview | bytes) -> None:
        """Append ``data`` (the caller has checked it fits in ``size``)."""
        self.written += write_all(self._fh, data)

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...], start: int, end: int) -> tuple[torch.Tensor, mmap.mmap | None]:
        """The tensor stored at ``[start, end)``, mapped (private, copy-on-write) from the file,
        and its mapping (None for an empty tensor)."""
        if end == start:
            return torch.empty(shape, dtype=dtype), None
        base = start - start % _GRANULARITY
        mm = mmap.mmap(self.fileno(), end - base, offset=base, access=mmap.ACCESS_COPY)
        self._lease.hold(mm)  # the file is reused only once this mapping is gone too
        count = (end - start) // torch.empty((), dtype=dtype).element_size()
        return torch.frombuffer(mm, dtype=dtype, offset=start - base, count=count).reshape(shape), mm

    def close(self) -> None:
        self._fh.close()


class SpooledState(AdapterState):
    """An AdapterState whose tensors are mapped from a :class:`SpoolFile`.

    Every tensor is an ordinary CPU tensor (writable: the mappings are private copy-on-write).
    :meth:`release` lets a pass over the update give back the pages of a tensor it is done with:
    they are dropped from this process (the data stays in the file). A page written in place is
    discarded too, so only passes that read call it.
    """

    def __init__(
        self, tensors: OrderedDict[str, torch.Tensor], meta: dict[str, Any], spool: SpoolFile, maps: dict[str, mmap.mmap]
    ) -> None:
        super().__init__(tensors, meta)
        self.spool = spool  # keeps the file alive as long as the state is
        self._maps = maps

    def release(self, name: str) -> None:
        mm = self._maps.get(name)
        if mm is not None and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED)


class SpooledBlob:
    """A payload written once to an unlinked temp file, served by range (``len``, ``read``).

    :meth:`write` streams ``pieces`` (memoryviews, e.g. :func:`~dpeft.codec.tensors.iter_encoded`)
    to the file and hashes them on the way (sha256, CRC-32 and CRC-32C), so publishing a multi-GiB global adapter costs one
    chunk of memory, not a serialized copy.
    """

    def __init__(self, fh: Any, size: int, sha256: bytes, crc32: int, crc32c: int | None = None) -> None:
        self._fh = fh
        self.size = size
        self.sha256 = sha256
        self.crc32 = crc32
        self.crc32c = crc32c
        #: CRC-32C of each BLOCK bytes (written by :meth:`write`), for :meth:`chunk_crc32c`
        self.block_crc32c: list[int] = []
        #: the spool directory its file came from (None: the system's temp dir)
        self.directory: str | None = None

    @classmethod
    def write(cls, pieces: Iterable[memoryview | bytes], policy: SpoolPolicy) -> SpooledBlob:
        directory = policy.make_dir()
        fh = open_file(directory, "dpeft-blob-", 0)
        digest = hashlib.sha256()
        crc = 0
        size = 0
        blocks: list[int] = []  # CRC-32C of each BLOCK bytes
        block_crc = block_len = 0
        for piece in pieces:
            view = memoryview(piece).cast("B")
            digest.update(view)
            crc = zlib.crc32(view, crc)
            rest = view
            while len(rest):
                take = min(len(rest), BLOCK - block_len)
                block_crc = crc32c.crc32c(rest[:take], block_crc)
                block_len += take
                rest = rest[take:]
                if block_len == BLOCK:
                    blocks.append(block_crc)
                    block_crc = block_len = 0
            size += write_all(fh, view)
        if block_len:
            blocks.append(block_crc)
        crcc = combine_chunks(((c, min(BLOCK, size - i * BLOCK)) for i, c in enumerate(blocks)), poly=POLY_CRC32C)
        blob = cls(fh, size, digest.digest(), crc, crcc)
        blob.block_crc32c = blocks
        blob.directory = directory
        Lease(blob, directory, fh)
        return blob

    def chunk_crc32c(self, step: int) -> list[int] | None:
        """The CRC-32C of each ``step`` bytes, from the block CRCs taken while the payload was
        written (no read of the file); None when ``step`` is not a whole number of blocks."""
        if step <= 0 or step % BLOCK or not self.block_crc32c:
            return None
        per = step // BLOCK
        blocks = self.block_crc32c
        return [
            combine_chunks(((blocks[j], min(BLOCK, self.size - j * BLOCK)) for j in range(i, min(len(blocks), i + per))), poly=POLY_CRC32C)
            for i in range(0, len(blocks), per)
        ]

    def __len__(self) -> int:
        return self.size

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer at the end)."""
        return pread_exact(self._fh.fileno(), max(0, min(length, self.size - offset)), offset)

    def tobytes(self) -> bytes:
        """The whole payload in memory (for transports that need one buffer, such as Ray's)."""
        return self.read(0, self.size)

    def close(self) -> None:
        self._fh.close()


def release(state: AdapterState, name: str) -> None:
    """``state.release(name)`` for spooled states; nothing for in-memory ones."""
    fn = getattr(state, "release", None)
    if fn is not None:
        fn(name)
