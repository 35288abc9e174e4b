"""A spooled blob's chunk CRC-32Cs come from the block CRCs taken while it was written."""

from __future__ import annotations

import os

import crc32c
import pytest

from dpeft.codec.crc import CRC32C
from dpeft.codec.spool import BLOCK, SpooledBlob, SpoolPolicy
from dpeft.transport.grpc.payloads import ChunkCrcs


@pytest.mark.parametrize("size", [0, 1, BLOCK - 1, BLOCK, 3 * BLOCK + 17, 9 * BLOCK])
def test_chunk_crcs_of_a_spooled_blob_match_the_bytes_on_every_whole_block_grid(tmp_path, size: int) -> None:
    data = os.urandom(size)
    cuts = sorted({0, size, *(min(size, c) for c in (3, 5, BLOCK - 2, BLOCK + 1, 2 * BLOCK + 7))})
    blob = SpooledBlob.write([memoryview(data)[a:b] for a, b in zip(cuts, cuts[1:], strict=False)], SpoolPolicy(0, tmp_path))
    assert blob.crc32c == crc32c.crc32c(data)
    for step in (BLOCK, 2 * BLOCK, 4 * BLOCK):
        want = [crc32c.crc32c(data[i : i + step]) for i in range(0, size, step)]
        assert (blob.chunk_crc32c(step) or []) == want
        table = ChunkCrcs(blob, step)  # what FetchBlob serves: known without reading the file
        assert table.by_algo[CRC32C.name] == want and table.whole_crc32c == crc32c.crc32c(data)
    assert blob.chunk_crc32c(BLOCK + 1) is None  # off the block grid: filled in as served
    assert ChunkCrcs(blob, BLOCK + 1).whole_crc32c == crc32c.crc32c(data)
