"""dpeft.codec.crc: whole-payload CRCs combined from chunk CRCs, for CRC-32 (zlib) and CRC-32C."""

from __future__ import annotations

import doctest
import os
import zlib

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpeft.codec import crc
from dpeft.codec.crc import CRC32, CRC32C, chunk_crcs, combine_chunks, crc32_combine, crc32c_combine


def test_crc32c_reference_values() -> None:
    assert CRC32C.fn(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert CRC32.fn(b"123456789") == 0xCBF43926  # the CRC-32 check value
    assert CRC32C.fn(memoryview(b"xx123456789")[2:]) == 0xE3069283  # memoryviews (chunks of a payload) work


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_combine_matches_the_crc_of_the_concatenation(a: bytes, b: bytes) -> None:
    assert crc32c_combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b)) == crc32c.crc32c(a + b)
    assert crc32_combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b), CRC32C.poly) == crc32c.crc32c(a + b)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@pytest.mark.parametrize("algo", [CRC32, CRC32C], ids=lambda a: a.name)
@pytest.mark.parametrize("step", [1, 7, 4096, 1 << 20])
def test_chunk_crcs_combine_to_the_whole(algo, step: int) -> None:
    data = os.urandom(3 * (1 << 20) + 12345)  # several chunks and a short last one
    crcs = chunk_crcs(data, step, algo.fn) if step >= 4096 else chunk_crcs(data[:5000], step, algo.fn)
    body = data if step >= 4096 else data[:5000]
    lengths = [min(step, len(body) - i * step) for i in range(len(crcs))]
    assert crcs == [algo.fn(body[i : i + step]) for i in range(0, len(body), step)]
    assert combine_chunks(zip(crcs, lengths, strict=True), poly=algo.poly) == algo.fn(body)


def test_the_two_algorithms_never_agree_by_construction() -> None:
    """The combine of one algorithm's chunk CRCs is not the other's whole CRC (a mixed-up
    checksum would be caught as a mismatch, never accepted)."""
    data = os.urandom(1 << 16)
    crcs = chunk_crcs(data, 4096, CRC32.fn)
    mixed = combine_chunks(((c, 4096) for c in crcs), poly=CRC32C.poly)
    assert mixed != CRC32C.fn(data) and mixed != CRC32.fn(data)


def test_continue_from_a_start_value() -> None:
    a, b, c = os.urandom(1000), os.urandom(2000), os.urandom(3)
    start = crc32c.crc32c(a)
    assert combine_chunks([(crc32c.crc32c(b), len(b)), (crc32c.crc32c(c), len(c))], start, CRC32C.poly) == crc32c.crc32c(a + b + c)
    assert crc32c_combine(start, 0, 0) == start  # an empty chunk changes nothing


def test_module_doctest() -> None:
    assert doctest.testmod(crc).failed == 0


def test_chunk_crcs_of_a_large_payload_on_two_threads_match_one_pass_and_work_after_fork() -> None:
    data = os.urandom(crc.PARALLEL_FROM + 3 * 1024 * 1024 + 5)
    step = 1 << 20
    want = [crc32c.crc32c(data[i : i + step]) for i in range(0, len(data), step)]
    assert crc.chunk_crcs(data, step, crc32c.crc32c) == want
    assert crc.chunk_crcs(data, step) == [zlib.crc32(data[i : i + step]) for i in range(0, len(data), step)]
    pid = os.fork()  # the parent's CRC thread does not exist in a forked child: a new one is made
    if pid == 0:
        os._exit(0 if crc.chunk_crcs(data, step, crc32c.crc32c) == want else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
