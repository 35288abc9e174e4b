"""The worker runtime, independent of any transport.

A process loads the frozen base model and its data once. A *client* is only (data indices,
optional optimizer state): for each task the global adapter is swapped into the shared
model, trained for S local steps on the client's shard, and the delta is returned. Nothing
per client is kept by default, so memory does not grow with the number of clients.

Task hyperparameters (see :mod:`dpeft.strategies.hyperparams`) adapt this: ``freeze`` and
``personal`` tensors are left out of the update (personal ones live on disk per client,
:class:`~dpeft_workers.personal.PersonalStore`), ``full_factors`` are sent as values, and a
payload whose LoRA factors have another rank than the configured one (flexlora's per-client
ranks) is trained on a second peft adapter of that rank on the same base, created once. Its
``lora_alpha`` keeps ``alpha / r`` of the configured adapter, so ``B @ A`` means the same
weight change at every rank.

With ``train.lockstep`` the worker hands several tasks of a round to :meth:`train_tasks`
at once: tasks that can share one pass (same adapter rank, same frozen tensors) are trained
together by :func:`dpeft.train.multi_lora.lockstep_train` -- one forward/backward of the base
per step, each client's rows through its own adapter, its own optimizer, prox term, personal
start state and batch order (seeded per (seed, round, client)), so each update equals the one
sequential training gives, to fp32 rounding. Everything after training (personal tensors saved,
the update hook, error-feedback codecs) is per client as before. A task that cannot join a
group is trained alone (a debug log says why). The training itself (alone or in lockstep) is
:class:`~dpeft_workers.training.TaskTrainer`, which this runtime extends.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dpeft.adapters import ModelBundle, adapter_parameters, build_model, extract_state
from dpeft.codec.updates.session import RunCodecs
from dpeft.config import RunConfig
from dpeft.data import RunData, load_run_data, tokenize_dataset
from dpeft.data.datasets import TextDataset
from dpeft.errors import ProtocolError
from dpeft.privacy.central import clip_update
from dpeft.state import AdapterState
from dpeft.strategies.hyperparams import is_full_factor, sent_names
from dpeft.strategies.lora import has_component, lora_pairs
from dpeft.strategies.rank_prune import prune_update
from dpeft.train import LocalResult
from dpeft.train.device import resolve_device
from dpeft.train.precision import cast_frozen_base, compute_dtype, prepare_for_training
from dpeft.train.schedule import LrSchedule
from dpeft.transport.base import TrainTask
from dpeft_workers.evaluate import evaluate_tasks
from dpeft_workers.personal import PersonalStore
from dpeft_workers.process_settings import give_back_free_memory, set_mmap_threshold, set_threads
from dpeft_workers.training import TaskTrainer, _Prepared

log = logging.getLogger("dpeft.worker")


class WorkerRuntime(TaskTrainer):
    """Trains clients' tasks on one shared model."""

    def __init__(
        self,
        cfg: RunConfig,
        own_data: TextDataset | None = None,
        bundle: ModelBundle | None = None,
        device: str | None = None,
        local_index: int | None = None,
        device_key: str = "--device",
        run_data: RunData | None = None,
    ) -> None:
        """``device``: a spelling overriding ``train.device`` (``dpeft worker --device``, a
        simulate worker's entry of ``simulate.devices``); ``local_index``: this process's slot
        among the launcher's (a torchrun ``LOCAL_RANK``, a simulate worker's number), which a bare
        ``cuda`` or ``auto`` maps onto the visible GPUs round-robin; ``device_key``: what a
        device error names when ``device`` is given; ``run_data``: the run's data as the caller
        loaded it from the same config (the forking coordinator's), instead of loading it again."""
        self.cfg = cfg
        self.device: torch.device | None = None
        self.set_device(device, local_index, device_key)
        loaded = run_data or load_run_data(cfg, tokenizer=bundle.tokenizer if bundle is not None else None)
        self.label_names = loaded.label_names
        train = loaded.train
        self.partitions: list[list[int]] | None = loaded.partitions
        if own_data is not None:
            train = own_data
            self.partitions = None
        num_labels = loaded.num_labels
        self.num_labels = num_labels
        # ``bundle``: a model built by the caller from the same config (the coordinator's, shared
        # copy-on-write with workers it forks); otherwise this worker's own
        self.bundle = bundle if bundle is not None else build_model(cfg.model, cfg.adapter, num_labels, cfg.seed)
        self.model = self.bundle.model
        # rows are tokenized as batches first use them: a process tokenizes what it trains, not every client's data
        self.data = tokenize_dataset(self.bundle.tokenizer, train, cfg, lazy=True)
        self.params = adapter_parameters(self.model)
        self.schema = extract_state(self.model).schema()
        self._opt_states: dict[int, dict[str, Any]] = {}
        self._rank_adapters: dict[int, str] = {}  # LoRA rank -> peft adapter name (heterogeneous ranks)
        self.personal = PersonalStore(cfg.train.personal_dir or Path(cfg.run_dir) / "personal")
        self.codecs = RunCodecs.from_config(cfg)  # codec.down payloads in, codec.up (+ error feedback) out
        self._lockstep_refused: dict[str, str | None] = {}  # adapter name -> why lockstep cannot train it
        self._allocator_set = False
        self.schedule = LrSchedule.from_config(cfg.train, cfg.rounds)
        #: applied to each client's update before it is encoded (None: sent as trained); simulated
        #: Byzantine clients live here (:meth:`dpeft_workers.simulate.Heterogeneity.install`)
        self.update_hook: Callable[[TrainTask, AdapterState], AdapterState] | None = None
        if bundle is None:  # a shared (forked) base is placed in the process that trains on it
            self.place()

    def set_device(self, device: str | None, local_index: int | None = None, key: str = "--device") -> None:
        """Choose the training device before the model is placed (a forked worker chooses its own)."""
        if self.device is not None:
            raise RuntimeError(f"the model is already on {self.device}")
        self._device_spec = (device or self.cfg.train.device, "train.device" if device is None else key)
        self._local_index = local_index

    def place(self) -> torch.device:
        """Put the model on its training device, in ``train.precision``, with the memory savers (once)."""
        if self.device is None:
            spec, key = self._device_spec
            self.device = resolve_device(spec, self._local_index, key)
            prepare_for_training(self.model, self.device, self.cfg.train)
            self.params = adapter_parameters(self.model)
            log.info("training on %s (%s)", self.device, self.cfg.train.precision)
        return self.device

    def _adapter_for(self, state: AdapterState) -> str:
        """The peft adapter whose shapes match ``state`` (creating it once per rank)."""
        if state.schema() == self.schema:
            return "default"
        pairs = lora_pairs(state.tensors)
        ranks = {int(state[a].shape[0]) for a, _ in pairs.values()}
        if len(ranks) != 1 or set(state.tensors) != set(self.schema):
            raise ProtocolError("the payload does not match this worker's adapter (names differ or mixed LoRA ranks)")
        rank = ranks.pop()
        return self._rank_adapters.get(rank) or self._add_rank_adapter(rank)

    def _add_rank_adapter(self, rank: int) -> str:
        from dpeft.adapters.methods import build_peft_config

        adapter = self.cfg.adapter
        # keep the scale alpha / r of the configured adapter, so B @ A means the same at every rank
        scaled = dataclasses.replace(adapter, r=rank, alpha=adapter.alpha * rank / adapter.r)
        base: Any = self.model.get_base_model()  # the transformers model under peft
        model_type = base.config.model_type
        name = f"rank{rank}"
        self.model.add_adapter(name, build_peft_config(scaled, self.cfg.model, model_type))
        if self.device is not None:  # the new adapter's tensors: on the training device, float32
            self.model.to(self.device)
            if self.cfg.train.precision != "fp32":
                cast_frozen_base(self.model, compute_dtype(self.cfg.train.precision))
        self._rank_adapters[rank] = name
        return name

    def evaluate_tasks(self, items: list[tuple[TrainTask, bytes]]) -> list[tuple[bytes, int, dict[str, float]]]:
        """Evaluation tasks (kind "evaluate", :mod:`dpeft_workers.evaluate`): (empty payload, examples, metrics) each."""
        return evaluate_tasks(self, items)

    def train_task(self, task: TrainTask, payload: bytes) -> tuple[bytes, int, dict[str, float]]:
        """Run one task: returns (encoded delta, num_examples, metrics)."""
        return self.train_tasks([(task, payload)])[0]

    def train_tasks(
        self, items: list[tuple[TrainTask, bytes]], should_stop: Callable[[], bool] | None = None
    ) -> list[tuple[bytes, int, dict[str, float]]]:
        """Run several tasks (in lockstep where ``train.lockstep`` allows); results in the same order.

        ``should_stop`` is asked before every training step; when it says so,
        :class:`~dpeft.train.TrainingStopped` is raised and no result is returned."""
        if not self._allocator_set:  # here, not in __init__: a forked worker's runtime is built before the fork
            self._allocator_set = True
            self.place()
            if self.cfg.train.worker_mmap_threshold_kib:
                set_mmap_threshold(self.cfg.train.worker_mmap_threshold_kib << 10)
        decoded: dict[int, AdapterState] = {}  # one decoded global per payload object (tasks of a round share it)
        prepared = [self._prepare(task, payload, decoded) for task, payload in items]
        results: list[tuple[bytes, int, dict[str, float]] | None] = [None] * len(prepared)
        for group in self._groups(prepared):
            if len(group) > 1:
                for i, (local, result) in zip(
                    group, self._train_lockstep([prepared[i] for i in group], should_stop), strict=True
                ):
                    results[i] = self._finish(prepared[i], local, result, {"lockstep_clients": float(len(group))})
            else:
                (i,) = group
                local, result = self._train_alone(prepared[i], should_stop)
                results[i] = self._finish(prepared[i], local, result, {})
        give_back_free_memory()  # the activations' free heap, before the next round (every transport)
        return [r for r in results if r is not None]

    def _prepare(self, task: TrainTask, payload: bytes, decoded: dict[int, AdapterState]) -> _Prepared:
        t0 = time.perf_counter()
        global_state = decoded.get(id(payload))
        if global_state is None:
            global_state = decoded[id(payload)] = self.codecs.decode_global(payload)
        adapter = self._adapter_for(global_state)
        hp = task.hyperparams
        personal = list(hp.get("personal", []))
        start = self._personal_start(task.client_id, global_state, personal) if personal else global_state
        return _Prepared(task, adapter, start, list(hp.get("freeze", [])), t0)

    def _finish(
        self, p: _Prepared, local: AdapterState, result: LocalResult, extra: dict[str, float]
    ) -> tuple[bytes, int, dict[str, float]]:
        """Personal tensors saved, the update built (and passed through ``update_hook``), encoded."""
        task, hp, start = p.task, p.task.hyperparams, p.start
        personal = list(hp.get("personal", []))
        if personal:
            self.personal.save(
                task.client_id, AdapterState(OrderedDict((k, v) for k, v in local.items() if has_component(k, personal)))
            )
        local, pruned = prune_update(hp, local, start)  # hetlora's rank self-pruning (no-op otherwise)
        extra = {**extra, **pruned}
        delta = AdapterState(
            OrderedDict((k, local[k] if is_full_factor(k, hp) else local[k] - start[k]) for k in sent_names(local.tensors, hp)),
            {"round": task.round, "client_id": task.client_id, "kind": "delta"},
        )
        if self.update_hook is not None:
            delta = self.update_hook(task, delta)
        delta, clip_bit = clip_update(delta, hp)  # central DP with privacy.clipping=client: clipped before it leaves
        metrics = {"train_loss": result.train_loss, "compute_s": result.compute_s, "task_s": time.perf_counter() - p.t0, **extra}
        metrics.update(result.metrics)
        metrics.update(clip_bit)
        pairs = lora_pairs(local.tensors)
        if pairs:
            metrics["lora_rank"] = float(max(local[a].shape[0] for a, _ in pairs.values()))
        return self.codecs.encode_update(task.client_id, delta), result.num_examples, metrics

    def _personal_start(self, client_id: int, received: AdapterState, personal: list[str]) -> AdapterState:
        """The training start state: the client's saved personal tensors over the received ones."""
        saved = self.personal.load(client_id)
        if saved is None:
            return received
        names = [k for k in received.tensors if has_component(k, personal)]
        if any(k not in saved.tensors or saved[k].shape != received[k].shape for k in names):
            return received  # saved for another adapter shape: start over from the global
        start = received.clone()
        for k in names:
            start.tensors[k] = saved[k].to(received[k].dtype).clone()
        return start


__all__ = ["WorkerRuntime", "set_threads", "set_mmap_threshold", "give_back_free_memory", "AdapterState"]
