"""Helpers shared by the cluster-transport tests (tiny run settings)."""

from __future__ import annotations

import socket
from pathlib import Path

#: the tiny run used by every equivalence test (a few seconds of training on two cores)
TINY = [
    "seed=0",
    "rounds=1",
    "clients=2",
    "clients_per_round=2",
    "train.local_steps=3",
    "data.max_train_examples=200",
    "data.test_examples=32",
    "data.partition=iid",
    "simulate.processes=2",
]


def tiny(run_dir: Path, *more: str) -> list[str]:
    return [*TINY, f"run_dir={run_dir}", *more]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_updates(n: int, seed: int = 0):
    """``n`` synthetic client updates over a small adapter schema (float32, mixed sizes)."""
    from collections import OrderedDict

    import torch

    from dpeft.state import AdapterState
    from dpeft.strategies import ClientUpdate

    g = torch.Generator().manual_seed(seed)
    shapes = {"a.lora_A": (8, 16), "a.lora_B": (16, 8), "bias": (5,), "big": (64, 64)}
    template = AdapterState(OrderedDict((k, torch.zeros(s)) for k, s in shapes.items()))
    updates = [
        ClientUpdate(i, AdapterState(OrderedDict((k, torch.randn(s, generator=g) * (i + 1)) for k, s in shapes.items())), 10 + 7 * i)
        for i in range(n)
    ]
    return template, updates


def gloo_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank of the all-reduce test (spawned): scenarios whose results rank 0 saves for the parent."""
    import os

    import torch
    import torch.distributed as dist

    from dpeft.codec import encode_state
    from dpeft.config import StrategyConfig
    from dpeft.rounds import allreduce as rar
    from dpeft.state import AdapterState
    from dpeft.strategies import make_strategy
    from dpeft.transport import distributed_allreduce as ar

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    assert ar.init_group("gloo") == "gloo"
    template, updates = make_updates(6)
    results = {}
    results["even"] = rar.allreduce_fedavg(updates[rank::world], template)
    ar.BUCKET_BYTES = 256  # many buckets, and the big tensor in slices
    results["buckets"] = rar.allreduce_fedavg(updates[rank::world], template)
    ar.BUCKET_BYTES = 64 << 20
    results["uneven"] = rar.allreduce_fedavg(updates[:5] if rank == 0 else [], template)
    for name, options in (("fedadam", {}), ("fedavg", {"clip_norm": 20.0})):
        strategy = make_strategy(StrategyConfig(name=name, options=options, server_lr=0.5))
        glob = template.clone()
        for _step in range(2):  # two rounds: server-optimizer state must stay in step on every rank
            agg = strategy.begin_round(glob)
            for u in updates[rank::world]:
                agg.add(u)
            rar.allreduce_aggregator(agg)
            glob = strategy.finish_round(glob, agg)
        results[f"strategy_{name}"] = glob
    if rank == 0:
        for name, state in results.items():
            with open(os.path.join(out_dir, f"{name}.bin"), "wb") as fh:
                fh.write(encode_state(AdapterState(state.tensors)))
    dist.barrier()
    dist.destroy_process_group()


class FakeTrainActor:
    """Stands in for :class:`dpeft_workers.ray_actor.TrainActor` without a model: each task
    sleeps ``train_s`` and returns a few bytes, reporting ``compute_s`` (pickled by value to Ray,
    see :func:`register_by_value`)."""

    train_s = 0.05
    compute_s = 0.3

    def __init__(self, config_tree, worker_id, threads=1):
        self.worker_id = worker_id

    def ready(self):
        import os

        return {"worker_id": self.worker_id, "pid": os.getpid(), "node_ip": "127.0.0.1", "tasks_done": 0}

    def train(self, task, payload):
        import time

        import numpy as np

        time.sleep(self.train_s)
        return np.frombuffer(bytes(payload[:4]), dtype=np.uint8), 10, {"train_loss": 1.0, "compute_s": self.compute_s}

    def train_many(self, tasks, *payloads):
        """train.lockstep: several tasks in one call; each result reports the call's size as ``batch``."""
        import time

        import numpy as np

        time.sleep(self.train_s)
        metrics = {"train_loss": 1.0, "compute_s": self.compute_s, "batch": float(len(tasks))}
        return [(np.frombuffer(bytes(p[:4]), dtype=np.uint8), 10, dict(metrics)) for p in payloads]


def register_by_value() -> None:
    """Ray workers cannot import this test module: ship its classes by value."""
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FakeDecoder:
    """What ``decoder_factory`` returns in transport-only tests: accepts any bytes."""

    def __init__(self) -> None:
        self.size = 0

    def feed(self, buf) -> None:
        self.size += len(buf)

    def finish(self):
        from collections import OrderedDict

        import torch

        from dpeft.state import AdapterState

        return AdapterState(OrderedDict(w=torch.full((2,), float(self.size))))


def task(task_id: str, client_id: int, blob_id: str, round_num: int = 1, **hp):
    from dpeft.transport.base import TrainTask

    return TrainTask(task_id=task_id, round=round_num, client_id=client_id, blob_id=blob_id, blob_size=8, blob_sha256=b"", hyperparams=hp)
