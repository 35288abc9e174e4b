"""Determinism: a 1-client federation over real loopback gRPC equals plain centralized training,
and a seeded run repeats exactly.

Everything runs inside the test process: the coordinator's RoundEngine + GrpcCoordinatorTransport
on 127.0.0.1:0 and one worker (run_worker over GrpcWorkerConnection) in a thread.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from dpeft.adapters import adapter_parameters, build_model, extract_state
from dpeft.config import RunConfig, dump_config
from dpeft.data import load_dataset, partition, tokenize
from dpeft.rounds.checkpoint import latest_checkpoint
from dpeft.rounds.global_model import GlobalModel
from dpeft.state import AdapterState, max_abs_diff
from dpeft.train.loop import batch_schedule, make_optimizer, task_seed
from dpeft.transport.grpc import GrpcCoordinatorTransport, GrpcWorkerConnection
from dpeft.validate import load_config
from dpeft_coordinator.engine import RoundEngine
from dpeft_workers.loop import run_worker

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_thread")]


def _cfg(run_dir: Path, *extra: str) -> RunConfig:
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            "seed=3",
            "data.partition=iid",
            "data.max_train_examples=64",
            "data.test_examples=32",
            "model.max_length=32",
            "train.loss=cross_entropy",
            "train.batch_size=8",
            "train.eval_batch_size=32",
            "sync.round_timeout_s=120",
            "transport.poll_timeout_s=0.5",
            *extra,
        ],
    )


def _federate(cfg: RunConfig) -> list[dict]:
    """One coordinator + one gRPC worker thread; returns the metrics rows."""
    run_dir = Path(cfg.run_dir)
    gm = GlobalModel(cfg)
    engine = RoundEngine(cfg, gm, run_dir, resume=False)
    transport = GrpcCoordinatorTransport(
        "127.0.0.1:0",
        cfg.transport,
        run_id="determinism",
        config_yaml=dump_config(cfg),
        num_clients=cfg.clients,
        decoder_factory=engine.decoder_for,
    )
    address = transport.start()
    outcome: dict[str, object] = {}

    def worker() -> None:
        try:
            outcome["rc"] = run_worker(GrpcWorkerConnection(address, patience_s=30), "w0", threads=torch.get_num_threads())
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=worker, name="dpeft-test-worker", daemon=True)
    thread.start()
    try:
        rows = engine.run(transport)
    finally:
        engine.stop_event.set()
        transport.shutdown("test complete", grace_s=10.0)
        thread.join(timeout=30)
    assert not thread.is_alive(), "worker thread did not stop after shutdown"
    assert "error" not in outcome, f"worker failed: {outcome.get('error')!r}"
    assert outcome.get("rc") == 0
    return rows


def _centralized(cfg: RunConfig) -> tuple[AdapterState, AdapterState]:
    """Plain PyTorch: the same init, the same batches, optimizer, loss and clipping. (initial, trained)."""
    bundle = build_model(cfg.model, cfg.adapter, 2, cfg.seed)
    model = bundle.model
    initial = extract_state(model)
    train, _ = load_dataset(cfg.data, cfg.seed)
    data = tokenize(bundle.tokenizer, train.texts, train.labels, cfg.model.max_length)
    (indices,) = partition(
        train.labels, 1, cfg.data.partition, cfg.seed, cfg.data.dirichlet_alpha, cfg.data.min_examples_per_client
    )
    assert sorted(indices) == list(range(len(train)))
    params = list(adapter_parameters(model).values())
    opt = make_optimizer(params, cfg.train)
    seed = task_seed(cfg.seed, 1, 0)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout masks of the task
        for batch_idx in batch_schedule(indices, cfg.train.local_steps, cfg.train.batch_size, seed):
            batch = data.batch(batch_idx)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = nn.functional.cross_entropy(logits, batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            opt.step()
    model.eval()
    return initial, extract_state(model)


def test_one_client_federation_equals_centralized(tmp_path) -> None:
    cfg = _cfg(tmp_path / "fed", "clients=1", "clients_per_round=1", "rounds=1", "train.local_steps=3")
    rows = _federate(cfg)

    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients"] == 1 and rows[1]["num_examples"] == 64 and rows[1]["rejected"] == 0
    assert rows[1]["bytes_up"] > 0 and rows[1]["bytes_down"] > 0
    assert 0.0 <= rows[1]["eval_accuracy"] <= 1.0
    lines = (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1]
    assert (Path(cfg.run_dir) / "adapter" / "adapter_model.safetensors").is_file()

    found = latest_checkpoint(Path(cfg.run_dir) / "checkpoints")
    assert found is not None
    round_num, fed_state, _strategy_state, _info = found
    assert round_num == 1

    initial, central = _centralized(cfg)
    assert list(fed_state.tensors) == list(central.tensors)
    moved = max_abs_diff(central, initial)
    assert moved > 1e-4, "training did not change the adapter; the comparison would be vacuous"
    diff = max_abs_diff(fed_state, central)
    assert diff <= 1e-6, f"federated adapter differs from centralized by {diff:.3g} (training moved it by {moved:.3g})"


def test_seeded_runs_repeat(tmp_path) -> None:
    extra = ("clients=2", "clients_per_round=2", "rounds=2", "train.local_steps=2", "train.loss=prior_calibrated")
    rows_a = _federate(_cfg(tmp_path / "a", *extra))
    rows_b = _federate(_cfg(tmp_path / "b", *extra))

    def from_file(name: str, key: str) -> list:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line).get(key) for line in lines]

    acc_a, acc_b = from_file("a", "eval_accuracy"), from_file("b", "eval_accuracy")
    assert len(acc_a) == 3 and None not in acc_a
    assert acc_a == acc_b
    assert [r["eval_accuracy"] for r in rows_a] == acc_a == [r["eval_accuracy"] for r in rows_b]
    assert from_file("a", "eval_loss") == pytest.approx(from_file("b", "eval_loss"), rel=1e-9, abs=0)
    assert from_file("a", "train_loss")[1:] == pytest.approx(from_file("b", "train_loss")[1:], rel=1e-9, abs=0)
    assert [r["sampled"] for r in rows_a[1:]] == [[0, 1], [0, 1]]

    a = latest_checkpoint(tmp_path / "a" / "checkpoints")
    b = latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert a is not None and b is not None and a[0] == b[0] == 2
    assert max_abs_diff(a[1], b[1]) == 0.0


def test_task_result_does_not_depend_on_worker_history(tmp_path) -> None:
    """A task gives the same update whichever worker runs it, whatever that worker ran before.

    MiniLM has dropout in the frozen base; its masks must come from the task's seed, not from
    the process-global RNG state left behind by earlier tasks.
    """
    import hashlib

    from dpeft.codec import decode_state, encode_state
    from dpeft.transport.base import TrainTask
    from dpeft_workers.runtime import WorkerRuntime

    cfg = _cfg(tmp_path, "clients=4", "clients_per_round=1", "train.local_steps=2")
    runtime = WorkerRuntime(cfg)
    payload = encode_state(extract_state(runtime.model, {"round": 0}))
    sha = hashlib.sha256(payload).digest()

    def run(client: int, round_num: int) -> AdapterState:
        task = TrainTask(f"r{round_num}-c{client}", round_num, client, "blob", len(payload), sha, {})
        return decode_state(runtime.train_task(task, payload)[0])

    first = run(0, 1)
    run(1, 1)  # something else in between
    torch.rand(1000)  # and the global RNG moved on
    again = run(0, 1)
    assert max_abs_diff(first, again) == 0.0
    other_round = run(0, 2)  # a different task seed must give a different update
    assert max_abs_diff(first, other_round) > 1e-6
