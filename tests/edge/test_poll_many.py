"""PollRequest.max_tasks over real gRPC: a lockstep worker takes its fair share of a round's tasks.

A worker that trains clients together asks for up to K tasks; the coordinator hands it
ceil(that round's tasks / idle virtual-client hosts) of them (itself counted), never tasks of
two rounds in one reply, and a plain poll still gets exactly one task.
"""

from __future__ import annotations

import hashlib

import pytest

from dpeft.config import TransportConfig
from dpeft.transport.base import TrainTask
from dpeft.transport.grpc import GrpcCoordinatorTransport, GrpcWorkerConnection


def _tasks(round_num: int, clients: range) -> list[TrainTask]:
    return [TrainTask(f"r{round_num}-c{c}", round_num, c, "blob", 1, hashlib.sha256(b"x").digest(), {}) for c in clients]


@pytest.fixture
def coordinator():
    t = GrpcCoordinatorTransport(
        "127.0.0.1:0",
        TransportConfig(poll_timeout_s=0.2),
        run_id="poll-many",
        config_yaml="{}",
        num_clients=16,
        decoder_factory=lambda tid, cid: None,
    )
    address = t.start()
    conns: list[GrpcWorkerConnection] = []

    def connect(worker_id: str) -> GrpcWorkerConnection:
        c = GrpcWorkerConnection(address, heartbeat=False, patience_s=5)
        c.join(worker_id, own_examples=None)
        conns.append(c)
        return c

    yield t, connect
    for c in conns:
        c.leave()
    t.shutdown("test over", grace_s=0.5)


def _ids(item) -> list[str]:
    assert isinstance(item, list), item
    return [t.task_id for t in item]


def test_fair_share_among_idle_workers(coordinator) -> None:
    t, connect = coordinator
    a, b, c = connect("a"), connect("b"), connect("c")
    t.submit(_tasks(1, range(7)) + _tasks(2, range(2)), {})
    got_a = _ids(a.poll_many(8))  # 3 idle hosts, 7 tasks of round 1: ceil(7 / 3)
    assert got_a == ["r1-c0", "r1-c1", "r1-c2"]
    got_b = _ids(b.poll_many(8))  # a is busy now: 4 left for 2 idle hosts
    assert got_b == ["r1-c3", "r1-c4"]
    got_c = _ids(c.poll_many(8))
    assert got_c == ["r1-c5", "r1-c6"]
    # round 1 is all handed out; round 2's tasks never come in the same reply as round 1's
    assert _ids(a.poll_many(8)) == ["r2-c0", "r2-c1"]
    assert isinstance(a.poll_many(8), float)  # nothing left: wait
    assert t.queue.inflight_count == 9 and not t.queue.pending_count


def test_cap_and_plain_poll(coordinator) -> None:
    t, connect = coordinator
    a = connect("a")
    t.submit(_tasks(1, range(5)), {})
    assert _ids(a.poll_many(2)) == ["r1-c0", "r1-c1"]  # at most max_tasks
    task = a.poll()  # a worker without lockstep: one task per poll, as before
    assert isinstance(task, TrainTask) and task.task_id == "r1-c2"
    assert _ids(a.poll_many(1)) == ["r1-c3"]
