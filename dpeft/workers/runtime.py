"""The worker runtime, independent of any transport.

A process loads the frozen base model and its data once. A *client* is only (data indices,
optional optimizer state): for each task the global adapter is swapped into the shared
model, trained for S local steps on the client's shard, and the delta is returned. Nothing
per client is kept by default, so memory does not grow with the number of clients.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from dpeft.adapters import adapter_parameters, build_model, extract_state, load_state
from dpeft.codec import decode_state, encode_state
from dpeft.config import RunConfig
from dpeft.data import load_dataset, partition, tokenize
from dpeft.data.datasets import TextDataset
from dpeft.state import AdapterState, subtract
from dpeft.train import local_train, make_optimizer, task_seed
from dpeft.transport.base import TrainTask


def _component_match(name: str, parts: list[str]) -> bool:
    return any(p in name.split(".") for p in parts)


class WorkerRuntime:
    """Trains clients' tasks on one shared model."""

    def __init__(self, cfg: RunConfig, own_data: TextDataset | None = None) -> None:
        self.cfg = cfg
        need_labels = cfg.model.task == "seq_cls"
        train, _test = load_dataset(cfg.data, cfg.seed, need_labels=need_labels)
        self.label_names = train.label_names
        if own_data is not None:
            train = own_data
            self.partitions = None
        else:
            self.partitions = partition(
                train.labels,
                cfg.clients,
                cfg.data.partition,
                cfg.seed,
                cfg.data.dirichlet_alpha,
                cfg.data.min_examples_per_client,
            )
        num_labels = len(self.label_names) if need_labels else None
        self.num_labels = num_labels
        self.bundle = build_model(cfg.model, cfg.adapter, num_labels, cfg.seed)
        self.model = self.bundle.model
        self.data = tokenize(self.bundle.tokenizer, train.texts, train.labels if need_labels else None, cfg.model.max_length)
        self.params = adapter_parameters(self.model)
        self.schema = extract_state(self.model).schema()
        self._opt_states: dict[int, dict[str, Any]] = {}

    def client_indices(self, client_id: int) -> list[int]:
        """Example indices of a client (all own examples for an edge worker)."""
        if self.partitions is None:
            return list(range(len(self.data)))
        return self.partitions[client_id]

    def train_task(self, task: TrainTask, payload: bytes) -> tuple[bytes, int, dict[str, float]]:
        """Run one task: returns (encoded delta, num_examples, metrics)."""
        t0 = time.perf_counter()
        global_state = decode_state(payload, schema=self.schema)
        load_state(self.model, global_state)
        hp = task.hyperparams
        frozen = list(hp.get("freeze", []))
        names = [n for n in self.params if not _component_match(n, frozen)]
        params = [self.params[n] for n in names]
        for n, p in self.params.items():
            p.requires_grad_(n in names)
        opt = make_optimizer(params, self.cfg.train)
        if self.cfg.train.keep_optimizer_state and task.client_id in self._opt_states:
            opt.load_state_dict(self._opt_states[task.client_id])
        result = local_train(
            self.model,
            params,
            self.data,
            self.client_indices(task.client_id),
            self.cfg.train,
            self.cfg.model.task,
            task_seed(self.cfg.seed, task.round, task.client_id),
            optimizer=opt,
            prox_mu=float(hp.get("prox_mu", 0.0)),
            num_labels=self.num_labels,
        )
        if self.cfg.train.keep_optimizer_state:
            self._opt_states[task.client_id] = opt.state_dict()
        for p in self.params.values():
            p.requires_grad_(True)
        local = extract_state(self.model)
        delta = subtract(local, global_state)
        delta.meta = {"round": task.round, "client_id": task.client_id, "kind": "delta"}
        metrics = {"train_loss": result.train_loss, "compute_s": result.compute_s, "task_s": time.perf_counter() - t0}
        return encode_state(delta), result.num_examples, metrics


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads for this process."""
    torch.set_num_threads(max(1, n))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


__all__ = ["WorkerRuntime", "set_threads", "AdapterState"]
