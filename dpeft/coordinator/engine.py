"""The round engine: sample, publish, collect, validate, aggregate, evaluate, checkpoint, export.

It talks only to a :class:`~dpeft.transport.base.CoordinatorTransport`; it never imports
grpc or ray, so every transport (gRPC, Ray, in-process) runs the same rounds.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from dpeft.codec import encode_state  # noqa: F401 - kept for importers
from dpeft.codec.spool import SpooledBlob, SpoolPolicy
from dpeft.codec.tensors import Limits, StateDecoder
from dpeft.codec.updates.session import RunCodecs
from dpeft.config import RunConfig, dump_config
from dpeft.coordinator.checkpoint import clear_checkpoints, latest_checkpoint, save_checkpoint
from dpeft.coordinator.global_model import GlobalModel
from dpeft.coordinator.metrics import MetricsLog
from dpeft.errors import DpeftError, RejectedUpdate
from dpeft.state import AdapterState
from dpeft.strategies import ClientUpdate, make_strategy
from dpeft.strategies.hyperparams import update_schema
from dpeft.sync import make_policy
from dpeft.sync.base import check_coordinated
from dpeft.transport.base import Blob, CoordinatorTransport, Rejection, TaskResult, TrainTask, check_norm, check_update

log = logging.getLogger("dpeft.coordinator")


def sample_clients(seed: int, round_num: int, eligible: list[int], size: int) -> list[int]:
    """The seeded per-round client sample: min(size, len(eligible)) of ``eligible``, sorted."""
    rng = np.random.default_rng([seed, round_num])
    return sorted(int(c) for c in rng.choice(eligible, size=min(size, len(eligible)), replace=False))


def transfer_stats(transport: CoordinatorTransport) -> dict[str, int]:
    """Cumulative transfer counters of transports that keep them (gRPC: uploads resumed after a
    drop, corrupted chunks re-sent); a round's metrics row reports their increase."""
    stats = getattr(transport, "stats", None)
    if stats is None:
        return {}
    return {k: int(v) for k, v in stats().items() if k in ("uploads_resumed", "corrupt_chunks")}


class RoundTimeout(DpeftError):
    """A round did not complete within ``sync.round_timeout_s``."""


@dataclass
class TaskInfo:
    """Engine-side bookkeeping of one open task."""

    task: TrainTask
    schema: Any  # what the update must look like (names, shapes, dtypes)
    version: int  # the global version (aggregation steps done) the client starts from
    submitted: float
    attempt: int = 0


