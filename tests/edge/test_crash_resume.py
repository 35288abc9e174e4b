"""Real processes on loopback, TLS + tokens: a worker SIGKILLed while it holds a task (its task
is re-queued after transport.dead_after_s and the round completes), then the coordinator
SIGKILLed mid-round and restarted with the same run_dir/listen: the surviving worker
reconnects by itself and the final adapter equals an uninterrupted run's (tolerance 1e-6).

The uninterrupted reference runs in-process (engine + transport + a worker thread) on the same
tiny BERT; the interrupted run uses `dpeft coordinator` / `dpeft worker` subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from edge_testlib import free_port, tiny_overrides

from dpeft.config import TransportConfig, dump_config
from dpeft.rounds.checkpoint import latest_checkpoint
from dpeft.rounds.global_model import GlobalModel
from dpeft.transport.grpc import GrpcCoordinatorTransport, GrpcWorkerConnection
from dpeft.transport.tls import channel_credentials
from dpeft.validate import load_config
from dpeft_coordinator.engine import RoundEngine
from dpeft_workers.loop import run_worker

pytestmark = pytest.mark.integration

DPEFT = [sys.executable, "-m", "dpeft_launch.cli"]
EXTRA = {"rounds": 3, "train__local_steps": 300, "transport__dead_after_s": 2.0, "transport__heartbeat_s": 0.5}
TOKENS = {"w0": "tok-w0-0123456789abcdef", "w1": "tok-w1-0123456789abcdef", "admin": "tok-admin-0123456789abcd"}


def _reference(tiny_model: Path, run_dir: Path) -> dict[str, torch.Tensor]:
    cfg = load_config(None, tiny_overrides(tiny_model, run_dir, **EXTRA))
    engine = RoundEngine(cfg, GlobalModel(cfg), run_dir, resume=False)
    transport = GrpcCoordinatorTransport(
        "127.0.0.1:0", TransportConfig(poll_timeout_s=0.5), run_id="ref", config_yaml=dump_config(cfg), num_clients=cfg.clients,
        decoder_factory=engine.decoder_for,
    )
    address = transport.start()
    threads = torch.get_num_threads()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            run_worker(GrpcWorkerConnection(address, patience_s=30), "ref-w", threads=1)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    th = threading.Thread(target=work, daemon=True)
    th.start()
    try:
        engine.run(transport)
    finally:
        transport.shutdown("done", grace_s=5)
        th.join(30)
        torch.set_num_threads(threads)
    assert not errors, errors
    found = latest_checkpoint(run_dir / "checkpoints")
    assert found is not None and found[0] == 3
    return dict(found[1].items())


class _Proc:
    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self.fh = open(log, "wb")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.p = subprocess.Popen([*DPEFT, *args], stdout=self.fh, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.p.wait(timeout)
        finally:
            self.fh.close()

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait(10)
        self.fh.close()


class Admin:
    """One status channel kept open for the whole poll. A fresh channel per poll would share
    gRPC's process-wide subchannel, whose reconnect backoff (1 s, growing) after a refused
    connection can outlast a whole tiny run; so pollers wait for `listening` first and reuse this."""

    def __init__(self, address: str, ca: Path | None = None) -> None:
        creds = channel_credentials(str(ca)) if ca else None
        self.conn = GrpcWorkerConnection(address, token=TOKENS["admin"] if ca else "", credentials=creds, patience_s=2, heartbeat=False)
        self.conn.worker_id = "admin"

    def status(self) -> dict:
        return self.conn.status()

    def busy(self, worker_id: str):
        """A predicate for `_until`: the worker holds a task (returns the status then)."""
        def pred():
            st = self.status()
            return any(w["worker_id"] == worker_id and w["current_task"] for w in st["workers"]) and st
        return pred

    def close(self) -> None:
        self.conn.channel.close()


def wait_listening(coord: _Proc, procs: list[_Proc]) -> None:
    _until(lambda: "event=listening" in coord.text(), 180, "the coordinator to listen", procs)


def _until(pred, timeout: float, what: str, procs: list[_Proc]):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = pred()
        except Exception:  # noqa: BLE001 - the coordinator may be starting
            value = None
        if value:
            return value
        time.sleep(0.02)
    logs = "\n".join(f"--- {p.log.name}\n{p.text()[-3000:]}" for p in procs)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def test_worker_and_coordinator_sigkill_same_final_adapter(tiny_model: Path, certs: Path, tmp_path: Path) -> None:
    reference = _reference(tiny_model, tmp_path / "reference")

    (tmp_path / "tokens.yaml").write_text(json.dumps(TOKENS))
    for w in ("w0", "w1"):
        (tmp_path / f"{w}.token").write_text(TOKENS[w] + "\n")
    run = tmp_path / "run"
    listen = f"127.0.0.1:{free_port()}"
    coord_args = [
        "coordinator", "--listen", listen, "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
        "--tokens-file", str(tmp_path / "tokens.yaml"), *tiny_overrides(tiny_model, run, **EXTRA),
    ]
    procs: list[_Proc] = []
    try:
        coord = _Proc(coord_args, tmp_path / "coordinator-1.log")
        procs.append(coord)
        wait_listening(coord, procs)
        admin = Admin(listen, certs / "ca.pem")
        def worker(w: str) -> _Proc:
            args = ["worker", "--coordinator", listen, "--worker-id", w, "--token-file", str(tmp_path / f"{w}.token"),
                    "--ca", str(certs / "ca.pem"), "--threads", "1", "--patience", "90"]
            return _Proc(args, tmp_path / f"{w}.log")

        # 1. w1 (alone) holds a round-1 task -> SIGKILL it; then w0 joins and gets the re-queued task too
        w1 = worker("w1")
        procs.append(w1)
        _until(admin.busy("w1"), 180, "w1 to hold a task", procs)
        w1.kill()
        w0 = worker("w0")
        procs.append(w0)

        # 2. round 1 checkpointed and round 2 under way -> SIGKILL the coordinator
        def round2_running():
            st = admin.status()
            return st["round"] == 2 and st["tasks_done"] < st["tasks_submitted"] and (run / "checkpoints" / "round-000001.safetensors").exists() and st
        st = _until(round2_running, 180, "round 2 to be running", procs)
        assert any(w["worker_id"] == "w1" and w["state"] == "dead" for w in st["workers"]), st
        admin.close()
        coord.kill()
        first_log = coord.text()
        assert "event=worker_dead worker=w1" in first_log, first_log[-3000:]
        assert "requeued=1" in first_log.split("event=worker_dead worker=w1", 1)[1].splitlines()[0]

        # 3. restart with the same run_dir and listen address; w0 reconnects by itself
        coord2 = _Proc(coord_args, tmp_path / "coordinator-2.log")
        procs.append(coord2)
        rc = coord2.wait(180)
        log2 = coord2.text()
        assert rc == 0, log2[-4000:]
        assert "event=resumed round=1" in log2
        assert "event=worker_joined worker=w0" in log2 and "rejoin=True" in log2
        assert w0.wait(60) == 0, w0.text()[-3000:]
        assert "Traceback" not in log2 and "Traceback" not in w0.text()
    finally:
        for p in procs:
            p.kill()

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(r["clients"] == 2 for r in rows[1:])
    found = latest_checkpoint(run / "checkpoints")
    assert found is not None and found[0] == 3
    final = dict(found[1].items())
    assert final.keys() == reference.keys()
    diff = max(float((final[k].double() - reference[k].double()).abs().max()) for k in final)
    moved = max(float((final[k].double()).abs().max()) for k in final)
    print(f"max |interrupted - uninterrupted| = {diff:.3g} (largest entry {moved:.3g})")
    assert moved > 0 and diff <= 1e-6, f"max |interrupted - uninterrupted| = {diff}"
