"""The gRPC transport against real-network trouble, in-process on loopback (no model):
TLS (wrong CA, plaintext, mutual TLS), tokens, resumable and corrupted uploads, liveness
(dead worker's task re-queued), reconnection after a coordinator restart, `dpeft status`."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections import OrderedDict
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from edge_testlib import free_port

from dpeft.codec import encode_state
from dpeft.codec.tensors import Limits, StateDecoder
from dpeft.config import TransportConfig
from dpeft.errors import ConfigError
from dpeft.state import AdapterState
from dpeft.transport.auth import TokenStore
from dpeft.transport.base import TaskResult, TrainTask
from dpeft.transport.grpc import AuthRefused, CoordinatorGone, GrpcCoordinatorTransport, GrpcWorkerConnection
from dpeft.transport.grpc.tls_check import TlsMismatch
from dpeft.transport.tls import channel_credentials, server_credentials

SCHEMA = OrderedDict([("a.weight", ((64, 1024), torch.float32)), ("b.bias", ((16,), torch.float32))])
FAST = TransportConfig(poll_timeout_s=0.2)  # the tests wait on task polls
TOKENS = {"w0": "token-w0-0123456789abcdef", "w1": "token-w1-0123456789abcdef", "admin": "token-admin-0123456789"}


def _state(seed: int = 0) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    return AdapterState(OrderedDict((k, torch.randn(s, generator=g, dtype=d)) for k, (s, d) in SCHEMA.items()), {})


def _transport(tmp_path: Path | None = None, listen: str = "127.0.0.1:0", settings: TransportConfig = FAST, **kw) -> GrpcCoordinatorTransport:
    tokens = None
    if tmp_path is not None:
        f = tmp_path / "tokens.json"
        if not f.exists():
            f.write_text(json.dumps(TOKENS))
        tokens = TokenStore(f, check_every_s=0.0)
    return GrpcCoordinatorTransport(
        listen, settings, run_id="edge", config_yaml="{}", num_clients=4,
        decoder_factory=lambda tid, cid: StateDecoder(SCHEMA, Limits(max_total_bytes=1 << 24)), tokens=tokens, **kw,
    )


def _task(blob: bytes, tid: str = "r1-c0-x", client: int = 0) -> TrainTask:
    import hashlib

    return TrainTask(tid, 1, client, "blob1", len(blob), hashlib.sha256(blob).digest())


def _event(t: GrpcCoordinatorTransport, timeout: float = 5.0):
    ev = t.next_event(timeout)
    assert ev is not None, "no event"
    return ev


# -- TLS and tokens -------------------------------------------------------------------------------
def test_tls_with_token_works_and_wrong_ca_or_plaintext_is_refused(tmp_path: Path, certs: Path) -> None:
    t = _transport(tmp_path, credentials=server_credentials(str(certs / "server.pem"), str(certs / "server.key")))
    address = t.start()
    try:
        ok = GrpcWorkerConnection(address, token=TOKENS["w0"], credentials=channel_credentials(str(certs / "ca.pem")), patience_s=5)
        ok.join("w0", None)
        assert isinstance(ok.poll(), float)
        ok.leave()
        # settings that can never work fail at once (not after the patience), naming the flag to fix
        wrong_ca = GrpcWorkerConnection(address, token=TOKENS["w0"], credentials=channel_credentials(str(certs / "other" / "ca.pem")), patience_s=60)
        t0 = time.monotonic()
        with pytest.raises(TlsMismatch, match="does not trust .*pass --ca") as err:
            wrong_ca.join("w0", None)
        assert err.value.exit_code == 2 and time.monotonic() - t0 < 20
        wrong_ca.channel.close()
        plain = GrpcWorkerConnection(address, token=TOKENS["w0"], patience_s=60)
        with pytest.raises(TlsMismatch, match="speaks TLS and this worker dialled in plaintext; pass --ca"):
            plain.join("w0", None)
        plain.channel.close()
        wrong_name = GrpcWorkerConnection(address, credentials=channel_credentials(str(certs / "ca.pem")), server_name="elsewhere.example", patience_s=60)
        with pytest.raises(TlsMismatch, match="--server-name"):
            wrong_name.join("w0", None)
        wrong_name.channel.close()
        bad_token = GrpcWorkerConnection(address, token="nope-nope-nope-nope", credentials=channel_credentials(str(certs / "ca.pem")), patience_s=5)
        with pytest.raises(AuthRefused, match="invalid or revoked token"):
            bad_token.join("w0", None)
        bad_token.channel.close()
    finally:
        t.shutdown("over", grace_s=0.1)


def test_mutual_tls_requires_a_client_certificate(certs: Path) -> None:
    creds = server_credentials(str(certs / "server.pem"), str(certs / "server.key"), str(certs / "ca.pem"))
    t = _transport(credentials=creds)
    address = t.start()
    try:
        with_cert = GrpcWorkerConnection(address, credentials=channel_credentials(str(certs / "ca.pem"), str(certs / "client.pem"), str(certs / "client.key")), patience_s=5)
        with_cert.join("w0", None)
        with_cert.leave()
        without = GrpcWorkerConnection(address, credentials=channel_credentials(str(certs / "ca.pem")), patience_s=1)
        with pytest.raises((TlsMismatch, CoordinatorGone)):  # TLS 1.3: the refusal may come after the handshake
            without.join("w1", None)
        without.channel.close()
    finally:
        t.shutdown("over", grace_s=0.1)


def test_tls_config_errors_name_the_key(certs: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="auth.tls_key"):
        server_credentials(str(certs / "server.pem"), None)
    (tmp_path / "x.pem").write_text("not pem")
    with pytest.raises(ConfigError, match="auth.tls_cert"):
        server_credentials(str(tmp_path / "x.pem"), str(certs / "server.key"))
    bad = tmp_path / "bad-tokens.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="auth.tokens_file"):
        TokenStore(bad)


def test_token_store_reload_revocation_and_hashed_entries(tmp_path: Path) -> None:
    import hashlib

    f = tmp_path / "t.yaml"
    f.write_text(f"w0: {TOKENS['w0']}\nw1: sha256:{hashlib.sha256(TOKENS['w1'].encode()).hexdigest()}\n")
    store = TokenStore(f, check_every_s=0.0)
    assert store.check("w0", TOKENS["w0"]) and store.check("w1", TOKENS["w1"])
    assert not store.check("w1", TOKENS["w0"]) and not store.check("w9", TOKENS["w0"]) and not store.check("w0", "")
    f.write_text(f"w1: sha256:{hashlib.sha256(TOKENS['w1'].encode()).hexdigest()}\n")
    assert not store.check("w0", TOKENS["w0"]) and store.check("w1", TOKENS["w1"])
    f.write_text("{not yaml: [")  # fails closed
    assert not store.check("w1", TOKENS["w1"])


# -- resumable uploads ----------------------------------------------------------------------------
def test_upload_cut_at_60_percent_resumes_and_a_corrupt_chunk_is_resent(tmp_path: Path) -> None:
    t = _transport(tmp_path, settings=dataclasses.replace(FAST, chunk_bytes=16 << 10))
    address = t.start()
    try:
        conn = GrpcWorkerConnection(address, token=TOKENS["w0"], chunk_bytes=16 << 10, patience_s=10)
        conn.join("w0", None)
        payload = encode_state(_state(1))
        task = _task(b"g")
        t.publish_blob("blob1", b"g")
        t.submit([task], {})
        task = conn.poll()  # as handed out: with the payload's CRC-32C, so the upload uses CRC-32C (the default path)
        assert task.task_id == "r1-c0-x" and task.blob_crc32c is not None
        cut_at = int(len(payload) * 0.6)
        fired = []
        seen: list[int] = []

        def restarts() -> list[int]:
            """Offsets where a new attempt began (the sequence of chunk offsets went back)."""
            return [b for a, b in zip(seen, seen[1:], strict=False) if b <= a]

        def cut(offset: int, data: bytes) -> bytes:
            seen.append(offset)
            if offset >= cut_at and not fired:
                fired.append(offset)
                deadline = time.time() + 10  # let the coordinator verify what was sent so far ("acknowledged")
                while time.time() < deadline and t.uploads.progress(task.task_id, "w0")[0] < offset:
                    time.sleep(0.01)
                raise ConnectionResetError("network dropped")
            return data

        conn.chunk_hook = cut
        assert conn.push(task, payload, 10, {}) == (True, "")
        ev = _event(t)
        assert isinstance(ev, TaskResult) and torch.equal(ev.delta["a.weight"], _state(1)["a.weight"])
        assert t.stats()["uploads_resumed"] == 1
        # resumed from what the coordinator had verified (near the cut), not from zero
        assert restarts() == fired, (restarts(), fired)  # continued from the last acknowledged chunk
        assert conn.bytes_resent == 0
        assert conn.bytes_up == len(payload) + conn.bytes_resent

        # a corrupted chunk: DATA_LOSS, re-sent from its offset, update intact
        t.submit([_task(b"g", "r1-c1-y", 1)], {})
        task2 = conn.poll()
        assert task2.task_id == "r1-c1-y" and task2.blob_crc32c is not None
        flipped = []
        seen.clear()

        def corrupt(offset: int, data: bytes) -> bytes:
            seen.append(offset)
            if offset > 0 and not flipped:
                flipped.append(offset)
                return bytes([data[0] ^ 0x40]) + data[1:]
            return data

        conn.chunk_hook = corrupt
        sent_before = conn.bytes_resent
        assert conn.push(task2, payload, 10, {}) == (True, "")
        ev = _event(t)
        assert isinstance(ev, TaskResult) and torch.equal(ev.delta["a.weight"], _state(1)["a.weight"])
        assert t.stats()["corrupt_chunks"] == 1
        assert restarts() == flipped  # re-sent from the corrupted chunk on
        assert conn.bytes_resent > sent_before
        conn.leave()
    finally:
        t.shutdown("over", grace_s=0.1)


# -- liveness and reconnection ------------------------------------------------------------------------
def test_dead_worker_task_is_requeued_and_the_worker_can_come_back(tmp_path: Path) -> None:
    t = _transport(tmp_path, settings=dataclasses.replace(FAST, dead_after_s=0.6))
    address = t.start()
    try:
        silent = GrpcWorkerConnection(address, token=TOKENS["w0"], patience_s=5, heartbeat=False)
        silent.join("w0", None)
        live = GrpcWorkerConnection(address, token=TOKENS["w1"], patience_s=5)
        live.heartbeat_s = 0.2
        live.join("w1", None)
        task = _task(b"g")
        t.publish_blob("blob1", b"g")
        t.submit([task], {})
        assert silent.poll().task_id == task.task_id  # w0 takes it and goes quiet
        deadline = time.time() + 10
        got = None
        while time.time() < deadline and got is None:
            item = live.poll()
            got = item if isinstance(item, TrainTask) else None
        assert got is not None and got.task_id == task.task_id, "the dead worker's task was not re-queued"
        assert t.workers()["w0"]["alive"] is False and t.workers()["w1"]["alive"] is True
        silent.heartbeat()
        assert t.workers()["w0"]["alive"] is True
        silent.leave()
        live.leave()
    finally:
        t.shutdown("over", grace_s=0.1)


def test_worker_rejoins_a_restarted_coordinator_and_resumes(tmp_path: Path) -> None:
    port = free_port()
    listen = f"127.0.0.1:{port}"
    first = _transport(tmp_path, listen=listen, registry_path=tmp_path / "workers.json")
    first.start()
    conn = GrpcWorkerConnection(listen, token=TOKENS["w0"], patience_s=30)
    reg = conn.join("w0", 5)  # own data: gets client slot 0
    assert reg.client_ids == [0]
    first.shutdown("crash", grace_s=0.0)
    second = None
    try:
        import threading

        def restart() -> None:
            nonlocal second
            time.sleep(1.0)
            other = GrpcWorkerConnection(listen, token=TOKENS["w1"], patience_s=30)
            second = _transport(tmp_path, listen=listen, registry_path=tmp_path / "workers.json")
            second.start()
            assert other.join("w1", 5).client_ids == [1]  # w0's slot stays w0's across the restart
            other.leave()

        th = threading.Thread(target=restart)
        th.start()
        item = conn.poll()  # UNAVAILABLE (retried with backoff), then ABORTED -> re-join
        th.join()
        assert isinstance(item, (float, str))
        assert conn.rejoins == 1
        assert second is not None and second.workers()["w0"]["client_ids"] == [0]
        conn.leave()
    finally:
        if second is not None:
            second.shutdown("over", grace_s=0.1)


def test_status_command(tmp_path: Path, certs: Path) -> None:
    from dpeft_launch.cli import main

    t = _transport(tmp_path, credentials=server_credentials(str(certs / "server.pem"), str(certs / "server.key")), total_rounds=5)
    address = t.start()
    try:
        w = GrpcWorkerConnection(address, token=TOKENS["w0"], credentials=channel_credentials(str(certs / "ca.pem")))
        w.join("w0", None)
        t.publish_blob("blob1", b"g")
        t.submit([_task(b"g"), _task(b"g", "r1-c2-z", 2)], {})
        w.poll()
        buf = io.StringIO()
        with redirect_stdout(buf):
            rc = main(["status", "--coordinator", address, "--token", TOKENS["admin"], "--ca", str(certs / "ca.pem")])
        out = buf.getvalue()
        assert rc == 0, out
        assert "round 1/5: 0/2 tasks done, 1 in flight, 1 queued" in out
        assert "w0" in out and "alive" in out and "r1-c0-x" in out
        assert main(["status", "--coordinator", address, "--token", "wrong-wrong-wrong", "--ca", str(certs / "ca.pem")]) == 1
        w.leave()
    finally:
        t.shutdown("over", grace_s=0.1)


def test_a_tls_worker_against_a_plaintext_coordinator_exits_2_at_once_without_grpc_noise(certs: Path) -> None:
    import subprocess
    import sys

    t = _transport()
    address = t.start()
    try:
        w = GrpcWorkerConnection(address, credentials=channel_credentials(str(certs / "ca.pem")), patience_s=60)
        with pytest.raises(TlsMismatch, match="does not speak TLS .*drop --tls"):
            w.join("w0", None)
        w.channel.close()
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "dpeft_launch", "status", "--coordinator", address, "--ca", str(certs / "ca.pem")]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr
        assert time.monotonic() - t0 < 60
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert lines == [f"dpeft: TLS: the coordinator at {address} does not speak TLS (plaintext); drop --tls/--ca/--cert, or start the coordinator with --tls-cert and --tls-key"], p.stderr
    finally:
        t.shutdown("over", grace_s=0.1)


def test_channel_options_fit_a_chunk_and_welcome_keepalive_pings() -> None:
    """Both ends take the same options: a chunk plus framing fits a message, and the server lets
    an idle client ping at its keepalive interval (grpc's default would answer "too_many_pings")."""
    from dpeft.transport.grpc.channel import channel_options

    opts = dict(channel_options(8 << 20))
    assert opts["grpc.max_receive_message_length"] > 8 << 20 and opts["grpc.max_send_message_length"] > 8 << 20
    assert opts["grpc.http2.min_ping_interval_without_data_ms"] < opts["grpc.keepalive_time_ms"]
