"""CRC of a whole payload from the CRCs of its chunks, without a second pass over the data.

Each transferred chunk carries its own CRC (what a receiver checks, chunk by chunk). The CRC of
the concatenation follows from the chunk CRCs and lengths alone: appending ``n`` bytes is a
linear map over GF(2) on the 32-bit CRC state (the same algebra as zlib's ``crc32_combine``,
written here from that definition for any reflected 32-bit CRC with the usual all-ones init
and final xor). The map for a given (polynomial, ``n``) is built once (about 10 ms in Python)
and cached, so combining a chunk costs microseconds. This gives the transports a
whole-payload digest for the price of the per-chunk CRCs they compute anyway.

Two algorithms, :data:`CRC32` (zlib's CRC-32, IEEE 802.3; what older peers speak) and
:data:`CRC32C` (Castagnoli, computed by the ``crc32c`` package with the SSE4.2 / ARMv8 CRC
instructions, several times faster than zlib's; the wire default of current peers):

    >>> import zlib, crc32c
    >>> a, b = b"adapter ", b"payload"
    >>> crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    True
    >>> crc32_combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b), CRC32C.poly) == crc32c.crc32c(a + b)
    True
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import NamedTuple

import crc32c as _crc32c

POLY_CRC32 = 0xEDB88320  # CRC-32 (IEEE 802.3), reflected
POLY_CRC32C = 0x82F63B78  # CRC-32C (Castagnoli), reflected


class CrcAlgorithm(NamedTuple):
    """A 32-bit CRC: its name (in messages), reflected polynomial and buffer function."""

    name: str
    poly: int
    #: ``fn(data)``: the CRC of a bytes-like object (memoryviews included)
    fn: Callable[..., int]


CRC32 = CrcAlgorithm("CRC-32", POLY_CRC32, zlib.crc32)
CRC32C = CrcAlgorithm("CRC-32C", POLY_CRC32C, _crc32c.crc32c)


def _times(mat: tuple[int, ...], vec: int) -> int:
    """``mat`` (32 columns) times the bit vector ``vec`` over GF(2)."""
    out = 0
    i = 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _square(mat: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_times(mat, mat[n]) for n in range(32))


@lru_cache(maxsize=64)
def _append_zeros(n: int, poly: int = POLY_CRC32) -> tuple[int, ...]:
    """The matrix taking the CRC state of a message to that of the message followed by ``n`` zero bytes."""
    one_bit = tuple([poly] + [1 << k for k in range(31)])  # one zero bit
    power = _square(_square(one_bit))  # four zero bits
    result = tuple(1 << k for k in range(32))  # identity
    while n:
        power = _square(power)  # doubles: 1, 2, 4, ... zero bytes
        if n & 1:
            result = tuple(_times(power, col) for col in result)
        n >>= 1
    return result


def crc32_combine(crc1: int, crc2: int, len2: int, poly: int = POLY_CRC32) -> int:
    """CRC of ``A + B`` from ``crc(A)``, ``crc(B)`` and ``len(B)`` (CRC-32 unless ``poly`` says otherwise)."""
    if len2 <= 0:
        return crc1
    return _times(_append_zeros(len2, poly), crc1) ^ crc2


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32C of ``A + B`` from ``crc32c(A)``, ``crc32c(B)`` and ``len(B)``."""
    return crc32_combine(crc1, crc2, len2, POLY_CRC32C)


def combine_chunks(chunks: Iterable[tuple[int, int]], start: int = 0, poly: int = POLY_CRC32) -> int:
    """CRC of consecutive chunks given as (crc, length) pairs, continuing from ``start``."""
    crc = start
    for c, n in chunks:
        crc = crc32_combine(crc, c, n, poly)
    return crc


#: payloads from this size have their chunk CRCs taken on two threads
PARALLEL_FROM = 8 << 20
_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """Two threads for CRC passes, made again in a forked child (a parent's threads are not there)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(2, thread_name_prefix="dpeft-crc"))
        return _pool[1]


def chunk_crcs(data: bytes | memoryview, chunk_bytes: int, fn: Callable[..., int] = zlib.crc32) -> list[int]:
    """The CRC (``fn``: CRC-32 unless given) of each ``chunk_bytes`` piece of ``data`` (one pass over the data).

    A payload of :data:`PARALLEL_FROM` bytes or more is split between the caller and a second
    thread (both CRC functions let go of the GIL): the pass comes before a transfer can start,
    when the other end is still waiting, so a second core halves it."""
    view = memoryview(data).cast("B")
    starts = range(0, len(view), chunk_bytes)
    if len(view) < PARALLEL_FROM or len(starts) < 2 or (os.cpu_count() or 1) < 2:
        return [fn(view[i : i + chunk_bytes]) for i in starts]
    half = len(starts) // 2
    later = _executor().submit(lambda: [fn(view[i : i + chunk_bytes]) for i in starts[half:]])
    first = [fn(view[i : i + chunk_bytes]) for i in starts[:half]]
    return first + later.result()
