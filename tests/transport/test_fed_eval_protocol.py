"""The evaluation task on the wire: TrainTask.kind and JoinRequest.task_kinds round trips, and
the queue never handing an evaluation task to a worker that did not declare it (an older worker
would ignore the kind and train)."""

from __future__ import annotations

import pytest

from dpeft._proto.dpeft.v1 import coordinator_pb2 as pb
from dpeft.errors import ProtocolError
from dpeft.rounds.fedeval import EVALUATE
from dpeft.transport import serde
from dpeft.transport.base import TrainTask
from dpeft.transport.messages import PollAnswer, WorkerJoin
from dpeft.transport.queue import TaskQueue


def _task(task_id: str, client: int = 0, kind: str = "", round_num: int = 1) -> TrainTask:
    return TrainTask(task_id, round_num, client, "b", 10, b"\x00" * 32, {"personal": ["lora_B"]}, blob_crc32=7, kind=kind)


def test_evaluation_task_round_trip() -> None:
    task = _task("r1e-c3", 3, EVALUATE)
    wire = serde.task_to_proto(task)
    assert wire.kind == "evaluate"
    back = serde.task_from_proto(pb.TrainTask.FromString(wire.SerializeToString()))
    assert back == task
    # a poll reply carrying evaluation tasks keeps their kind
    answer = serde.poll_answer_from_proto(
        pb.PollReply.FromString(serde.poll_answer_to_proto(PollAnswer(tasks=[task, _task("x", 4, EVALUATE)])).SerializeToString())
    )
    assert [t.kind for t in answer.tasks] == [EVALUATE, EVALUATE]
    # a training task: no kind on the wire ("train" from a peer means the same)
    train = _task("r1-c3")
    assert serde.task_from_proto(serde.task_to_proto(train)).kind == ""
    assert serde.task_from_proto(pb.TrainTask(task_id="t", kind="train")).kind == ""
    with pytest.raises(ProtocolError, match="kind"):
        serde.task_from_proto(pb.TrainTask(task_id="t", kind="x" * 65))


def test_join_declares_task_kinds_and_older_workers_declare_none() -> None:
    join = WorkerJoin("w1", "tok", own_data=True, own_examples=5, task_kinds=[EVALUATE])
    back = serde.join_from_proto(pb.JoinRequest.FromString(serde.join_to_proto(join).SerializeToString()))
    assert back == join
    old = pb.JoinRequest(worker_id="w0", token="t")  # what a worker from before the field sends
    assert serde.join_from_proto(pb.JoinRequest.FromString(old.SerializeToString())).task_kinds == []
    with pytest.raises(ProtocolError, match="task_kinds"):
        serde.join_from_proto(pb.JoinRequest(worker_id="w", task_kinds=["k"] * 17))


def test_queue_hands_evaluation_tasks_only_to_workers_that_declared_them() -> None:
    q = TaskQueue()
    q.submit([_task("e0", 0, EVALUATE), _task("t1", 1), _task("e2", 2, EVALUATE)], {})
    old = q.take("old", max_tasks=4)
    assert [a.task.task_id for a in old] == ["t1"]  # the older worker trains, never evaluates
    assert q.take("old", max_tasks=4) == []
    new = q.take("new", max_tasks=4, kinds=[EVALUATE])
    assert [a.task.task_id for a in new] == ["e0", "e2"]
    # one hand-out never mixes kinds (a lockstep batch is all training or all evaluation)
    q.submit([_task("e5", 5, EVALUATE), _task("t6", 6), _task("e7", 7, EVALUATE)], {})
    assert [a.task.task_id for a in q.take("new", max_tasks=4, kinds=[EVALUATE])] == ["e5", "e7"]
    assert [a.task.task_id for a in q.take("new", max_tasks=4, kinds=[EVALUATE])] == ["t6"]


def test_grpc_coordinator_never_hands_an_evaluation_task_to_an_older_worker() -> None:
    """Over real gRPC: a worker that joined without task_kinds (as older workers do) gets the
    training task only; a worker that declared "evaluate" gets the evaluation task, kind intact."""
    from dpeft.config import TransportConfig
    from dpeft.transport.grpc import GrpcCoordinatorTransport, GrpcWorkerConnection

    t = GrpcCoordinatorTransport(
        "127.0.0.1:0",
        TransportConfig(poll_timeout_s=0.2),
        run_id="kinds",
        config_yaml="{}",
        num_clients=4,
        decoder_factory=lambda tid, cid: None,
    )
    address = t.start()
    old, new = (
        GrpcWorkerConnection(address, heartbeat=False, patience_s=5),
        GrpcWorkerConnection(address, heartbeat=False, patience_s=5),
    )
    try:
        old.join("old", None)
        new.task_kinds = (EVALUATE,)
        new.join("new", None)
        assert t.workers()["old"]["task_kinds"] == [] and t.workers()["new"]["task_kinds"] == [EVALUATE]
        t.submit([_task("e0", 0, EVALUATE), _task("t1", 1)], {})
        got = old.poll_many(4)
        assert isinstance(got, list) and [x.task_id for x in got] == ["t1"]
        assert isinstance(old.poll_many(4), float)  # nothing it may run: wait
        got = new.poll_many(4)
        assert isinstance(got, list) and [(x.task_id, x.kind) for x in got] == [("e0", EVALUATE)]
    finally:
        old.leave()
        new.leave()
        t.shutdown("test over", grace_s=0.5)
