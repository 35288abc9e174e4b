"""The round engine: sample, publish, collect, validate, aggregate, evaluate, checkpoint, export.

It talks only to a :class:`~dpeft.transport.base.CoordinatorTransport`; it never imports
grpc or ray, so every transport (gRPC, Ray, in-process) runs the same rounds.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from dpeft.codec import encode_state
from dpeft.codec.tensors import Limits, StateDecoder
from dpeft.config import RunConfig, dump_config
from dpeft.coordinator.checkpoint import latest_checkpoint, save_checkpoint
from dpeft.coordinator.global_model import GlobalModel
from dpeft.coordinator.metrics import MetricsLog
from dpeft.errors import DpeftError, RejectedUpdate
from dpeft.state import AdapterState
from dpeft.strategies import ClientUpdate, make_strategy
from dpeft.sync import make_policy
from dpeft.transport.base import CoordinatorTransport, Rejection, TaskResult, TrainTask

log = logging.getLogger("dpeft.coordinator")


class RoundTimeout(DpeftError):
    """A round did not complete within ``sync.round_timeout_s``."""


class RoundEngine:
    """Runs federated rounds against any transport."""

    def __init__(self, cfg: RunConfig, global_model: GlobalModel, run_dir: Path, resume: bool = True) -> None:
        self.cfg = cfg
        self.gm = global_model
        self.run_dir = run_dir
        self.strategy = make_strategy(cfg.strategy)
        self.policy = make_policy(cfg.sync)
        self.global_state: AdapterState = global_model.initial_state()
        self.schema = self.global_state.schema()
        self.round = 0
        self._open: dict[str, TrainTask] = {}
        self._done: set[str] = set()
        self._lock = threading.Lock()
        self.stop_event = threading.Event()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        self.metrics = MetricsLog(run_dir, total_rounds=cfg.rounds)
        self.resumed_from: int | None = None
        if resume:
            self._resume()

    # -- resume ---------------------------------------------------------------
    def _resume(self) -> None:
        found = latest_checkpoint(self.run_dir / "checkpoints")
        if found is None:
            self.metrics.truncate_after(-1)
            return
        round_num, glob, strat, _info = found
        if glob.schema() != self.schema:
            raise DpeftError(f"checkpoint in {self.run_dir} is for a different adapter; use a new run_dir")
        self.global_state = glob
        self.strategy.load_state_dict(strat)
        self.round = round_num
        self.resumed_from = round_num
        self.metrics.truncate_after(round_num)
        log.info("resumed from round %d", round_num)

    # -- transport hooks ------------------------------------------------------
    def decoder_for(self, task_id: str, client_id: int) -> StateDecoder:
        """Validating decoder for an upload; rejects unknown, stale and duplicate tasks up front."""
        with self._lock:
            task = self._open.get(task_id)
            if task is None:
                reason = "duplicate" if task_id in self._done else "unknown_task"
                raise RejectedUpdate(reason, f"task {task_id!r} is not open (round {self.round})")
            if task.client_id != client_id:
                raise RejectedUpdate("wrong_client", f"task {task_id!r} belongs to client {task.client_id}")
        return StateDecoder(self.schema, Limits(max_total_bytes=self.cfg.transport.max_update_bytes))

    def _accept(self, result: TaskResult) -> ClientUpdate:
        with self._lock:
            if result.task_id not in self._open:
                raise RejectedUpdate("duplicate" if result.task_id in self._done else "stale", f"task {result.task_id} already closed")
        for name, t in result.delta.items():
            if t.is_floating_point() and not bool(t.isfinite().all()):
                raise RejectedUpdate("non_finite", f"tensor {name} has NaN or Inf")
        if result.num_examples <= 0:
            raise RejectedUpdate("num_examples", "an update must report at least one example")
        with self._lock:
            self._open.pop(result.task_id)
            self._done.add(result.task_id)
        return ClientUpdate(result.client_id, result.delta, result.num_examples, result.metrics)

    # -- rounds -----------------------------------------------------------------
    def _eligible(self, transport: CoordinatorTransport) -> tuple[list[int], dict[int, str]]:
        workers = {k: v for k, v in transport.workers().items() if v["alive"] and not v["left"]}
        pinned = {c: wid for wid, w in workers.items() for c in w["client_ids"]}
        if any(not w["own_data"] for w in workers.values()):
            return list(range(self.cfg.clients)), pinned
        return sorted(pinned), pinned

    def _wait_for_workers(self, transport: CoordinatorTransport) -> tuple[list[int], dict[int, str]]:
        start = time.time()
        while not self.stop_event.is_set():
            eligible, pinned = self._eligible(transport)
            if len(eligible) >= self.cfg.clients_per_round:
                return eligible, pinned
            if time.time() - start > self.cfg.sync.round_timeout_s:
                raise RoundTimeout(f"only {len(eligible)} trainable clients after {self.cfg.sync.round_timeout_s:.0f}s")
            self.metrics.progress(f"waiting for workers: {len(eligible)}/{self.cfg.clients_per_round} clients available")
            time.sleep(0.1)
        return [], {}

    def sample(self, round_num: int, eligible: list[int]) -> list[int]:
        """Seeded, per-round client sample (depends only on seed, round and the eligible set)."""
        rng = np.random.default_rng([self.cfg.seed, round_num])
        return sorted(int(c) for c in rng.choice(eligible, size=self.cfg.clients_per_round, replace=False))

    def run_round(self, transport: CoordinatorTransport) -> dict[str, Any] | None:
        """One round; returns its metrics row (None when stopped)."""
        t0 = time.time()
        round_num = self.round + 1
        eligible, pinned = self._wait_for_workers(transport)
        if self.stop_event.is_set():
            return None
        sampled = self.sample(round_num, eligible)
        chosen = self.policy.tasks_for(sampled)
        state = AdapterState(self.global_state.tensors, {**self.global_state.meta, "round": round_num})
        payload = encode_state(state)
        blob_id = f"r{round_num}-{hashlib.sha256(payload).hexdigest()[:16]}"
        transport.publish_blob(blob_id, payload)
        hp = self.strategy.configure_train(round_num, self.global_state)
        tasks = [
            TrainTask(
                task_id=f"r{round_num}-c{c}-{hashlib.sha256(f'{self.cfg.seed}/{round_num}/{c}/{self.run_dir}'.encode()).hexdigest()[:8]}",
                round=round_num,
                client_id=c,
                blob_id=blob_id,
                blob_size=len(payload),
                blob_sha256=hashlib.sha256(payload).digest(),
                hyperparams=hp,
            )
            for c in chosen
        ]
        up0, down0 = transport.bytes_moved()
        with self._lock:
            self._open = {t.task_id: t for t in tasks}
        transport.submit(tasks, pinned)
        aggregator = self.strategy.begin_round(self.global_state)
        rejected: Counter[str] = Counter()
        losses: list[tuple[float, int]] = []
        num_examples = 0
        compute_s = 0.0
        while not self.policy.round_closed(aggregator.count, len(tasks), time.time() - t0):
            if self.stop_event.is_set():
                transport.cancel_pending()
                return None
            if self.policy.timed_out(time.time() - t0):
                transport.cancel_pending()
                raise RoundTimeout(
                    f"round {round_num}: {aggregator.count}/{len(tasks)} updates after {self.cfg.sync.round_timeout_s:.0f}s "
                    "(raise sync.round_timeout_s or check the workers)"
                )
            event = transport.next_event(timeout=0.2)
            if event is None:
                continue
            if isinstance(event, Rejection):
                rejected[event.reason] += 1
                continue
            try:
                update = self._accept(event)
            except RejectedUpdate as exc:
                log.warning("rejected update from %s: %s", event.worker_id, exc)
                rejected[exc.reason] += 1
                continue
            aggregator.add(update)
            num_examples += update.num_examples
            if "train_loss" in update.metrics:
                losses.append((update.metrics["train_loss"], update.num_examples))
            compute_s += float(update.metrics.get("compute_s", 0.0))
            self.metrics.progress(f"round {round_num}/{self.cfg.rounds}: {aggregator.count}/{len(tasks)} clients done")
        transport.cancel_pending()
        with self._lock:
            self._done.update(self._open)
            self._open = {}
        self.global_state = self.strategy.finish_round(self.global_state, aggregator)
        self.global_state.meta = {**state.meta}
        self.round = round_num
        up1, down1 = transport.bytes_moved()
        row: dict[str, Any] = {
            "round": round_num,
            "clients": aggregator.count,
            "sampled": sampled,
            "num_examples": num_examples,
            "train_loss": sum(l * n for l, n in losses) / max(sum(n for _, n in losses), 1) if losses else None,
            "bytes_up": up1 - up0,
            "bytes_down": down1 - down0,
            "client_compute_s": compute_s,
            "rejected": sum(rejected.values()),
            "rejected_reasons": dict(rejected),
        }
        if round_num % self.cfg.train.eval_every == 0 or round_num == self.cfg.rounds:
            t_eval = time.time()
            row.update(self.gm.evaluate(self.global_state))
            row["eval_s"] = time.time() - t_eval
        extra = getattr(self.strategy, "last_metrics", None)
        if extra:
            row.update(extra)
        self._save(round_num)
        row["wall_s"] = time.time() - t0
        self.metrics.append(row)
        return row

    def _save(self, round_num: int) -> None:
        save_checkpoint(
            self.run_dir / "checkpoints", round_num, self.global_state, self.strategy.state_dict(), {"seed": self.cfg.seed}
        )
        self.gm.export(self.global_state, self.run_dir / "adapter")

    def run(self, transport: CoordinatorTransport) -> list[dict[str, Any]]:
        """All remaining rounds (from a resumed checkpoint if any)."""
        if self.round == 0 and not self.metrics.rows:
            t0 = time.time()
            row = {"round": 0, "clients": 0, "num_examples": 0, "train_loss": None, "bytes_up": 0, "bytes_down": 0, "rejected": 0}
            row.update(self.gm.evaluate(self.global_state))
            row["wall_s"] = time.time() - t0
            self.metrics.append(row)
        while self.round < self.cfg.rounds and not self.stop_event.is_set():
            if self.run_round(transport) is None:
                break
        self.gm.export(self.global_state, self.run_dir / "adapter")
        return self.metrics.rows
