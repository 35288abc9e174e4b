"""Federated rounds of each native method learn: the real worker runtime trains two MiniLM
clients on a tiny rotten-tomatoes slice, the round core aggregates (FedAvg, LoReFT's R projected)
and the coordinator's global model evaluates."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpeft.codec import decode_state, encode_state
from dpeft.rounds.global_model import GlobalModel
from dpeft.rounds.tally import finish_step
from dpeft.state import AdapterState
from dpeft.strategies import ClientUpdate, make_strategy
from dpeft.transport.base import TrainTask
from dpeft.validate import load_config
from dpeft_workers.runtime import WorkerRuntime

pytestmark = pytest.mark.usefixtures("single_thread")

BASE = [
    "clients=2",
    "clients_per_round=2",
    "data.partition=iid",
    "data.max_train_examples=64",
    "data.test_examples=32",
    "model.max_length=24",
    "train.local_steps=5",
    "train.batch_size=8",
    "train.lr=0.01",
]


@pytest.mark.parametrize("method", ["loreft", "direft", "houlsby", "pfeiffer"])
def test_federated_rounds_learn(tmp_path: Path, method: str) -> None:
    cfg = load_config(None, [*BASE, f"adapter.method={method}", "adapter.r=4", f"run_dir={tmp_path}"])
    gm = GlobalModel(cfg)
    runtime = WorkerRuntime(cfg, bundle=gm.bundle)  # shares the base, as forked simulate workers do
    strategy = make_strategy(cfg.strategy)
    glob = gm.initial_state()
    first = gm.evaluate(glob)
    losses = []
    for r in (1, 2):
        agg = strategy.begin_round(glob)
        payload = encode_state(AdapterState(glob.tensors, {**glob.meta, "round": r}))
        for c in (0, 1):
            update, n, metrics = runtime.train_task(TrainTask(f"r{r}-c{c}", r, c, f"r{r}", len(payload), b"", {}), payload)
            agg.add(ClientUpdate(c, decode_state(update), n, metrics))
            losses.append(metrics["train_loss"])
        glob = finish_step(strategy, glob, agg, r)
    last = gm.evaluate(glob)
    assert glob.meta["round"] == 2
    # the clients' loss falls from round 1 to round 2 (each starts from the aggregated global),
    # and the global classifies the held-out slice better than the untrained one
    assert sum(losses[2:]) < sum(losses[:2]) - 0.05, losses
    assert last["eval_accuracy"] > first["eval_accuracy"], (first, last)
    if method == "loreft":
        import torch

        for key, value in glob.items():
            if key.endswith(".R"):
                err = (value.double() @ value.double().T - torch.eye(value.shape[0], dtype=torch.float64)).abs().max()
                assert float(err) < 1e-5
