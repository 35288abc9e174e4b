"""Generated protobuf code is current, and the coordinator serves the standard health service."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dpeft.config import TransportConfig
from dpeft.transport.grpc import SERVICE_NAME, GrpcCoordinatorTransport

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"gen_proto --check failed:\n{proc.stdout}\n{proc.stderr}"


def test_check_detects_stale_code(tmp_path) -> None:
    """The same check on a copy whose .proto gained a field must fail and name the stale file."""
    import shutil

    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "gen_proto.py", tmp_path / "scripts" / "gen_proto.py")
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    shutil.copytree(ROOT / "dpeft" / "_proto", tmp_path / "dpeft" / "_proto", ignore=shutil.ignore_patterns("__pycache__"))
    script = [sys.executable, str(tmp_path / "scripts" / "gen_proto.py"), "--check"]
    assert subprocess.run(script, cwd=tmp_path, capture_output=True, timeout=120).returncode == 0
    # a different grpcio-tools or protoc stamps its own version on the same code: not stale
    grpc_py = next((tmp_path / "dpeft" / "_proto").rglob("coordinator_pb2_grpc.py"))
    grpc_py.write_text(re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = '1.66.0'", grpc_py.read_text()))
    pb2 = next((tmp_path / "dpeft" / "_proto").rglob("coordinator_pb2.py"))
    pb2.write_text(re.sub(r"Domain\.PUBLIC,\s*\d+,\s*\d+,", "Domain.PUBLIC,\n    7,\n    0,", pb2.read_text()))
    assert "'1.66.0'" in grpc_py.read_text() and "    0,\n" in pb2.read_text()
    assert subprocess.run(script, cwd=tmp_path, capture_output=True, timeout=120).returncode == 0
    proto = next((tmp_path / "proto").rglob("coordinator.proto"))
    proto.write_text(proto.read_text() + "\nmessage StaleCheckProbe { int32 x = 1; }\n")
    proc = subprocess.run(script, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "coordinator_pb2" in proc.stderr


def _no_decoder(task_id: str, client_id: int):  # pragma: no cover - never called here
    raise AssertionError("no uploads expected")


def test_health_service_serving_then_stops() -> None:
    transport = GrpcCoordinatorTransport(
        "127.0.0.1:0", TransportConfig(poll_timeout_s=0.1), run_id="t", config_yaml="{}", num_clients=1, decoder_factory=_no_decoder
    )
    address = transport.start()
    assert address.startswith("127.0.0.1:") and transport.port and address.endswith(str(transport.port))
    channel = grpc.insecure_channel(address)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10, wait_for_ready=True)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert SERVICE_NAME == "dpeft.v1.Coordinator"
        overall = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert overall.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        transport.shutdown("test over", grace_s=0.5)
    # after shutdown nothing answers any more
    with pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1)
    channel.close()
