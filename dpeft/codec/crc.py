"""CRC-32 of a whole payload from the CRC-32s of its chunks, without a second pass over the data.

Each transferred chunk carries its own CRC-32 (what a receiver checks, chunk by chunk). The
CRC of the concatenation follows from the chunk CRCs and lengths alone: appending ``n`` bytes
is a linear map over GF(2) on the 32-bit CRC state (the same algebra as zlib's
``crc32_combine``, written here from that definition). The map for a given ``n`` is built once
(about 10 ms in Python) and cached, so combining a chunk costs microseconds. This gives the
transports a whole-payload digest for the price of the per-chunk CRCs they compute anyway:

    >>> import zlib
    >>> a, b = b"adapter ", b"payload"
    >>> crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    True
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from functools import lru_cache

_POLY = 0xEDB88320  # CRC-32 (IEEE 802.3), reflected


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
def _append_zeros(n: int) -> tuple[int, ...]:
    """The matrix taking the CRC state of a message to that of the message followed by ``n`` zero bytes."""
    one_bit = tuple([_POLY] + [1 << k for k in range(31)])  # one zero bit
    power = _square(_square(one_bit))  # four zero bits
    result = tuple(1 << k for k in range(32))  # identity
    while n:
        power = _square(power)  # doubles: 1, 2, 4, ... zero bytes
        if n & 1:
            result = tuple(_times(power, col) for col in result)
        n >>= 1
    return result


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)``."""
    if len2 <= 0:
        return crc1
    return _times(_append_zeros(len2), crc1) ^ crc2


def combine_chunks(chunks: Iterable[tuple[int, int]], start: int = 0) -> int:
    """CRC-32 of consecutive chunks given as (crc32, length) pairs, continuing from ``start``."""
    crc = start
    for c, n in chunks:
        crc = crc32_combine(crc, c, n)
    return crc


def chunk_crcs(data: bytes | memoryview, chunk_bytes: int) -> list[int]:
    """The CRC-32 of each ``chunk_bytes`` piece of ``data`` (one pass over the data)."""
    view = memoryview(data).cast("B")
    return [zlib.crc32(view[i : i + chunk_bytes]) for i in range(0, len(view), chunk_bytes)]
