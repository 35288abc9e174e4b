"""Training a worker's tasks on the shared model: alone, or several in lockstep (see :mod:`dpeft_workers.runtime`).

:class:`TaskTrainer` is the part of :class:`~dpeft_workers.runtime.WorkerRuntime` that runs
prepared tasks: which tasks can share one pass (same adapter, same frozen tensors, at most
``train.lockstep_clients``), one client's training (local DP-SGD under ``privacy.mode: local``,
the prox term and hetlora's tail-rank penalty), a lockstep run, the per-task batch-order seed and
the clients' example indices. The runtime prepares the tasks and builds, hooks and encodes the
updates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dpeft.adapters import adapter_parameters, extract_state, load_state
from dpeft.config import RunConfig
from dpeft.state import AdapterState
from dpeft.strategies.rank_prune import task_penalty
from dpeft.train import LocalResult, local_train, make_optimizer, task_seed
from dpeft.train.schedule import LrSchedule
from dpeft.transport.base import TrainTask
from dpeft_workers.evaluate import split_indices

log = logging.getLogger("dpeft.worker")

__all__ = ["TaskTrainer"]


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


class TaskTrainer:
    """Runs prepared tasks on the shared model (the training half of the worker runtime)."""

    cfg: RunConfig
    model: Any  # the peft model over the shared base
    params: dict[str, Any]  # the active adapter's parameters, by name
    data: Any  # the tokenized training set
    partitions: list[list[int]] | None
    num_labels: int
    schedule: LrSchedule
    _opt_states: dict[int, dict[str, Any]]
    _lockstep_refused: dict[str, str | None]

    @property
    def lockstep_clients(self) -> int:
        """How many tasks this runtime wants at once (1 unless ``train.lockstep``)."""
        return self.cfg.train.lockstep_clients if self.cfg.train.lockstep else 1

    def _use_adapter(self, name: str) -> None:
        if self.model.active_adapter != name:
            self.model.set_adapter(name)
            self.params = adapter_parameters(self.model)

    def client_indices(self, client_id: int) -> list[int]:
        """Example indices a client trains on (all own examples for an edge worker), less its held-out split under eval.federated."""
        return split_indices(self.cfg, self._partition(client_id), client_id)[0]

    def held_out_indices(self, client_id: int) -> list[int]:
        """A client's held-out examples, never trained on (none unless ``eval.federated``)."""
        return split_indices(self.cfg, self._partition(client_id), client_id)[1]

    def _partition(self, client_id: int) -> list[int]:
        return list(range(len(self.data))) if self.partitions is None else self.partitions[client_id]

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

    def _train_seed(self, task: TrainTask) -> int:
        """Batch-order seed of a task: (seed, round, client), plus the dispatch number of async tasks."""
        seq = task.hyperparams.get("task_seq")
        base = self.cfg.seed if seq is None else self.cfg.seed + 1_000_003 * (int(seq) + 1)
        return task_seed(base, task.round, task.client_id)
