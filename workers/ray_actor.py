"""Ray actors hosting the ordinary worker runtime.

:class:`TrainActor` is one ``dpeft simulate`` worker process in actor form: it loads the
frozen base and the data once (``WorkerRuntime``) and trains any number of virtual clients'
tasks. The payload arrives as a read-only ``uint8`` array straight from the Ray object store
(zero-copy on the same node) and the encoded update goes back the same way; tensors are never
pickled. An actor trains on ``train.device``: with ``ray.num_gpus`` Ray makes only the GPU it
assigned visible (``CUDA_VISIBLE_DEVICES``), so ``auto``/``cuda`` is that GPU, device 0; without
GPUs Ray hides them all and ``auto`` is the CPU. The classes here are plain Python: the transport wraps them with ``ray.remote`` and
its resource options, so importing this module does not need a Ray cluster.

:class:`AllReduceActor` joins a ``torch.distributed`` process group (rank 0's address,
``MASTER_ADDR``/``MASTER_PORT``, ``RANK``/``WORLD_SIZE``, as Ray Train's torch backend does)
and runs the all-reduce rounds of :mod:`dpeft.rounds.allreduce`.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import numpy as np

from dpeft.rounds.fedeval import EVALUATE, WORKER_TASK_KINDS
from dpeft.transport.base import TrainTask
from dpeft.validate import config_from_dict


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray: best effort
        return socket.gethostbyname(socket.gethostname())


class TrainActor:
    """A worker: ``WorkerRuntime`` over one shared frozen base, any number of virtual clients."""

    def __init__(self, config_tree: dict[str, Any], worker_id: str, threads: int = 1, cores: tuple[str, int] | None = None) -> None:
        """``cores``: (budget file, slot) of a core budget shared with the other actors on this
        machine (:mod:`dpeft.train.cores`; ignored where the file is not on this node)."""
        from dpeft.train.cores import CoreBudget
        from dpeft_workers.runtime import WorkerRuntime, set_threads
        from dpeft_workers.simulate import Heterogeneity

        set_threads(threads)
        self.cores = CoreBudget(*cores) if cores is not None and os.path.exists(cores[0]) else None
        if self.cores is not None:  # a restarted actor: what its earlier incarnation held is free again
            self.cores.reset(self.cores.slot)
        self.worker_id = worker_id
        self.cfg = config_from_dict(config_tree)
        # local_index 0: the first (with ray.num_gpus, the only) GPU Ray made visible to this actor
        self.runtime = Heterogeneity(self.cfg).install(WorkerRuntime(self.cfg, local_index=0))  # simulated Byzantine clients
        self.tasks_done = 0

    def ready(self) -> dict[str, Any]:
        """Identity of this (possibly restarted) incarnation."""
        return {"worker_id": self.worker_id, "pid": os.getpid(), "node_ip": _node_ip(), "tasks_done": self.tasks_done}

    #: task kinds besides training these actors run (the transport hands them evaluation tasks)
    task_kinds = WORKER_TASK_KINDS

    def train(self, task: TrainTask, payload: np.ndarray) -> tuple[np.ndarray, int, dict[str, float]]:
        """One task: (encoded delta as uint8 array, num_examples, metrics); an evaluation task
        (``kind`` "evaluate") is evaluated instead and answers an empty payload."""
        ((update, num_examples, metrics),) = self._run([(task, payload.data)], task.kind == EVALUATE)
        self.tasks_done += 1
        return np.frombuffer(update, dtype=np.uint8), int(num_examples), dict(metrics)

    def train_many(self, tasks: list[TrainTask], *payloads: np.ndarray) -> list[tuple[np.ndarray, int, dict[str, float]]]:
        """Several tasks of a round and kind, trained together (``train.lockstep``) or evaluated; one result per task, in order."""
        if len(payloads) != len(tasks):
            raise ValueError(f"{len(tasks)} tasks but {len(payloads)} payloads")
        items = [(t, p.data) for t, p in zip(tasks, payloads, strict=True)]
        results = self._run(items, tasks[0].kind == EVALUATE)
        self.tasks_done += len(tasks)
        return [(np.frombuffer(update, dtype=np.uint8), int(n), dict(metrics)) for update, n, metrics in results]

    def _run(self, items: list[tuple[TrainTask, Any]], evaluate: bool) -> list[tuple[bytes, int, dict[str, float]]]:
        """Evaluate or train ``items``; with a core budget, each step on the cores claimed before it."""
        if self.cores is None:
            return self.runtime.evaluate_tasks(items) if evaluate else self.runtime.train_tasks(items)
        self.cores.acquire()
        try:
            if evaluate:
                return self.runtime.evaluate_tasks(items)
            return self.runtime.train_tasks(items, should_stop=self.cores.step_hook(lambda: False))
        finally:
            self.cores.release()

    def pid(self) -> int:
        return os.getpid()


def free_port() -> int:
    """A free TCP port on this host (for rank 0's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


class AllReduceActor:
    """One rank of an all-reduce group formed by Ray actors."""

    def __init__(self, threads: int = 1) -> None:
        from dpeft_workers.runtime import set_threads

        set_threads(threads)

    def address(self) -> tuple[str, int]:
        """(node ip, free port): called on rank 0 to pick the rendezvous address."""
        return _node_ip(), free_port()

    def setup(self, master_addr: str, master_port: int, rank: int, world_size: int, backend: str | None = None) -> str:
        """Export the standard variables and ``init_process_group`` (blocks until all ranks join)."""
        from dpeft.transport.distributed_allreduce import init_group

        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0"
        )
        return init_group(backend)

    def run(self, config_tree: dict[str, Any], resume: bool = True) -> list[dict[str, Any]]:
        """All rounds of the run (rank 0 writes the run directory); returns rank 0's metrics rows."""
        from dpeft.rounds.allreduce import run_allreduce
        from dpeft_workers.runtime import WorkerRuntime
        from dpeft_workers.simulate import Heterogeneity

        cfg = config_from_dict(config_tree)
        return run_allreduce(cfg, Heterogeneity(cfg).install(WorkerRuntime(cfg, local_index=0)), resume=resume, quiet=True)

    def reduce(self, arrays: list[np.ndarray], weight: float) -> tuple[list[np.ndarray], float]:
        """Test/benchmark hook: all-reduce weighted arrays, return (mean arrays, total weight)."""
        import torch

        from dpeft.transport.distributed_allreduce import allreduce_weighted_sum

        sums = [torch.from_numpy(np.array(a, dtype=np.float64)) * weight for a in arrays]
        total, _count, _extra = allreduce_weighted_sum(sums, weight, 1)
        return [(s / total).numpy() for s in sums], total

    def teardown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
