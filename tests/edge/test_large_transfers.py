"""Large and interrupted transfers over real gRPC on loopback.

- an upload cut mid-stream by a real network drop: a worker *process* uploads through a TCP
  proxy *process* that kills the connection after a few MiB; the worker resumes from the last
  chunk the coordinator verified and reports the bytes it sent twice (far less than the upload);
- spooled uploads and downloads (the large-adapter path, here with a tiny threshold): the update
  arrives as file-mapped tensors equal to what was sent, the global is served from a file;
- the content checks every transport applies (finite values, global L2 norm bound).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import crc32c
import pytest
import torch

from dpeft.codec import encode_state
from dpeft.codec.spool import SpooledBlob, SpooledState, SpoolPolicy
from dpeft.codec.tensors import Limits, StateDecoder, iter_encoded
from dpeft.codec.validation import check_norm, check_update
from dpeft.config import TransportConfig
from dpeft.errors import RejectedUpdate
from dpeft.state import AdapterState
from dpeft.transport.base import TaskResult, TrainTask
from dpeft.transport.grpc import GrpcCoordinatorTransport, GrpcWorkerConnection

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cut_upload_procs import update_state  # noqa: E402

pytestmark = pytest.mark.integration


def _transport(schema, spool_dir: Path, chunk_bytes: int, **kw) -> GrpcCoordinatorTransport:
    policy = SpoolPolicy(threshold=1 << 20, directory=spool_dir)
    return GrpcCoordinatorTransport(
        "127.0.0.1:0",
        TransportConfig(chunk_bytes=chunk_bytes, poll_timeout_s=0.2),
        run_id="large",
        config_yaml="{}",
        num_clients=2,
        decoder_factory=lambda tid, cid: StateDecoder(schema, Limits(max_total_bytes=1 << 30), spool=policy),
        **kw,
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_upload_cut_by_a_real_network_drop_resumes_across_processes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dpeft.events")
    size_mib, chunk = 32, 128 << 10
    expected = update_state(size_mib)
    payload_size = len(encode_state(expected))
    t = _transport(expected.schema(), tmp_path / "spool", chunk)
    upstream = t.start()
    port_file = tmp_path / "proxy.port"
    cut_after = 8 << 20  # a quarter of the upload, then the connection dies
    procs: list[subprocess.Popen] = []
    try:
        proxy = subprocess.Popen(
            [sys.executable, str(HERE / "cut_upload_procs.py"), "proxy", str(port_file), upstream, str(cut_after)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proxy)
        deadline = time.time() + 20
        while not (port_file.exists() and port_file.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        address = f"127.0.0.1:{port_file.read_text()}"
        blob = b"global-adapter"
        t.publish_blob("g1", blob)
        task = TrainTask("r1-c0-cut", 1, 0, "g1", len(blob), hashlib.sha256(blob).digest())
        t.submit([task], {})
        worker = subprocess.Popen(
            [sys.executable, str(HERE / "cut_upload_procs.py"), "worker", address, str(size_mib), str(chunk)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(worker)
        out, err = worker.communicate(timeout=90)
        assert worker.returncode == 0, err[-3000:]
        ev = t.next_event(10)
        assert isinstance(ev, TaskResult), ev
        assert isinstance(ev.delta, SpooledState)  # the big upload went through the spool file
        for name in expected:
            assert torch.equal(ev.delta[name], expected[name]), name
        report = json.loads(out.strip().splitlines()[-1])
        assert report["accepted"] and report["size"] == payload_size
        # the connection really was cut mid-upload, and the upload resumed instead of starting over
        _stop(proxy)
        cut = json.loads(proxy.stdout.read().strip().splitlines()[0])
        assert 0 < cut["cut_after_bytes"] <= cut_after
        assert t.stats()["uploads_resumed"] == 1
        assert "interrupted" in err and "resuming" in err
        # the coordinator resumed at the last chunk it had verified: past zero, on a chunk boundary,
        # no further than what got through before the cut
        resumed = re.findall(r"event=upload_resumed .*offset=(\d+)", caplog.text)
        assert len(resumed) == 1, caplog.text[-2000:]
        offset = int(resumed[0])
        assert 0 < offset <= cut["cut_after_bytes"] and offset % chunk == 0, (offset, cut)
        # the worker reports what it sent twice (what was in flight past that offset), far below the upload
        logged = re.search(r"uploaded; (\d+) bytes re-sent", err)
        assert logged is not None, err[-3000:]
        resent = int(logged.group(1))
        assert resent == report["bytes_resent"] and report["bytes_up"] == payload_size + resent
        assert 0 < resent < payload_size // 2, (resent, payload_size)
        print(f"cut after {cut['cut_after_bytes']} bytes, resumed at {offset}; {resent} of {payload_size} bytes re-sent")
    finally:
        for p in procs:
            _stop(p)
        t.shutdown("over", grace_s=0.1)


def test_spooled_global_is_served_from_its_file(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    state = AdapterState(
        OrderedDict([("w", torch.randn(700_000, generator=g)), ("v", torch.randn(3, 5, generator=g))]), {"round": 1}
    )
    blob = SpooledBlob.write(iter_encoded(state), SpoolPolicy(directory=tmp_path))
    payload = encode_state(state)
    assert len(blob) == len(payload) and blob.sha256 == hashlib.sha256(payload).digest()
    assert list(tmp_path.iterdir()) == []  # unlinked at once: nothing lingers on disk
    t = _transport(state.schema(), tmp_path, 64 << 10)
    address = t.start()
    try:
        conn = GrpcWorkerConnection(address, chunk_bytes=64 << 10, patience_s=10, heartbeat=False)
        conn.join("w0", None)
        t.publish_blob("g1", blob)
        t.submit([TrainTask("r1-c0-x", 1, 0, "g1", len(blob), blob.sha256)], {})
        task = conn.poll()
        # its CRC-32C was taken while it was written (the chunk CRCs are filled in as chunks are served)
        assert task.blob_crc32c == blob.crc32c == crc32c.crc32c(payload)
        assert bytes(conn.fetch(task)) == payload
        conn._cache = None  # fetch again, as an older worker would: CRC-32 chunks
        assert bytes(conn.fetch(dataclasses.replace(task, blob_crc32c=None))) == payload
        conn.leave()
    finally:
        t.shutdown("over", grace_s=0.1)


def test_spooled_decoder_matches_the_in_memory_one(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    state = AdapterState(
        OrderedDict(
            [
                ("a", torch.randn(300, 1000, generator=g)),
                ("e", torch.empty(0)),
                ("h", torch.randn(77, generator=g).half()),
                ("i", torch.arange(9)),
            ]
        ),
        {"k": 1},
    )
    payload = encode_state(state)
    dec = StateDecoder(state.schema(), spool=SpoolPolicy(threshold=1, directory=tmp_path))
    for pos in range(0, len(payload), 4099):
        dec.feed(payload[pos : pos + 4099])
    out = dec.finish()
    assert dec.spooled and isinstance(out, SpooledState) and out.meta == {"k": 1}
    norm = check_update(out)  # releases each tensor's pages; the data stays readable from the file
    assert math.isclose(
        norm,
        math.sqrt(sum(float(t.double().square().sum()) for t in state.tensors.values() if t.is_floating_point())),
        rel_tol=1e-6,  # float32 row sums (dpeft.codec.validation)
    )
    for name in state:
        assert torch.equal(out[name], state[name]), name
    out["a"].mul_(2)  # copy-on-write: a writer changes its own view, never the file
    assert torch.equal(out["a"], state["a"] * 2)
    small = StateDecoder(state.schema(), spool=SpoolPolicy(threshold=1 << 30))
    small.feed(payload)
    assert not small.spooled and not isinstance(small.finish(), SpooledState)


def test_norm_bound_and_non_finite_checks() -> None:
    state = AdapterState(OrderedDict([("a", torch.full((4,), 3.0)), ("b", torch.full((1,), 4.0)), ("n", torch.arange(3))]), {})
    norm = check_update(state)
    assert math.isclose(norm, math.sqrt(4 * 9 + 16))
    check_norm(norm, norm)  # at the bound: accepted
    check_norm(norm, None)  # no bound
    with pytest.raises(RejectedUpdate, match=r"\(norm\): update L2 norm 7\.2111 exceeds the bound 6"):
        check_norm(norm, 6.0)
    state.tensors["b"] = torch.tensor([float("nan")])
    with pytest.raises(RejectedUpdate, match=r"\(non_finite\): tensor b has NaN or Inf"):
        check_update(state)
