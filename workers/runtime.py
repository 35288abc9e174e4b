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
group is trained alone (a debug log says why).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpeft.adapters import ModelBundle, adapter_parameters, build_model, extract_state, load_state
from dpeft.codec.updates.session import RunCodecs
from dpeft.config import RunConfig
from dpeft.data import load_run_data, tokenize_dataset
from dpeft.data.datasets import TextDataset
from dpeft.errors import ProtocolError
from dpeft.privacy.central import clip_update
from dpeft.state import AdapterState
from dpeft.strategies.hyperparams import is_full_factor, sent_names
from dpeft.strategies.lora import has_component, lora_pairs
from dpeft.strategies.rank_prune import prune_update, task_penalty
from dpeft.train import LocalResult, local_train, make_optimizer, task_seed
from dpeft.train.device import resolve_device
from dpeft.train.precision import cast_frozen_base, compute_dtype, prepare_for_training
from dpeft.train.schedule import LrSchedule
from dpeft.transport.base import TrainTask
from dpeft_workers.evaluate import evaluate_tasks, split_indices
from dpeft_workers.personal import PersonalStore
from dpeft_workers.process_settings import give_back_free_memory, set_mmap_threshold, set_threads

log = logging.getLogger("dpeft.worker")


def _component_match(name: str, parts: list[str]) -> bool:
    return any(p in name.split(".") for p in parts)


@dataclass
class _Prepared:
    """A task ready to train: its payload decoded, its adapter and start state chosen."""

    task: TrainTask
    adapter: str  # peft adapter name (one per LoRA rank)
    start: AdapterState  # the training start: the received global, personal tensors restored
    frozen: list[str]  # path components not trained (ffa_lora)
    t0: float


