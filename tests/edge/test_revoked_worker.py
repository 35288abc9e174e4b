"""A worker whose token is revoked mid-task: its task goes back to the queue at its first
refused call (not after transport.dead_after_s) and another worker does it. Real gRPC, loopback."""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from dpeft.codec.tensors import Limits, StateDecoder, encode_state
from dpeft.config import TransportConfig
from dpeft.state import AdapterState
from dpeft.transport.auth import TokenStore
from dpeft.transport.base import TaskResult, TrainTask
from dpeft.transport.grpc.server import GrpcCoordinatorTransport
from dpeft.transport.grpc.worker import AuthRefused, GrpcWorkerConnection

SCHEMA = OrderedDict([("a.weight", ((8, 16), torch.float32))])
TOKENS = {"w0": "token-w0-0123456789abcdef", "w1": "token-w1-0123456789abcdef"}
DEAD_AFTER_S = 30.0
SETTINGS = TransportConfig(poll_timeout_s=0.2, dead_after_s=DEAD_AFTER_S)


def test_a_revoked_workers_task_is_requeued_at_once_and_done_by_another(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps(TOKENS))
    t = GrpcCoordinatorTransport(
        "127.0.0.1:0", SETTINGS, run_id="revoke", config_yaml="{}", num_clients=2,
        decoder_factory=lambda tid, cid: StateDecoder(SCHEMA, Limits(max_total_bytes=1 << 20)),
        tokens=TokenStore(tokens_file, check_every_s=0.0),
    )
    address = t.start()
    revoked = GrpcWorkerConnection(address, token=TOKENS["w0"], patience_s=5, heartbeat=False)
    other = GrpcWorkerConnection(address, token=TOKENS["w1"], patience_s=5, heartbeat=False)
    try:
        revoked.join("w0", None)
        other.join("w1", None)
        blob = b"global"
        task = TrainTask("r1-c0", 1, 0, "blob1", len(blob), hashlib.sha256(blob).digest())
        t.publish_blob("blob1", blob)
        t.submit([task], {})
        assert revoked.poll().task_id == task.task_id  # w0 takes the task ...
        assert isinstance(other.poll(), float)  # ... so w1 has nothing to do
        tokens_file.write_text(json.dumps({"w1": TOKENS["w1"]}))  # mid-task, w0's token is revoked
        start = time.time()
        with pytest.raises(AuthRefused, match="invalid or revoked token"):
            revoked.heartbeat()  # w0's next call is refused (so would its Leave be)
        got = other.poll()
        requeued_s = time.time() - start
        assert isinstance(got, TrainTask) and got.task_id == task.task_id, "the revoked worker's task was not re-queued"
        assert requeued_s < 5.0 < DEAD_AFTER_S
        assert t.workers()["w0"]["alive"] is False and t.workers()["w1"]["alive"] is True
        update = encode_state(AdapterState(OrderedDict([("a.weight", torch.ones(8, 16))]), {}))
        assert other.fetch(got) == blob
        assert other.push(got, update, 3, {"loss": 0.5}) == (True, "")
        ev = t.next_event(5.0)
        assert isinstance(ev, TaskResult) and ev.task_id == task.task_id and ev.worker_id == "w1"
        # the refusal itself still reaches the engine only for uploads; w0's late upload is refused
        with pytest.raises(AuthRefused):
            revoked.push(task, update, 3, {})
    finally:
        other.leave()
        revoked.leave()
        t.shutdown("over", grace_s=0.1)


def test_a_wrong_token_for_a_listed_worker_takes_nothing_away(tmp_path: Path) -> None:
    """Anyone can send a wrong token with a listed worker id: that must not take the worker's task."""
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps(TOKENS))
    t = GrpcCoordinatorTransport(
        "127.0.0.1:0", SETTINGS, run_id="revoke", config_yaml="{}", num_clients=2,
        decoder_factory=lambda tid, cid: StateDecoder(SCHEMA), tokens=TokenStore(tokens_file, check_every_s=0.0),
    )
    address = t.start()
    worker = GrpcWorkerConnection(address, token=TOKENS["w0"], patience_s=5, heartbeat=False)
    impostor = GrpcWorkerConnection(address, token="not-the-token-of-w0-at-all", patience_s=5, heartbeat=False)
    try:
        worker.join("w0", None)
        t.publish_blob("blob1", b"g")
        t.submit([TrainTask("r1-c0", 1, 0, "blob1", 1, hashlib.sha256(b"g").digest())], {})
        assert worker.poll().task_id == "r1-c0"
        with pytest.raises(AuthRefused):
            impostor.join("w0", None)
        assert t.queue.in_flight() == {"r1-c0": "w0"} and t.workers()["w0"]["alive"] is True
    finally:
        worker.leave()
        impostor.leave()
        t.shutdown("over", grace_s=0.1)
