"""Spool files reused for the next payload (dpeft.codec.spool_pool).

A file goes back to the pool only when its payload object and every mapping made from it are
gone (no garbage collection needed: no reference cycles), and the next payload of the same
directory overwrites it; a tensor still alive keeps its file out of the pool, so its values
never change under it. The pool is bounded (files, bytes) and can be turned off.
"""

from __future__ import annotations

import gc
import hashlib
import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import crc32c
import pytest
import torch

from dpeft.codec import spool, spool_pool
from dpeft.codec.spool import SpooledBlob, SpooledState, SpoolPolicy
from dpeft.codec.tensors import StateDecoder, encode_state
from dpeft.codec.validation import check_update
from dpeft.state import AdapterState


@pytest.fixture(autouse=True)
def _empty_pool() -> Iterator[None]:
    gc.collect()  # payloads of earlier tests left in reference cycles give their files back now, not mid-test
    spool_pool.clear()
    yield
    gc.collect()
    spool_pool.clear()


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every file object the pool hands out, in order."""
    files: list[Any] = []
    real = spool_pool.open_file

    def recording(directory: str | None, prefix: str, size: int) -> Any:
        fh = real(directory, prefix, size)
        files.append(fh)
        return fh

    monkeypatch.setattr(spool_pool, "open_file", recording)
    monkeypatch.setattr(spool, "open_file", recording)  # where the spool files are opened
    return files


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Files must come back through reference counting alone."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def state_of(n: int, seed: int, dtype: torch.dtype = torch.float32) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    tensors = OrderedDict(
        [
            ("x", torch.randn(n, generator=g).to(dtype)),
            ("e", torch.empty(0)),
            ("y", torch.randn(3, n // 3 + 1, generator=g).to(dtype)),
            ("i", torch.arange(5) + seed),
        ]
    )
    return AdapterState(tensors, {"seed": seed})


def spooled(state: AdapterState, directory: Path, chunk: int = 1000) -> SpooledState:
    payload = encode_state(state)
    dec = StateDecoder(state.schema(), spool=SpoolPolicy(threshold=0, directory=directory))
    for pos in range(0, len(payload), chunk):
        dec.feed(payload[pos : pos + chunk])
    out = dec.finish()
    assert isinstance(out, SpooledState)
    return out


def inode(state: SpooledState) -> int:
    return os.fstat(state.spool.fileno()).st_ino


def file_size(state: SpooledState) -> int:
    return os.fstat(state.spool.fileno()).st_size


def assert_holds(out: AdapterState, want: AdapterState) -> None:
    assert list(out) == list(want)
    for name in want:
        assert out[name].dtype == want[name].dtype and out[name].shape == want[name].shape, name
        assert out[name].numpy().tobytes() == want[name].numpy().tobytes(), name


def test_a_dropped_payload_s_file_is_reused_without_gc(tmp_path: Path, no_gc: None) -> None:
    big, small, same = state_of(3000, 1), state_of(700, 2), state_of(3000, 3)
    s1 = spooled(big, tmp_path)
    ino, size = inode(s1), file_size(s1)
    assert size == s1.spool.size and spool_pool.pooled() == []
    del s1
    assert spool_pool.pooled() == [(str(tmp_path), size)]  # back at once: no cycle keeps it
    s2 = spooled(small, tmp_path)
    assert spool_pool.pooled() == [] and inode(s2) == ino
    assert file_size(s2) == size > s2.spool.size  # the larger file holds the smaller payload
    assert_holds(s2, small)
    check_update(s2)  # drops each tensor's pages: they are read again from the (reused) file
    assert_holds(s2, small)
    del s2
    assert spool_pool.pooled() == [(str(tmp_path), size)]
    s3 = spooled(same, tmp_path)  # same size as the file
    assert inode(s3) == ino and file_size(s3) == size
    assert_holds(s3, same)


def test_the_smallest_fitting_file_is_taken_else_the_largest_grows(tmp_path: Path, no_gc: None) -> None:
    a, b = spooled(state_of(300, 1), tmp_path), spooled(state_of(3000, 2), tmp_path)
    small, large = file_size(a), file_size(b)
    del a, b
    assert sorted(n for _, n in spool_pool.pooled()) == [small, large]
    c = spooled(state_of(200, 3), tmp_path)
    assert file_size(c) == small and spool_pool.pooled() == [(str(tmp_path), large)]
    huge = state_of(6000, 4)
    d = spooled(huge, tmp_path)  # nothing fits: the largest is taken and grows
    assert file_size(d) == d.spool.size > large and spool_pool.pooled() == []
    assert_holds(d, huge)
    assert_holds(c, state_of(200, 3))


@pytest.mark.parametrize("keep", ["tensor", "view", "numpy", "map"])
def test_a_live_tensor_keeps_its_file_out_of_the_pool(keep: str, tmp_path: Path, no_gc: None) -> None:
    one, two = state_of(3000, 1), state_of(3000, 2)
    s1 = spooled(one, tmp_path)
    ino1 = inode(s1)
    want = one["x"].numpy().tobytes()
    x = s1["x"]
    held: Any = {"tensor": x, "view": x[1:], "numpy": x.numpy(), "map": s1._maps["x"]}[keep]
    del x
    del s1  # its pages were never read: a reused file would show through them
    assert spool_pool.pooled() == []
    s2 = spooled(two, tmp_path)
    assert inode(s2) != ino1
    assert_holds(s2, two)
    got = bytes(held) if keep == "map" else torch.as_tensor(held).numpy().tobytes()
    assert got == (want if keep != "view" else want[4:])  # upload 1's values, byte for byte
    ino2 = inode(s2)
    del s2
    assert len(spool_pool.pooled()) == 1  # upload 2's file
    del held, got
    assert len(spool_pool.pooled()) == 2  # and now upload 1's
    s3, s4 = spooled(state_of(3000, 3), tmp_path), spooled(state_of(3000, 4), tmp_path)
    assert {inode(s3), inode(s4)} == {ino1, ino2}
    assert_holds(s3, state_of(3000, 3))
    assert_holds(s4, state_of(3000, 4))


def test_blob_files_are_reused_and_read_only_the_new_payload(tmp_path: Path, opened: list[Any], no_gc: None) -> None:
    policy = SpoolPolicy(threshold=0, directory=tmp_path)
    first = os.urandom(50_000)
    b1 = SpooledBlob.write([first[:20_000], memoryview(first)[20_000:]], policy)
    assert b1.tobytes() == first
    del b1
    assert spool_pool.pooled() == [(str(tmp_path), 50_000)]
    new = bytes(range(256)) * 4 + b"tail"
    b2 = SpooledBlob.write([new[:100], new[100:]], policy)
    assert opened[1] is opened[0] and spool_pool.pooled() == []
    assert os.fstat(opened[1].fileno()).st_size == 50_000  # the stale tail is still in the file
    assert len(b2) == len(new)
    assert b2.tobytes() == new
    assert b2.read(0, 10**9) == new
    assert b2.read(len(new) - 3, 100) == b"ail"
    assert b2.read(len(new), 10) == b"" and b2.read(len(new) + 5, 10) == b"" and b2.read(5, 0) == b""
    assert b2.read(7, 11) == new[7:18]
    assert (b2.sha256, b2.crc32, b2.crc32c) == (hashlib.sha256(new).digest(), zlib.crc32(new), crc32c.crc32c(new))
    # a blob's file serves a spooled upload next, and the other way round
    del b2
    s = spooled(state_of(3000, 5), tmp_path)
    assert opened[2] is opened[0]
    assert_holds(s, state_of(3000, 5))
    del s
    b3 = SpooledBlob.write([b"xyz"], policy)
    assert opened[3] is opened[0] and b3.tobytes() == b"xyz"


def test_pool_bounds_files_and_bytes(tmp_path: Path, opened: list[Any], monkeypatch: pytest.MonkeyPatch, no_gc: None) -> None:
    monkeypatch.setattr(spool_pool, "MAX_FILES", 2)
    states = [spooled(state_of(100 * (k + 1), k), tmp_path) for k in range(4)]
    del states
    assert len(spool_pool.pooled()) == 2
    assert sum(fh.closed for fh in opened) == 2
    spool_pool.clear()
    assert spool_pool.pooled() == [] and all(fh.closed for fh in opened)
    opened.clear()
    monkeypatch.setattr(spool_pool, "MAX_FILES", 8)
    big, mid = spooled(state_of(1500, 1), tmp_path), spooled(state_of(900, 2), tmp_path)
    sizes = file_size(big), file_size(mid)
    monkeypatch.setattr(spool_pool, "MAX_BYTES", sizes[0] + sizes[1] - 1)
    del big
    assert spool_pool.pooled() == [(str(tmp_path), sizes[0])]
    del mid  # would go over MAX_BYTES: closed
    assert spool_pool.pooled() == [(str(tmp_path), sizes[0])] and opened[1].closed and not opened[0].closed
    monkeypatch.setattr(spool_pool, "MAX_BYTES", 100)
    spool_pool.clear()
    blob = SpooledBlob.write([bytes(101)], SpoolPolicy(threshold=0, directory=tmp_path))  # alone larger than the bound
    del blob
    assert spool_pool.pooled() == [] and opened[-1].closed


def test_reuse_off_closes_the_files(tmp_path: Path, opened: list[Any], monkeypatch: pytest.MonkeyPatch, no_gc: None) -> None:
    monkeypatch.setenv("DPEFT_SPOOL_REUSE", "0")
    s = spooled(state_of(300, 1), tmp_path)
    t = s["x"]
    del s
    assert not opened[0].closed  # still mapped
    del t
    assert opened[0].closed and spool_pool.pooled() == []
    blob = SpooledBlob.write([b"abc"], SpoolPolicy(threshold=0, directory=tmp_path))
    del blob
    assert opened[1].closed and opened[1] is not opened[0] and spool_pool.pooled() == []


def test_files_are_per_directory(tmp_path: Path, opened: list[Any], no_gc: None) -> None:
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    a = spooled(state_of(3000, 1), dir_a)
    del a
    assert spool_pool.pooled() == [(str(dir_a), os.fstat(opened[0].fileno()).st_size)]
    b = spooled(state_of(300, 2), dir_b)  # A's file would fit, but belongs to A
    assert opened[1] is not opened[0] and len(spool_pool.pooled()) == 1
    assert_holds(b, state_of(300, 2))
    blob = SpooledBlob.write([b"abc"], SpoolPolicy(threshold=0, directory=dir_b))
    assert opened[2] not in opened[:2]
    del b, blob
    assert sorted(d for d, _ in spool_pool.pooled()) == [str(dir_a), str(dir_b), str(dir_b)]
    again = spooled(state_of(300, 3), dir_a)
    assert opened[3] is opened[0] and sorted(d for d, _ in spool_pool.pooled()) == [str(dir_b), str(dir_b)]
    assert_holds(again, state_of(300, 3))


def test_a_cycle_collected_while_the_pool_is_locked_does_not_deadlock(tmp_path: Path) -> None:
    """A garbage collection can start inside the pool's lock (any allocation may start one) and
    finalize a payload held in a reference cycle, whose file then comes back to the pool."""
    spool_pool.give_back(str(tmp_path), spool_pool.open_file(str(tmp_path), "p-", 0))  # the lock then guards some work
    policy = SpoolPolicy(threshold=0, directory=tmp_path / "cycles")
    threshold = gc.get_threshold()

    def open_with_a_cycle_pending(k: int) -> None:
        gc.disable()
        box: list[Any] = [SpooledBlob.write([b"x" * 100], policy)]
        box.append(box)
        del box
        gc.set_threshold(gc.get_count()[0] + k)  # the k-th allocation from here on collects
        gc.enable()
        fh = spool_pool.open_file(str(tmp_path), "p-", 10)
        spool_pool.give_back(str(tmp_path), fh)

    try:
        for k in range(40):
            worker = threading.Thread(target=open_with_a_cycle_pending, args=(k,), daemon=True)
            worker.start()
            worker.join(10)
            if worker.is_alive():
                spool_pool._lock = threading.RLock()  # the stuck thread holds the old one: let teardown run
                pytest.fail(f"deadlocked (collection after {k} allocations)")
    finally:
        gc.set_threshold(*threshold)
        gc.enable()
    gc.collect()
    assert len(spool_pool.pooled()) >= 2


def test_threads_decoding_at_once_never_share_a_live_file(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            for i in range(15):
                want = state_of(200 + 37 * ((w + i) % 5), 100 * w + i)
                out = spooled(want, tmp_path, chunk=333)
                assert_holds(out, want)
                del out
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors[0]
    assert 1 <= len(spool_pool.pooled()) <= spool_pool.MAX_FILES
