"""The worker runtime, independent of any transport.

A process loads the frozen base model and its data once. A *client* is only (data indices,
optional optimizer state): for each task the global adapter is swapped into the shared
model, trained for S local steps on the client's shard, and the delta is returned. Nothing
per client is kept by default, so memory does not grow with the number of clients.

Task hyperparameters (see :mod:`dpeft.strategies.hyperparams`) adapt this: ``freeze`` and
``personal`` tensors are left out of the update (personal ones live on disk per client,
:class:`~dpeft.workers.personal.PersonalStore`), ``full_factors`` are sent as values, and a
payload whose LoRA factors have another rank than the configured one (flexlora's per-client
ranks) is trained on a second peft adapter of that rank on the same base, created once. Its
``lora_alpha`` keeps ``alpha / r`` of the configured adapter, so ``B @ A`` means the same
weight change at every rank.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from dpeft.adapters import adapter_parameters, build_model, extract_state, load_state
from dpeft.codec import decode_state, encode_state  # noqa: F401 - kept for importers
from dpeft.codec.updates.session import RunCodecs
from dpeft.config import RunConfig
from dpeft.data import load_dataset, partition, tokenize
from dpeft.data.datasets import TextDataset
from dpeft.errors import ProtocolError
from dpeft.state import AdapterState
from dpeft.strategies.hyperparams import is_full_factor, sent_names
from dpeft.strategies.lora import has_component, lora_pairs
from dpeft.train import local_train, make_optimizer, task_seed
from dpeft.transport.base import TrainTask
from dpeft.workers.personal import PersonalStore


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
        self._rank_adapters: dict[int, str] = {}  # LoRA rank -> peft adapter name (heterogeneous ranks)
        self.personal = PersonalStore(cfg.train.personal_dir or Path(cfg.run_dir) / "personal")
        self.codecs = RunCodecs.from_config(cfg)  # codec.down payloads in, codec.up (+ error feedback) out

    def _activate_for(self, state: AdapterState) -> None:
        """Make the peft adapter whose shapes match ``state`` the active one (creating it once per rank)."""
        name = self.model.active_adapter
        if state.schema() != self.schema:
            pairs = lora_pairs(state.tensors)
            ranks = {int(state[a].shape[0]) for a, _ in pairs.values()}
            if len(ranks) != 1 or set(state.tensors) != set(self.schema):
                raise ProtocolError("the payload does not match this worker's adapter (names differ or mixed LoRA ranks)")
            rank = ranks.pop()
            name = self._rank_adapters.get(rank) or self._add_rank_adapter(rank)
        else:
            name = "default"
        if self.model.active_adapter != name:
            self.model.set_adapter(name)
            self.params = adapter_parameters(self.model)

    def _add_rank_adapter(self, rank: int) -> str:
        from dpeft.adapters.methods import build_peft_config

        adapter = self.cfg.adapter
        # keep the scale alpha / r of the configured adapter, so B @ A means the same at every rank
        scaled = dataclasses.replace(adapter, r=rank, alpha=adapter.alpha * rank / adapter.r)
        model_type = self.model.get_base_model().config.model_type
        name = f"rank{rank}"
        self.model.add_adapter(name, build_peft_config(scaled, self.cfg.model, model_type))
        self._rank_adapters[rank] = name
        return name

    def client_indices(self, client_id: int) -> list[int]:
        """Example indices of a client (all own examples for an edge worker)."""
        if self.partitions is None:
            return list(range(len(self.data)))
        return self.partitions[client_id]

    def train_task(self, task: TrainTask, payload: bytes) -> tuple[bytes, int, dict[str, float]]:
        """Run one task: returns (encoded delta, num_examples, metrics)."""
        t0 = time.perf_counter()
        global_state = self.codecs.decode_global(payload)
        self._activate_for(global_state)
        load_state(self.model, global_state)  # strict: names and shapes must match the active adapter
        hp = task.hyperparams
        personal = list(hp.get("personal", []))
        start = global_state
        if personal:
            start = self._restore_personal(task.client_id, global_state, personal)
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
            self._train_seed(task),
            optimizer=opt,
            prox_mu=float(hp.get("prox_mu", 0.0)),
            num_labels=self.num_labels,
        )
        if self.cfg.train.keep_optimizer_state:
            self._opt_states[task.client_id] = opt.state_dict()
        for p in self.params.values():
            p.requires_grad_(True)
        local = extract_state(self.model)
        if personal:
            self.personal.save(task.client_id, AdapterState(OrderedDict((k, v) for k, v in local.items() if has_component(k, personal))))
        delta = AdapterState(
            OrderedDict((k, local[k] if is_full_factor(k, hp) else local[k] - start[k]) for k in sent_names(local.tensors, hp)),
            {"round": task.round, "client_id": task.client_id, "kind": "delta"},
        )
        if task.client_id in self.cfg.simulate.byzantine_clients:
            delta = self._corrupt(task, delta)
        metrics = {"train_loss": result.train_loss, "compute_s": result.compute_s, "task_s": time.perf_counter() - t0}
        pairs = lora_pairs(local.tensors)
        if pairs:
            metrics["lora_rank"] = float(max(local[a].shape[0] for a, _ in pairs.values()))
        return self.codecs.encode_update(task.client_id, delta), result.num_examples, metrics

    def _train_seed(self, task: TrainTask) -> int:
        """Batch-order seed of a task: (seed, round, client), plus the dispatch number of async tasks."""
        seq = task.hyperparams.get("task_seq")
        base = self.cfg.seed if seq is None else self.cfg.seed + 1_000_003 * (int(seq) + 1)
        return task_seed(base, task.round, task.client_id)

    def _restore_personal(self, client_id: int, received: AdapterState, personal: list[str]) -> AdapterState:
        """Load the client's saved personal tensors over the received ones; returns the training start state."""
        saved = self.personal.load(client_id)
        if saved is None:
            return received
        names = [k for k in received.tensors if has_component(k, personal)]
        if any(k not in saved.tensors or saved[k].shape != received[k].shape for k in names):
            return received  # saved for another adapter shape: start over from the global
        with torch.no_grad():
            for k in names:
                self.params[k].copy_(saved[k].to(self.params[k].dtype))
        start = received.clone()
        for k in names:
            start.tensors[k] = saved[k].clone()
        return start

    def _corrupt(self, task: TrainTask, delta: AdapterState) -> AdapterState:
        """Simulated Byzantine client: the update times ``simulate.byzantine_scale`` (and random signs)."""
        sim = self.cfg.simulate
        gen = torch.Generator().manual_seed(task_seed(self.cfg.seed + 7, task.round, task.client_id))
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for k, v in delta.items():
            t = v * sim.byzantine_scale
            if sim.byzantine_random_sign:
                t = t * (torch.randint(0, 2, v.shape, generator=gen) * 2 - 1).to(v.dtype)
            out[k] = t
        return AdapterState(out, dict(delta.meta))


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads for this process."""
    torch.set_num_threads(max(1, n))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


__all__ = ["WorkerRuntime", "set_threads", "AdapterState"]