class RoundEngine:
    """Runs federated rounds against any transport."""

    def __init__(self, cfg: RunConfig, global_model: GlobalModel, run_dir: Path, resume: bool = True) -> None:
        self.cfg = cfg
        self.gm = global_model
        self.run_dir = run_dir
        self.strategy = make_strategy(cfg.strategy)
        self.codecs = RunCodecs.from_config(cfg)  # codec.up decodes uploads, codec.down encodes the global
        # large uploads and globals go through temp files (bounded coordinator memory)
        self.spool = SpoolPolicy(cfg.transport.spool_bytes, cfg.transport.spool_dir or Path(run_dir) / "spool")
        check_coordinated(cfg)
        self.policy = make_policy(cfg.sync, cfg.clients_per_round)
        self.global_state: AdapterState = global_model.initial_state()
        self.schema = self.global_state.schema()
        self.round = 0
        self._open: dict[str, TrainTask] = {}
        self._done: set[str] = set()
        self._info: dict[str, TaskInfo] = {}
        self._late: dict[str, TrainTask] = {}  # deadline fold: tasks whose round closed, still accepted
        self._missed: set[str] = set()  # tasks whose round closed without them (their updates are "late")
        self._payloads: dict[Any, tuple[str, int, bytes, Any, int]] = {}
        self._payloads_version: tuple[int, int] = (-1, -1)
        self.started = time.time()
        self._lock = threading.Lock()
        self.stop_event = threading.Event()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        self.metrics = MetricsLog(run_dir, total_rounds=cfg.rounds)
        self.resumed_from: int | None = None
        if resume:
            self._resume()
        if self.resumed_from is None:  # a run that starts over forgets what an earlier run left in run_dir
            self.codecs.clear_residuals()  # error feedback begins empty
            self.metrics.truncate_after(-1)
            if clear_checkpoints(self.run_dir / "checkpoints"):
                log.info("starting over: removed the checkpoints of an earlier run in %s", self.run_dir)
            if self.cfg.train.personal_dir is None:  # clients' personal tensors start over too
                shutil.rmtree(self.run_dir / "personal", ignore_errors=True)

    # -- resume ---------------------------------------------------------------
    def _resume(self) -> None:
        found = latest_checkpoint(self.run_dir / "checkpoints")
        if found is None:
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
            task = self._open.get(task_id) or self._late.get(task_id)
            if task is None:
                reason = "late" if task_id in self._missed else "duplicate" if task_id in self._done else "unknown_task"
                raise RejectedUpdate(reason, f"task {task_id!r} is not open (round {self.round})")
            if task.client_id != client_id:
                raise RejectedUpdate("wrong_client", f"task {task_id!r} belongs to client {task.client_id}")
            info = self._info.get(task_id)
        schema = info.schema if info is not None else self.schema
        limits = Limits(max_total_bytes=self.cfg.transport.max_update_bytes)
        return self.codecs.update_decoder(schema, limits, spool=self.spool)  # type: ignore[return-value]

    def _accept(self, result: TaskResult) -> ClientUpdate:
        weight = 1.0
        with self._lock:
            if result.task_id not in self._open and result.task_id not in self._late:
                raise RejectedUpdate("duplicate" if result.task_id in self._done else "stale", f"task {result.task_id} already closed")
            info = self._info.get(result.task_id)
            tau = self.round - info.version if info is not None else 0
            if tau > self.cfg.sync.max_staleness:
                self._late.pop(result.task_id, None)
                self._open.pop(result.task_id, None)
                self._done.add(result.task_id)
                raise RejectedUpdate("too_stale", f"task {result.task_id} is {tau} steps stale (sync.max_staleness={self.cfg.sync.max_staleness})")
            if tau > 0:
                weight = self.policy.staleness_weight(tau)
        norm = result.norm if result.norm is not None else check_update(result.delta)  # NaN/Inf: "non_finite"
        check_norm(norm, self.cfg.transport.max_update_norm)
        if result.num_examples <= 0:
            raise RejectedUpdate("num_examples", "an update must report at least one example")
        with self._lock:
            self._open.pop(result.task_id, None)
            self._late.pop(result.task_id, None)
            self._info.pop(result.task_id, None)
            self._done.add(result.task_id)
        metrics = dict(result.metrics, staleness=float(tau))
        # a stale update counts less: its example weight is scaled by s(tau) (num_examples may become a float)
        num = result.num_examples * weight if weight != 1.0 else result.num_examples
        return ClientUpdate(result.client_id, result.delta, num, metrics)  # type: ignore[arg-type]

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

    def sample(self, round_num: int, eligible: list[int], size: int | None = None) -> list[int]:
        """Seeded, per-round client sample (depends only on seed, round, size and the eligible set)."""
        return sample_clients(self.cfg.seed, round_num, eligible, self.cfg.clients_per_round if size is None else size)

    def make_tasks(
        self, transport: CoordinatorTransport, round_num: int, clients: list[int], hp: dict[str, Any], tag: str = ""
    ) -> tuple[list[TrainTask], int]:
        """Tasks for ``clients`` starting from the current global, registered as open.

        One payload is encoded and published per distinct ``strategy.client_key`` (flexlora:
        per client rank); each task's update is validated against the schema of the state its
        client was sent, minus the tensors the hyperparameters leave out. Returns the tasks and
        the bytes of the payloads published.
        """
        if self._payloads_version != (self.round, round_num):
            self._payloads = {}
            self._payloads_version = (self.round, round_num)
        variants = self._payloads  # reused while the global is unchanged (async dispatches)
        published = 0
        tasks = []
        now = time.time()
        for c in clients:
            key = self.strategy.client_key(c)
            if key not in variants:
                state = self.strategy.client_state(self.global_state, c)
                state = AdapterState(state.tensors, {**self.global_state.meta, "round": round_num})
                payload = self._encode_global(state)
                if isinstance(payload, SpooledBlob):
                    digest, crc = payload.sha256, payload.crc32
                else:
                    digest, crc = hashlib.sha256(payload).digest(), zlib.crc32(payload)
                blob_id = f"r{round_num}-{digest.hex()[:16]}"
                transport.publish_blob(blob_id, payload)
                published += len(payload)
                variants[key] = (blob_id, len(payload), digest, state.schema(), crc)
            blob_id, size, digest, client_schema, crc = variants[key]
            schema = update_schema(client_schema, hp)
            task = TrainTask(
                task_id=f"r{round_num}{tag}-c{c}-{hashlib.sha256(f'{self.cfg.seed}/{round_num}{tag}/{c}/{self.run_dir}'.encode()).hexdigest()[:8]}",
                round=round_num,
                client_id=c,
                blob_id=blob_id,
                blob_size=size,
                blob_sha256=digest,
                blob_crc32=crc,
                hyperparams=hp,
            )
            tasks.append(task)
            with self._lock:
                self._open[task.task_id] = task
                self._info[task.task_id] = TaskInfo(task, schema, self.round, now)
        return tasks, published

    def _encode_global(self, state: AdapterState) -> Blob:
        """The payload of ``state``: bytes, or for an adapter of ``transport.spool_bytes`` and more a
        temp file written piece by piece (no serialized copy of a multi-GiB global in memory)."""
        if self.spool.applies(state.nbytes()):
            return SpooledBlob.write(self.codecs.iter_global(state), self.spool)
        return self.codecs.encode_global(state)

    def _expire(self, transport: CoordinatorTransport, task_ids: list[str], pinned: dict[int, str]) -> tuple[int, int]:
        """Handle open tasks past ``sync.task_timeout_s``: re-submit (sync) or give up. Returns (reassigned, lost)."""
        timeout = self.cfg.sync.task_timeout_s
        if timeout is None:
            return 0, 0
        now = time.time()
        again: list[TrainTask] = []
        lost: list[str] = []
        with self._lock:
            for tid in task_ids:
                info = self._info.get(tid)
                if tid not in self._open or info is None or now - info.submitted < timeout:
                    continue
                if self.policy.reassign_lost:
                    info.attempt += 1
                    info.submitted = now
                    info.task = replace(info.task, hyperparams={**info.task.hyperparams, "attempt": info.attempt})
                    self._open[tid] = info.task
                    again.append(info.task)
                else:
                    self._open.pop(tid)
                    self._info.pop(tid, None)
                    self._done.add(tid)
                    self._missed.add(tid)
                    lost.append(tid)
        if lost:
            transport.forget_tasks(lost)
        if again:
            log.warning("re-assigning %d task(s) without a reply after %.0fs", len(again), timeout)
            transport.submit(again, pinned)
        return len(again), len(lost)

    def run_round(self, transport: CoordinatorTransport) -> dict[str, Any] | None:
        """One round; returns its metrics row (None when stopped)."""
        t0 = time.time()
        round_num = self.round + 1
        eligible, pinned = self._wait_for_workers(transport)
        if self.stop_event.is_set():
            return None
        sampled = self.sample(round_num, eligible, self.policy.sample_size(self.cfg.clients_per_round, len(eligible)))
        chosen = self.policy.tasks_for(sampled)
        meta = {**self.global_state.meta, "round": round_num}
        hp = self.strategy.configure_train(round_num, self.global_state)
        up0, down0 = transport.bytes_moved()
        stats0 = transfer_stats(transport)
        tasks, _ = self.make_tasks(transport, round_num, chosen, hp)
        task_ids = [t.task_id for t in tasks]
        transport.submit(tasks, pinned)
        aggregator = self.strategy.begin_round(self.global_state)
        rejected: Counter[str] = Counter()
        losses: list[tuple[float, int]] = []
        compute_s = 0.0
        lockstep = 0  # updates a worker trained together with others (train.lockstep)
        ranks: dict[str, int] = {}
        stale: list[float] = []
        num_examples = 0
        reassigned = lost = 0
        min_updates = self.strategy.min_updates()
        while not self.policy.round_closed(aggregator.count, len(tasks), time.time() - t0, lost, min_updates):
            if self.stop_event.is_set():
                transport.cancel_pending()
                return None
            if self.policy.timed_out(time.time() - t0):
                transport.cancel_pending()
                raise RoundTimeout(
                    f"round {round_num}: {aggregator.count}/{len(tasks)} updates after {self.cfg.sync.round_timeout_s:.0f}s "
                    "(raise sync.round_timeout_s, set sync.task_timeout_s, or check the workers)"
                )
            again, gone = self._expire(transport, task_ids, pinned)
            reassigned, lost = reassigned + again, lost + gone
            event = transport.next_event(timeout=self.policy.wait_s(time.time() - t0))
            if event is None:
                continue
            if isinstance(event, Rejection):
                rejected[event.reason] += 1
                continue
            try:
                update = self._accept(event)
                aggregator.add(update)
            except RejectedUpdate as exc:
                log.warning("rejected update from %s: %s", event.worker_id, exc)
                rejected[exc.reason] += 1
                continue
            num_examples += event.num_examples
            if update.metrics.get("staleness"):
                stale.append(update.metrics["staleness"])
            if "lora_rank" in update.metrics:
                ranks[str(update.client_id)] = int(update.metrics["lora_rank"])
            if "train_loss" in update.metrics:
                losses.append((update.metrics["train_loss"], event.num_examples))
            compute_s += float(update.metrics.get("compute_s", 0.0))
            lockstep += update.metrics.get("lockstep_clients", 1.0) > 1
            self.metrics.progress(f"round {round_num}/{self.cfg.rounds}: {aggregator.count}/{len(tasks)} clients done")
        cancelled = set(transport.cancel_pending())
        with self._lock:
            if self.policy.late_updates == "fold":
                for tid, task in self._open.items():
                    if tid not in cancelled:
                        self._late[tid] = task
                    else:
                        self._info.pop(tid, None)
            else:
                for tid in self._open:
                    self._info.pop(tid, None)
                self._missed.update(self._open)
            self._done.update(t for t in self._open if t not in self._late)
            self._open = {}
            for tid in [t for t, task in self._late.items() if round_num - self._info[t].version > self.cfg.sync.max_staleness]:
                self._late.pop(tid)
                self._info.pop(tid, None)
                self._done.add(tid)
                self._missed.add(tid)
        if aggregator.count:
            self.global_state = self.strategy.finish_round(self.global_state, aggregator)
        self.global_state.meta = meta
        self.round = round_num
        up1, down1 = transport.bytes_moved()
        row: dict[str, Any] = {
            "round": round_num,
            "clients": aggregator.count,
            "sampled": sampled,
            "num_examples": num_examples,
            "train_loss": sum(loss * n for loss, n in losses) / max(sum(n for _, n in losses), 1) if losses else None,
            "bytes_up": up1 - up0,
            "bytes_down": down1 - down0,
            "rejected": sum(rejected.values()),
            "rejected_reasons": dict(rejected),
            "client_compute_s": compute_s,
        }
        row.update({k: v - stats0.get(k, 0) for k, v in transfer_stats(transport).items()})
        if self.cfg.train.lockstep:
            row["lockstep_updates"] = lockstep
        if self.cfg.sync.name != "sync" or reassigned:
            row.update({"sync": self.cfg.sync.name, "reassigned": reassigned, "lost": lost, "late_folded": len(stale)})
            if stale:
                row.update({"staleness_mean": sum(stale) / len(stale), "staleness_max": max(stale)})
        if ranks and any(self.strategy.client_key(c) is not None for c in chosen):
            row["client_ranks"] = ranks
        if round_num % self.cfg.train.eval_every == 0 or round_num == self.cfg.rounds:
            t_eval = time.time()
            row.update(self.gm.evaluate(self.global_state))
            row["eval_s"] = time.time() - t_eval
        extra = getattr(self.strategy, "last_metrics", None)
        if extra and aggregator.count:
            row.update(extra)
        self._save(round_num)
        row["wall_s"] = time.time() - t0
        row["elapsed_s"] = time.time() - self.started
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
            row["elapsed_s"] = time.time() - self.started
            self.metrics.append(row)
        if self.policy.asynchronous:
            from dpeft.coordinator.async_engine import run_async

            run_async(self, transport)
        while self.round < self.cfg.rounds and not self.stop_event.is_set():
            if self.run_round(transport) is None:
                break
        self.gm.export(self.global_state, self.run_dir / "adapter")
        return self.metrics.rows
