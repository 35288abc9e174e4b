"""What crosses the split wire: every message kind is exercised and inspected.

One edge session over loopback gRPC with tiny chunks (so payload continuation chunks occur),
Kill-and-Revive (frozen factors uploaded and revived), one federated round, a split
evaluation and goodbye. Every protobuf message in both directions is recorded; payloads are
reassembled and decoded. No message may carry raw text, token ids or labels.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from split_testlib import loopback

from dpeft.adapters import build_model, extract_state
from dpeft.codec.tensors import decode_state
from dpeft.config import DataConfig, ModelConfig, RunConfig, StrategyConfig, TrainConfig
from dpeft.data import load_dataset, tokenize
from dpeft.split.config import KillReviveConfig, SplitConfig
from dpeft.split.service import EdgeData, Federation, run_edge_session
from dpeft.split.spec import slice_layers
from dpeft.split.wire import CLOUD_KINDS, EDGE_KINDS


@pytest.fixture(scope="module")
def recorded():
    run = RunConfig(rounds=1, model=ModelConfig(max_length=24), train=TrainConfig(local_steps=3, batch_size=4, eval_batch_size=4), strategy=StrategyConfig(name="fedavg"))
    split = SplitConfig(edges=1, layers=2, chunk_bytes=20_000, eval_examples=4, kr=KillReviveConfig(enabled=True, budget=0.5, window=1, warmup=1, revive_every=2))
    bundle = build_model(run.model, run.adapter, 2, 0)
    slice_layers(bundle.model, 2)
    train, test = load_dataset(DataConfig(max_train_examples=12, test_examples=4), 0)
    data = EdgeData(tokenize(bundle.tokenizer, train.texts, train.labels, 24), list(range(len(train))), tokenize(bundle.tokenizer, test.texts, test.labels, 24), 2)
    fed = Federation(run, split, extract_state(bundle.model))
    log: list[tuple[str, object]] = []
    lock = threading.Lock()

    def tap(direction, msg):
        with lock:
            log.append((direction, copy.deepcopy(msg)))

    with loopback(bundle.model, run, split, tap=tap, federation=fed) as (edge, channel, welcome, _):
        report = run_edge_session(channel, welcome, edge, data, run, split)
    return log, train, test, data, report


def _logical(log):
    """(direction, kind, fields message, payload bytes, serialized bytes of all its pieces).

    Each message is recorded by its sender ("edge->", "cloud->") and its receiver; the sender's
    records are complete and in order per direction.
    """
    out = []
    last: dict[str, int] = {}
    for direction, msg in log:
        if not direction.endswith("->"):
            continue
        kind = msg.WhichOneof("kind")
        if kind == "chunk":
            i = last[direction]
            d, k, sub, payload, raw = out[i]
            out[i] = (d, k, sub, payload + msg.chunk.data, raw + msg.SerializeToString())
            continue
        sub = getattr(msg, kind)
        payload = sub.payload if "payload" in sub.DESCRIPTOR.fields_by_name else b""
        last[direction] = len(out)
        out.append((direction, kind, sub, payload, msg.SerializeToString()))
    return out


def test_every_message_kind_crossed(recorded):
    log, *_, report = recorded
    received = {(d, m.WhichOneof("kind")) for d, m in log if d.startswith("->")}
    sent = {(d, m.WhichOneof("kind")) for d, m in log if d.endswith("->")}
    assert {k for _, k in received} == {k for _, k in sent}
    kinds = {(d, m.WhichOneof("kind")) for d, m in log}
    # edge->cloud, as sent by the edge
    assert {k for d, k in kinds if d == "edge->"} == set(EDGE_KINDS) | {"chunk"}
    assert {k for d, k in kinds if d == "cloud->"} == (set(CLOUD_KINDS) - {"error"}) | {"chunk"}
    assert report.killed_history, "Kill-and-Revive did not kill anything"


def test_no_text_token_ids_or_labels_cross(recorded):
    log, train, test, data, _ = recorded
    texts = [t.encode() for t in train.texts + test.texts]
    id_rows = []
    for row, mask in zip(data.train.input_ids, data.train.attention_mask, strict=True):
        ids = row[mask.bool()][:6]  # a distinctive run of token ids, as int64 and int32 bytes
        id_rows += [ids.to(torch.int64).numpy().tobytes(), ids.to(torch.int32).numpy().tobytes()]
    allowed = {
        "step_start": lambda n: n in {"inputs_embeds", "attention_mask", "pool_index"},
        "lora_input": lambda n: n == "x",
        "lora_output": lambda n: n.startswith("y."),
        "features": lambda n: n == "h",
        "feature_grad": lambda n: n == "g",
        "lora_output_grad": lambda n: n.startswith("g."),
        "lora_input_grad": lambda n: n == "gx",
        "frozen_factors": lambda n: n in {"A", "B"},
    }
    adapter_keys = set(extract_state(build_model(ModelConfig(max_length=24), RunConfig().adapter, 2, 0).model).tensors)
    for _direction, kind, sub, payload, raw in _logical(log):
        for t in texts:
            assert t not in raw, f"{kind} carries raw text"
        for ids in id_rows:
            assert ids not in raw, f"{kind} carries token ids"
        for f in sub.DESCRIPTOR.fields:
            if f.type == f.TYPE_STRING and not f.is_repeated:
                value = getattr(sub, f.name)
                assert not any(t.decode() in value for t in texts if len(t) > 8)
        if not payload:
            continue
        state = decode_state(payload)
        for name, tensor in state.items():
            if kind in allowed:
                assert allowed[kind](name), f"{kind} carries {name}"
            else:  # adapter states: welcome, round_update, round_global
                assert kind in {"welcome", "round_update", "round_global"} and name in adapter_keys, f"{kind} carries {name}"
            if not tensor.dtype.is_floating_point:
                # the only integer tensors are the attention mask and the pooling positions
                assert kind == "step_start" and name in {"attention_mask", "pool_index"}, f"{kind}/{name} is {tensor.dtype}"
                if name == "attention_mask":
                    assert set(tensor.unique().tolist()) <= {0, 1}