class WorkerRuntime:
    """Trains clients' tasks on one shared model."""

    def __init__(
        self,
        cfg: RunConfig,
        own_data: TextDataset | None = None,
        bundle: ModelBundle | None = None,
        device: str | None = None,
        local_index: int | None = None,
        device_key: str = "--device",
    ) -> None:
        """``device``: a spelling overriding ``train.device`` (``dpeft worker --device``, a
        simulate worker's entry of ``simulate.devices``); ``local_index``: this process's slot
        among the launcher's (a torchrun ``LOCAL_RANK``, a simulate worker's number), which a bare
        ``cuda`` or ``auto`` maps onto the visible GPUs round-robin; ``device_key``: what a
        device error names when ``device`` is given."""
        self.cfg = cfg
        self.device: torch.device | None = None
        self.set_device(device, local_index, device_key)
        loaded = load_run_data(cfg, tokenizer=bundle.tokenizer if bundle is not None else None)
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
        self.data = tokenize_dataset(self.bundle.tokenizer, train, cfg)
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

    @property
    def lockstep_clients(self) -> int:
        """How many tasks this runtime wants at once (1 unless ``train.lockstep``)."""
        return self.cfg.train.lockstep_clients if self.cfg.train.lockstep else 1

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

    def _use_adapter(self, name: str) -> None:
        if self.model.active_adapter != name:
            self.model.set_adapter(name)
            self.params = adapter_parameters(self.model)

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

    def client_indices(self, client_id: int) -> list[int]:
        """Example indices a client trains on (all own examples for an edge worker), less its held-out split under eval.federated."""
        return split_indices(self.cfg, self._partition(client_id), client_id)[0]

    def held_out_indices(self, client_id: int) -> list[int]:
        """A client's held-out examples, never trained on (none unless ``eval.federated``)."""
        return split_indices(self.cfg, self._partition(client_id), client_id)[1]

    def _partition(self, client_id: int) -> list[int]:
        return list(range(len(self.data))) if self.partitions is None else self.partitions[client_id]

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

    def _groups(self, prepared: list[_Prepared]) -> list[list[int]]:
        """Indices of tasks trained together (lockstep), in first-seen order; singletons train alone."""
        if not self.cfg.train.lockstep or len(prepared) < 2:
            return [[i] for i in range(len(prepared))]
        keyed: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        for i, p in enumerate(prepared):
            keyed.setdefault((p.adapter, tuple(p.frozen)), []).append(i)
        groups: list[list[int]] = []
        for (adapter, _), idx in keyed.items():
            reason = self._lockstep_reason(adapter)
            if reason is not None:
                log.debug("round %s: %d clients trained one after another: %s", prepared[idx[0]].task.round, len(idx), reason)
                groups.extend([i] for i in idx)
                continue
            if len(keyed) > 1:
                log.debug(
                    "round %s: tasks differ in adapter rank or frozen tensors; %d trained together on adapter %s",
                    prepared[idx[0]].task.round,
                    len(idx),
                    adapter,
                )
            k = self.lockstep_clients  # at most train.lockstep_clients in one pass (memory)
            groups.extend(idx[at : at + k] for at in range(0, len(idx), k))
        return groups

    def _lockstep_reason(self, adapter: str) -> str | None:
        """Why lockstep cannot train on ``adapter`` (None: it can); checked once per adapter."""
        if adapter not in self._lockstep_refused:
            from dpeft.train.multi_lora import lockstep_unsupported

            self._use_adapter(adapter)
            reason = lockstep_unsupported(self.model, self.cfg.model.task)
            if reason is not None:
                log.warning(
                    "train.lockstep: adapter %s cannot be trained in lockstep (%s); its clients train one after another",
                    adapter,
                    reason,
                )
            self._lockstep_refused[adapter] = reason
        return self._lockstep_refused[adapter]

    def _trainable(self, frozen: list[str]) -> list[str]:
        return [n for n in self.params if not _component_match(n, frozen)]

    def _train_alone(self, p: _Prepared, should_stop: Callable[[], bool] | None = None) -> tuple[AdapterState, LocalResult]:
        task = p.task
        self._use_adapter(p.adapter)
        load_state(self.model, p.start)  # strict: names and shapes must match the active adapter
        names = self._trainable(p.frozen)
        params = [self.params[n] for n in names]
        for n, param in self.params.items():
            param.requires_grad_(n in names)
        opt = make_optimizer(params, self.cfg.train)
        pen = task_penalty(task.hyperparams, self.params)  # hetlora's tail-rank penalty
        if self.cfg.train.keep_optimizer_state and task.client_id in self._opt_states:
            opt.load_state_dict(self._opt_states[task.client_id])
        if self.cfg.privacy.mode == "local":  # record-level DP-SGD (imports opacus)
            from dpeft.privacy.local_dp import dp_local_train

            result = dp_local_train(
                self.model, params, self.data, self.client_indices(task.client_id), self.cfg.train, self.cfg.privacy,
                self.cfg.model.task, optimizer=opt, should_stop=should_stop, round_num=task.round, schedule=self.schedule,
            )  # fmt: skip
        else:
            result = local_train(
                self.model,
                params,
                self.data,
                self.client_indices(task.client_id),
                self.cfg.train,
                self.cfg.model.task,
                self._train_seed(task),
                optimizer=opt,
                prox_mu=float(task.hyperparams.get("prox_mu", 0.0)),
                num_labels=self.num_labels,
                should_stop=should_stop,
                round_num=task.round,
                schedule=self.schedule,
                penalty=None if pen is None else (lambda: pen(self.params)),
            )
        if self.cfg.train.keep_optimizer_state:
            self._opt_states[task.client_id] = opt.state_dict()
        for param in self.params.values():
            param.requires_grad_(True)
        return extract_state(self.model), result

    def _train_lockstep(
        self, group: list[_Prepared], should_stop: Callable[[], bool] | None = None
    ) -> list[tuple[AdapterState, LocalResult]]:
        """One lockstep run for tasks on the same adapter with the same frozen tensors."""
        from dpeft.train.multi_lora import ClientJob, lockstep_train

        self._use_adapter(group[0].adapter)
        keep = self.cfg.train.keep_optimizer_state
        jobs = [
            ClientJob(
                p.task.client_id,
                p.start,
                self.client_indices(p.task.client_id),
                self._train_seed(p.task),
                prox_mu=float(p.task.hyperparams.get("prox_mu", 0.0)),
                optimizer_state=self._opt_states.get(p.task.client_id) if keep else None,
                penalty=task_penalty(p.task.hyperparams, self.params),
            )
            for p in group
        ]
        outcomes = lockstep_train(
            self.model,
            self.data,
            jobs,
            self.cfg.train,
            self.cfg.model.task,
            num_labels=self.num_labels,
            trainable=self._trainable(group[0].frozen),
            keep_optimizer_state=keep,
            should_stop=should_stop,
            round_num=group[0].task.round,
            schedule=self.schedule,
        )
        if keep:
            for o in outcomes:
                if o.optimizer_state is not None:
                    self._opt_states[o.client_id] = o.optimizer_state
        log.debug(
            "round %s: %d clients trained in lockstep in %.2fs",
            group[0].task.round,
            len(group),
            sum(o.result.compute_s for o in outcomes),
        )
        return [(o.state, o.result) for o in outcomes]

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
        local, pruned = prune_update(hp, local)  # hetlora's rank self-pruning (no-op otherwise)
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

    def _train_seed(self, task: TrainTask) -> int:
        """Batch-order seed of a task: (seed, round, client), plus the dispatch number of async tasks."""
        seq = task.hyperparams.get("task_seq")
        base = self.cfg.seed if seq is None else self.cfg.seed + 1_000_003 * (int(seq) + 1)
        return task_seed(base, task.round, task.client_id)

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
