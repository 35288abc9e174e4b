"""Helper for test_worker_memory.py (run as a subprocess): RSS of one worker process vs. clients.

Prints one JSON line: {"rss_after_warmup": .., "rss_after_5": .., "rss_after_50": .., "clients": ..}.
"""

from __future__ import annotations

import gc
import hashlib
import json
import sys

import psutil
import torch

from dpeft.adapters import extract_state
from dpeft.codec import encode_state
from dpeft.config import load_config
from dpeft.transport.base import TrainTask
from dpeft.workers.runtime import WorkerRuntime, set_threads


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def main() -> int:
    clients = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    set_threads(1)
    cfg = load_config(
        None,
        [
            f"clients={clients}",
            "clients_per_round=1",
            "data.partition=iid",
            "data.max_train_examples=800",
            "data.test_examples=32",
            "train.local_steps=1",
            "train.batch_size=4",
            "model.max_length=32",
            "run_dir=/nonexistent-not-written",
        ],
    )
    runtime = WorkerRuntime(cfg)
    # the seeded initial adapter, as the coordinator would encode it
    payload = encode_state(extract_state(runtime.model, {"round": 0}))
    sha = hashlib.sha256(payload).digest()

    def run(client: int, round_num: int = 1) -> None:
        task = TrainTask(f"r{round_num}-c{client}", round_num, client, "blob", len(payload), sha, {})
        update, n, metrics = runtime.train_task(task, payload)
        assert n == len(runtime.client_indices(client)) and update and metrics["train_loss"] > 0

    # warm-up: first tasks allocate optimizer/autograd buffers and allocator pools
    run(0, round_num=99)
    run(1, round_num=99)
    warm = rss()
    for c in range(5):
        run(c)
    after_5 = rss()
    for c in range(5, clients):
        run(c)
    after_all = rss()
    print(
        json.dumps(
            {
                "rss_after_warmup": warm,
                "rss_after_5": after_5,
                "rss_after_50": after_all,
                "clients": clients,
                "torch_threads": torch.get_num_threads(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
