"""Bad input over the real wire: every case gets a precise gRPC status and message, is counted
in metrics.jsonl, and leaves the global adapter untouched.

One in-process coordinator (RoundEngine + GrpcCoordinatorTransport with a tokens file, tiny
BERT) runs a round; a raw client built on the project's stubs sends crafted messages, then
uploads zero deltas for the round's two tasks so it closes. The global after the round must be
bit-identical to the one before (only zero deltas were folded in).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
import zlib
from collections import OrderedDict
from pathlib import Path

import crc32c
import grpc
import pytest
import torch
from edge_testlib import RawClient, tiny_overrides

from dpeft._proto.dpeft.v1 import coordinator_pb2 as pb
from dpeft.codec import encode_state
from dpeft.codec.crc import CRC32C
from dpeft.rounds.global_model import GlobalModel
from dpeft.state import AdapterState
from dpeft.transport.auth import TokenStore
from dpeft.transport.grpc import GrpcCoordinatorTransport
from dpeft.validate import load_config
from dpeft_coordinator.engine import RoundEngine

pytestmark = pytest.mark.integration

TOKENS = {"good": "good-token-0123456789", "revoked": "revoked-token-0123456789", "admin": "admin-token-0123456789"}


def _payload(schema, mutate=None) -> bytes:
    tensors = OrderedDict((k, torch.zeros(shape, dtype=dtype)) for k, (shape, dtype) in schema.items())
    if mutate is not None:
        tensors = mutate(tensors)
    return encode_state(AdapterState(tensors, {}))


def _code(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def scenario(tiny_model: Path, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bad-input")
    tokens_file = tmp / "tokens.yaml"
    tokens_file.write_text(json.dumps(TOKENS))
    cfg = load_config(None, tiny_overrides(tiny_model, tmp / "run", rounds=2, transport__max_update_bytes=1 << 20, transport__max_update_norm=10.0))
    engine = RoundEngine(cfg, GlobalModel(cfg), Path(cfg.run_dir), resume=False)
    before = {k: v.clone() for k, v in engine.global_state.items()}
    schema = engine.schema
    transport = GrpcCoordinatorTransport(
        "127.0.0.1:0",
        dataclasses.replace(cfg.transport, poll_timeout_s=0.2),
        run_id="bad-input",
        config_yaml="{}",
        num_clients=cfg.clients,
        decoder_factory=engine.decoder_for,
        tokens=TokenStore(tokens_file, check_every_s=0.0),
    )
    address = transport.start()
    out: dict = {"cases": {}}
    cases = out["cases"]
    rows: list = []
    runner = threading.Thread(target=lambda: rows.append(engine.run_round(transport)), daemon=True)
    good = RawClient(address, "good", TOKENS["good"])
    revoked = RawClient(address, "revoked", TOKENS["revoked"])
    try:
        # --- authentication ------------------------------------------------------------
        cases["no_token"] = _code(lambda: RawClient(address, "good").join())
        cases["wrong_token"] = _code(lambda: RawClient(address, "good", "not-the-token-at-all").join())
        cases["token_of_other_worker"] = _code(lambda: RawClient(address, "evil", TOKENS["good"]).join())
        good.join()
        revoked.join()
        mismatch = RawClient(address, "good", TOKENS["good"])
        cases["request_names_other_worker"] = _code(
            lambda: mismatch.stub.PollTask(pb.PollRequest(worker_id="revoked", session=good.session), timeout=5, metadata=mismatch.md)
        )
        runner.start()
        tasks = []
        deadline = time.time() + 60
        while len(tasks) < 2 and time.time() < deadline:
            reply = good.poll()
            if reply.WhichOneof("kind") == "task":
                tasks.append(reply.task)
        assert len(tasks) == 2, "the round's two tasks never arrived"
        t0, t1 = tasks
        # this coordinator speaks CRC-32C: every task says so with the payload's CRC-32C
        assert t0.HasField("blob_crc32c") and t0.blob_crc32c == crc32c.crc32c(good.fetch(t0.blob_id))
        zero = _payload(schema)
        name0 = next(iter(schema))

        def push(payload: bytes, task=t0, client=good, **fields):
            return _code(lambda: client.push(task.task_id, task.client_id, payload, **fields))

        # --- revoked while connected: refused before any byte is read --------------------
        tokens_file.write_text(json.dumps({k: v for k, v in TOKENS.items() if k != "revoked"}))
        time.sleep(0.05)
        cases["revoked_push"] = push(zero, client=revoked)
        cases["revoked_poll"] = _code(revoked.poll)
        # --- payload validation ------------------------------------------------------------
        cases["unknown_tensor"] = push(_payload(schema, lambda t: OrderedDict(list(t.items()) + [("extra.weight", torch.zeros(2))])))
        cases["missing_tensor"] = push(_payload(schema, lambda t: OrderedDict(list(t.items())[1:])))
        cases["wrong_shape"] = push(_payload(schema, lambda t: OrderedDict((k, torch.zeros(3, 3) if k == name0 else v) for k, v in t.items())))
        cases["wrong_dtype"] = push(_payload(schema, lambda t: OrderedDict((k, v.double() if k == name0 else v) for k, v in t.items())))

        def poison(value):
            def f(t):
                t[name0] = t[name0].clone()
                t[name0].view(-1)[0] = value
                return t
            return f

        cases["nan"] = push(_payload(schema, poison(float("nan"))))
        cases["inf"] = push(_payload(schema, poison(float("inf"))))
        cases["norm_above_bound"] = push(_payload(schema, poison(12.5)))  # L2 norm 12.5 > transport.max_update_norm=10
        cases["not_a_payload"] = push(b"\x10\x00\x00\x00\x00\x00\x00\x00this is not json" + bytes(64))
        cases["checksum"] = push(zero, sha256=hashlib.sha256(b"something else").digest())
        cases["crc_checksum"] = push(zero, sha256=b"", crc32=zlib.crc32(zero) ^ 1)  # whole-payload CRC-32 instead of sha256
        cases["crc32c_checksum"] = push(zero, sha256=b"", crc32c=crc32c.crc32c(zero) ^ 1, algo=CRC32C)
        cases["crc32c_header_crc32_chunks"] = push(zero, sha256=b"", crc32c=crc32c.crc32c(zero))  # chunks carry CRC-32 only
        cases["crc32_header_crc32c_chunks"] = push(zero, sha256=b"", crc32=zlib.crc32(zero), algo=CRC32C)
        cases["both_crcs"] = push(zero, sha256=b"", crc32=zlib.crc32(zero), crc32c=crc32c.crc32c(zero), algo=CRC32C)
        cases["no_digest"] = push(zero, sha256=b"")
        cases["too_large"] = push(zero, size=(1 << 20) + 1)
        cases["zero_examples"] = push(zero, num_examples=0)
        cases["unknown_task"] = push(zero, task=pb.TrainTask(task_id="r1-c99-deadbeef", client_id=99))
        cases["wrong_client"] = _code(lambda: good.push(t0.task_id, t1.client_id, zero))
        cases["no_header"] = _code(lambda: good.stub.PushUpdate(iter([pb.UpdateChunk(data=b"x")]), timeout=5, metadata=good.md))
        raw = good.channel.stream_unary("/dpeft.v1.Coordinator/PushUpdate", request_serializer=None, response_deserializer=None)
        cases["not_a_protobuf"] = _code(lambda: raw(iter([b"\xff\xff\xff\xff garbage"]), timeout=5, metadata=good.md))
        # --- the round's real updates, then a duplicate ------------------------------------------
        cases["good_0"] = push(zero)
        cases["duplicate"] = push(zero)
        cases["good_1"] = push(zero, task=t1, sha256=b"", crc32c=crc32c.crc32c(zero), algo=CRC32C)  # current workers: CRC-32C
        runner.join(60)
        assert rows and rows[0] is not None, "the round did not close"
        cases["replayed_after_round"] = push(zero)
        out["row"] = rows[0]
        out["after"] = {k: v.clone() for k, v in engine.global_state.items()}
        out["before"] = before
        out["metrics"] = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    finally:
        engine.stop_event.set()
        good.close()
        revoked.close()
        transport.shutdown("test over", grace_s=0.2)
    return out


EXPECTED = {
    "no_token": (grpc.StatusCode.UNAUTHENTICATED, "missing bearer token"),
    "wrong_token": (grpc.StatusCode.UNAUTHENTICATED, "invalid or revoked token for worker 'good'"),
    "token_of_other_worker": (grpc.StatusCode.UNAUTHENTICATED, "invalid or revoked token for worker 'evil'"),
    "request_names_other_worker": (grpc.StatusCode.PERMISSION_DENIED, "bound to worker 'good', not 'revoked'"),
    "revoked_push": (grpc.StatusCode.UNAUTHENTICATED, "invalid or revoked token for worker 'revoked'"),
    "revoked_poll": (grpc.StatusCode.UNAUTHENTICATED, "invalid or revoked token"),
    "unknown_tensor": (grpc.StatusCode.INVALID_ARGUMENT, "unknown tensor names: extra.weight"),
    "missing_tensor": (grpc.StatusCode.INVALID_ARGUMENT, "missing tensor names"),
    "wrong_shape": (grpc.StatusCode.INVALID_ARGUMENT, "shape [3, 3] but expected"),
    "wrong_dtype": (grpc.StatusCode.INVALID_ARGUMENT, "dtype F64 but expected F32"),
    "nan": (grpc.StatusCode.INVALID_ARGUMENT, "(non_finite)"),
    "inf": (grpc.StatusCode.INVALID_ARGUMENT, "(non_finite)"),
    "norm_above_bound": (grpc.StatusCode.INVALID_ARGUMENT, "(norm): update L2 norm 12.5 exceeds the bound 10 (transport.max_update_norm)"),
    "not_a_payload": (grpc.StatusCode.INVALID_ARGUMENT, "(malformed)"),
    "checksum": (grpc.StatusCode.INVALID_ARGUMENT, "(checksum)"),
    "crc_checksum": (grpc.StatusCode.INVALID_ARGUMENT, "(checksum): CRC-32 of the received bytes does not match the header"),
    "crc32c_checksum": (grpc.StatusCode.INVALID_ARGUMENT, "(checksum): CRC-32C of the received bytes does not match the header"),
    "crc32c_header_crc32_chunks": (grpc.StatusCode.INVALID_ARGUMENT, "(malformed): chunk at offset 0 has no crc32c"),
    "crc32_header_crc32c_chunks": (grpc.StatusCode.INVALID_ARGUMENT, "(malformed): chunk at offset 0 carries a crc32c"),
    "both_crcs": (grpc.StatusCode.INVALID_ARGUMENT, "set one of crc32 and crc32c, not both"),
    "no_digest": (grpc.StatusCode.INVALID_ARGUMENT, "sha256 must be 32 bytes (or empty, with the payload's crc32c or crc32)"),
    "too_large": (grpc.StatusCode.INVALID_ARGUMENT, "(too_large)"),
    "zero_examples": (grpc.StatusCode.INVALID_ARGUMENT, "(num_examples)"),
    "unknown_task": (grpc.StatusCode.FAILED_PRECONDITION, "(unknown_task)"),
    "wrong_client": (grpc.StatusCode.FAILED_PRECONDITION, "(wrong_client)"),
    "no_header": (grpc.StatusCode.INVALID_ARGUMENT, "must start with its header"),
    "good_0": (grpc.StatusCode.OK, ""),
    "duplicate": (grpc.StatusCode.ALREADY_EXISTS, "(duplicate)"),
    "good_1": (grpc.StatusCode.OK, ""),
    "replayed_after_round": (grpc.StatusCode.ALREADY_EXISTS, "(duplicate)"),
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_refused_with_precise_status(scenario: dict, case: str) -> None:
    code, details = scenario["cases"][case]
    want_code, want_text = EXPECTED[case]
    assert code == want_code, f"{case}: {code} {details!r}"
    assert want_text in details, f"{case}: {details!r}"


def test_garbage_protobuf_is_refused_and_the_server_survives(scenario: dict) -> None:
    code, _ = scenario["cases"]["not_a_protobuf"]
    assert code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNKNOWN)
    assert scenario["cases"]["good_1"][0] == grpc.StatusCode.OK  # still served afterwards


def test_rejections_counted_and_global_untouched(scenario: dict) -> None:
    row = scenario["row"]
    reasons = row["rejected_reasons"]
    for reason, n in {"non_finite": 2, "norm": 1, "malformed": 3, "checksum": 2, "too_large": 1, "num_examples": 1, "unknown_task": 1,
                      "wrong_client": 1, "duplicate": 1, "unauthenticated": 1}.items():
        assert reasons.get(reason, 0) >= n, (reason, reasons)
    assert row["rejected"] == sum(reasons.values()) and row["rejected"] >= 17
    assert row["clients"] == 2
    assert [r["round"] for r in scenario["metrics"]] == [1]
    before, after = scenario["before"], scenario["after"]
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
