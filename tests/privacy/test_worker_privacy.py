"""The worker's side of DP, as `dpeft simulate` runs it: with ``privacy.clipping=client`` the update
leaves clipped to the task's bound with its clip bit; with ``privacy.mode=local`` the client trains
by DP-SGD and reports its sampling rate, steps and epsilon."""

from __future__ import annotations

import pytest
import torch

from dpeft.adapters import extract_state
from dpeft.codec import decode_state, encode_state
from dpeft.strategies.clipping import global_norm
from dpeft.transport.base import TrainTask
from dpeft.validate import load_config
from dpeft_workers.runtime import WorkerRuntime

BASE = ["clients=4", "data.max_train_examples=64", "model.max_length=32", "data.partition=iid", "train.local_steps=2"]
BASE += ["train.batch_size=8", "data.test_examples=8", "train.loss=cross_entropy"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_client_clipping_and_local_dp_sgd_on_the_worker(tmp_path) -> None:
    cfg = load_config(None, [*BASE, f"run_dir={tmp_path}", "privacy.mode=local", "privacy.noise_multiplier=0.5"])
    rt = WorkerRuntime(cfg)
    payload = encode_state(extract_state(rt.model))
    # central DP, client clipping: a tiny bound, so the update must come back at exactly that norm
    encoded, _, metrics = rt.train_task(TrainTask("r1-c0", 1, 0, "b", 0, b"", {"dp_clip": 1e-4}), payload)
    assert global_norm(decode_state(encoded)) == pytest.approx(1e-4, rel=1e-4)
    assert metrics["dp_unclipped"] == 0.0
    # local DP-SGD (this runtime's privacy.mode): its accounting inputs travel with the update
    assert metrics["dp_sample_rate"] == pytest.approx(8 / 16) and metrics["dp_steps"] == 2.0
    assert 0 < metrics["dp_task_epsilon"] < float("inf") and metrics["dp_examples"] > 0
