"""The coordinator's round driver: sample, publish, collect, validate, aggregate, evaluate, checkpoint, export.

A thin driver over the round core (:mod:`dpeft.rounds`): the task ledger checks and tracks
tasks, the tally and strategy step build each round's row, the recorder keeps the run
directory (metrics, checkpoints, resume, export). It talks only to a
:class:`~dpeft.transport.base.CoordinatorTransport`; it never imports grpc or ray, so every
transport (gRPC, Ray, in-process) runs the same rounds. The ``sync`` and ``deadline``
policies run here; ``async`` runs in :mod:`dpeft_coordinator.async_engine` over the same
public methods.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpeft.codec.spool import SpooledBlob, SpoolPolicy
from dpeft.codec.tensors import Limits, StateDecoder
from dpeft.codec.updates.session import RunCodecs
from dpeft.config import RunConfig, dump_config
from dpeft.errors import RejectedUpdate
from dpeft.privacy import make_privacy
from dpeft.rounds.fedeval import evaluation_due
from dpeft.rounds.global_model import GlobalModel
from dpeft.rounds.ledger import TaskLedger
from dpeft.rounds.recorder import RoundRecorder
from dpeft.rounds.sampling import sample_clients
from dpeft.rounds.tally import RoundTally, client_ranks, evaluate_into, finish_step, strategy_metrics
from dpeft.state import AdapterState
from dpeft.strategies import ClientUpdate, make_strategy
from dpeft.strategies.hyperparams import update_schema
from dpeft.sync import make_policy
from dpeft.sync.base import check_coordinated
from dpeft.transport.base import Blob, CoordinatorTransport, Event, Rejection, TaskResult, TrainTask
from dpeft_coordinator.async_engine import run_async
from dpeft_coordinator.errors import RoundTimeout
from dpeft_coordinator.evaluation import FederatedEvaluator
from dpeft_coordinator.overlap import RoundCloser, closing_job, overlaps
from dpeft_coordinator.secagg import SecureRounds

log = logging.getLogger("dpeft.coordinator")

__all__ = ["RoundEngine", "RoundTimeout", "transfer_stats"]


def transfer_stats(transport: CoordinatorTransport) -> dict[str, int]:
    """Cumulative transfer counters of transports that keep them (gRPC: uploads resumed after a
    drop, corrupted chunks re-sent); a round's metrics row reports their increase."""
    stats = getattr(transport, "stats", None)
    if stats is None:
        return {}
    return {k: int(v) for k, v in stats().items() if k in ("uploads_resumed", "corrupt_chunks")}


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
        self.ledger = TaskLedger(cfg.sync.max_staleness, self.policy.staleness_weight)
        self._payloads: dict[Any, tuple[str, int, bytes, Any, int]] = {}
        self._payloads_version: tuple[int, int] = (-1, -1)
        self.stop_event = threading.Event()
        #: eval.federated: sampled clients evaluate each evaluated round's global (:mod:`dpeft_coordinator.evaluation`)
        self.fed_eval = FederatedEvaluator(self) if cfg.eval.federated else None
        #: privacy.secure_aggregation: rounds run the SecAgg+ steps (:mod:`dpeft_coordinator.secagg`)
        self.secagg = SecureRounds(self) if cfg.privacy.secure_aggregation else None
        #: privacy.mode central/local: clipping, noise and the accountant (:mod:`dpeft.privacy`)
        self.privacy = make_privacy(cfg)
        #: why the run stopped before its planned rounds (the privacy budget), for the summary
        self.stop_note: str | None = None
        #: the coordinator's evaluation of a global (the launcher may run it on a core budget)
        self.evaluate: Callable[[AdapterState], dict[str, Any]] = global_model.evaluate
        #: eval.overlap: rounds closed (evaluated, checkpointed, recorded) in the background, during :meth:`run`
        self.closer: RoundCloser | None = None
        self.recorder = RoundRecorder(
            run_dir, cfg.rounds, cfg.seed, export=lambda state: global_model.export(state, run_dir / "adapter"), config_text=dump_config(cfg), cfg=cfg
        )
        assert self.recorder.metrics is not None  # a run directory always has its metrics log
        self.metrics = self.recorder.metrics
        found = self.recorder.resume(self.schema) if resume else None
        if found is not None:
            self.global_state = found.global_state
            self.strategy.load_state_dict(found.strategy_state)
            self.round = found.round
            if self.privacy is not None and isinstance(found.info.get("privacy"), dict):
                self.privacy.load_state_dict(found.info["privacy"])  # epsilon continues from the checkpoint
        else:  # a run that starts over forgets what an earlier run left in run_dir
            self.codecs.clear_residuals()  # error feedback begins empty
            self.recorder.start_over()
            if self.cfg.train.personal_dir is None:  # clients' personal tensors start over too
                shutil.rmtree(self.run_dir / "personal", ignore_errors=True)

    @property
    def resumed_from(self) -> int | None:
        """The checkpointed round this run resumed from (None: it started at round 0)."""
        return self.recorder.resumed_from

    # -- transport hooks ------------------------------------------------------
    def decoder_for(self, task_id: str, client_id: int) -> StateDecoder:
        """Validating decoder for an upload; rejects unknown, stale and duplicate tasks up front."""
        if self.secagg is not None:
            step = self.secagg.decoder_for(task_id, client_id)  # a secure-aggregation reply: its exact schema
            if step is not None:
                return step
        if self.fed_eval is not None:
            evaluation = self.fed_eval.decoder_for(task_id, client_id)  # an evaluation reply: no tensors
            if evaluation is not None:
                return evaluation
        schema = self.ledger.schema_for(task_id, client_id, self.round)
        limits = Limits(max_total_bytes=self.cfg.transport.max_update_bytes)
        return self.codecs.update_decoder(schema if schema is not None else self.schema, limits, spool=self.spool)  # type: ignore[return-value]

    def admit(self, result: TaskResult) -> ClientUpdate:
        """The update of ``result`` ready to aggregate, or :class:`~dpeft.errors.RejectedUpdate`."""
        return self.ledger.admit(result, self.round, self.cfg.transport.max_update_norm)

    def next_event(self, transport: CoordinatorTransport, timeout: float) -> Event | None:
        """The next training event: those that arrived during a federated evaluation first; a late
        reply to an evaluation task is dropped (it is no training rejection)."""
        fed = self.fed_eval
        if fed is None:
            return transport.next_event(timeout=timeout)
        if fed.held:
            return fed.held.popleft()
        event = transport.next_event(timeout=timeout)
        if event is not None and fed.owns(event.task_id):
            log.info("late reply to evaluation task %s dropped", event.task_id)
            return None
        return event

    def fold(self, event: TaskResult | Rejection, aggregator: Any, tally: RoundTally) -> ClientUpdate | None:
        """Admit one transport event into ``aggregator`` and ``tally``; a rejection (the transport's or the
        ledger's) is counted in ``tally`` and gives None."""
        if isinstance(event, Rejection):
            tally.reject(event.reason)
            return None
        try:
            update = self.admit(event)
            aggregator.add(update)
        except RejectedUpdate as exc:
            log.log(logging.INFO if exc.routine else logging.WARNING, "rejected update from %s: %s", event.worker_id, exc)
            tally.reject(exc.reason)
            return None
        tally.add(update, event.num_examples)
        return update

    # -- workers and tasks ------------------------------------------------------
    def eligible(self, transport: CoordinatorTransport) -> tuple[list[int], dict[int, str]]:
        """(clients that can train now, client id -> the worker that owns its data)."""
        workers = {k: v for k, v in transport.workers().items() if v["alive"] and not v["left"]}
        pinned = {c: wid for wid, w in workers.items() for c in w["client_ids"]}
        if any(not w["own_data"] for w in workers.values()):
            return list(range(self.cfg.clients)), pinned
        return sorted(pinned), pinned

    def wait_for_workers(self, transport: CoordinatorTransport) -> tuple[list[int], dict[int, str]]:
        """:meth:`eligible` once ``clients_per_round`` clients can train (empty when stopped)."""
        start, need = time.time(), self.cfg.sync.min_workers
        while not self.stop_event.is_set():
            eligible, pinned = self.eligible(transport)
            joined = sum(1 for w in transport.workers().values() if w["alive"] and not w["left"])
            if len(eligible) >= self.cfg.clients_per_round and joined >= need:
                return eligible, pinned
            if time.time() - start > self.cfg.sync.round_timeout_s:
                raise RoundTimeout(
                    f"only {len(eligible)} trainable clients and {joined}/{need} workers after {self.cfg.sync.round_timeout_s:.0f}s"
                )
            self.recorder.progress(
                f"waiting for workers: {joined}/{need} workers, {len(eligible)}/{self.cfg.clients_per_round} clients available"
            )
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
                blob_id, size, digest, crc = self.publish_state(transport, state, f"r{round_num}")
                published += size
                variants[key] = (blob_id, size, digest, state.schema(), crc)
            blob_id, size, digest, client_schema, crc = variants[key]
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
            self.ledger.register(task, update_schema(client_schema, hp), self.round, now)
        return tasks, published

    def publish_state(self, transport: CoordinatorTransport, state: AdapterState, prefix: str) -> tuple[str, int, bytes, int]:
        """Encode ``state`` with the down codec and publish it: (blob id, size, sha256, crc32).

        The blob id is ``prefix`` plus the payload's digest, so equal payloads share one id."""
        payload = self._encode_global(state)
        if isinstance(payload, SpooledBlob):
            digest, crc = payload.sha256, payload.crc32
        else:
            digest, crc = hashlib.sha256(payload).digest(), zlib.crc32(payload)
        blob_id = f"{prefix}-{digest.hex()[:16]}"
        transport.publish_blob(blob_id, payload)
        return blob_id, len(payload), digest, crc

    def _encode_global(self, state: AdapterState) -> Blob:
        """The payload of ``state``: bytes, or for an adapter of ``transport.spool_bytes`` and more a
        temp file written piece by piece (no serialized copy of a multi-GiB global in memory)."""
        if self.spool.applies(state.nbytes()):
            return SpooledBlob.write(self.codecs.iter_global(state), self.spool)
        return self.codecs.encode_global(state)

    def expire(self, transport: CoordinatorTransport, task_ids: list[str], pinned: dict[int, str]) -> tuple[int, int]:
        """Handle open tasks past ``sync.task_timeout_s``: re-submit (sync) or give up. Returns (reassigned, lost)."""
        timeout = self.cfg.sync.task_timeout_s
        if timeout is None:
            return 0, 0
        again, lost = self.ledger.expire(task_ids, timeout, self.policy.reassign_lost, time.time())
        if lost:
            transport.forget_tasks(lost)
        if again:
            log.warning("re-assigning %d task(s) without a reply after %.0fs", len(again), timeout)
            transport.submit(again, pinned)
        return len(again), len(lost)

    # -- closing a step -----------------------------------------------------------
    def advance(self, aggregator: Any, round_num: int) -> None:
        """The strategy's server step: the global becomes round ``round_num``'s."""
        self.global_state = finish_step(self.strategy, self.global_state, aggregator, round_num)
        self.round = round_num

    def record(self, row: dict[str, Any], count: int, t0: float, transport: CoordinatorTransport | None = None) -> None:
        """Finish ``row`` (evaluation when due: the coordinator's and, with ``eval.federated`` and a
        ``transport``, the clients'; strategy metrics); the recorder checkpoints it, exports, appends it."""
        round_num = row["round"]
        if self.closer is not None and not self.policy.asynchronous:
            row.update(strategy_metrics(self.strategy, count))
            self.closer.submit(closing_job(self, row, t0))
            return
        evaluate_into(row, self.evaluate, self.global_state, round_num, self.cfg.train.eval_every, self.cfg.rounds)
        if self.fed_eval is not None and transport is not None and evaluation_due(round_num, self.cfg.train.eval_every, self.cfg.rounds):
            row.update(self.fed_eval.run(transport, round_num, self.global_state))
        row.update(strategy_metrics(self.strategy, count))
        extra = {"privacy": self.privacy.state_dict()} if self.privacy is not None else None
        self.recorder.close(row, self.global_state, self.strategy.state_dict(), t0, extra=extra)

    # -- rounds -----------------------------------------------------------------
    def run_round(self, transport: CoordinatorTransport) -> dict[str, Any] | None:
        """One round; returns its metrics row (None when stopped)."""
        if self.secagg is not None:
            return self.secagg.run_round(transport)
        tally = RoundTally()
        t0 = tally.t0
        round_num = self.round + 1
        eligible, pinned = self.wait_for_workers(transport)
        if self.stop_event.is_set():
            return None
        sampled = self.sample(round_num, eligible, self.policy.sample_size(self.cfg.clients_per_round, len(eligible)))
        chosen = self.policy.tasks_for(sampled)
        hp = self.strategy.configure_train(round_num, self.global_state)
        if self.privacy is not None:
            hp = {**hp, **self.privacy.hyperparams()}
        up0, down0 = transport.bytes_moved()
        stats0 = transfer_stats(transport)
        tasks, _ = self.make_tasks(transport, round_num, chosen, hp)
        task_ids = [t.task_id for t in tasks]
        transport.submit(tasks, pinned)
        aggregator = self.strategy.begin_round(self.global_state)
        if self.privacy is not None:
            aggregator = self.privacy.wrap(aggregator, round_num)
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
            again, gone = self.expire(transport, task_ids, pinned)
            reassigned, lost = reassigned + again, lost + gone
            event = self.next_event(transport, timeout=self.policy.wait_s(time.time() - t0))
            if event is None:
                continue
            if self.fold(event, aggregator, tally) is None:
                continue
            self.recorder.progress(f"round {round_num}/{self.cfg.rounds}: {aggregator.count}/{len(tasks)} clients done")
        cancelled = set(transport.cancel_pending())
        self.ledger.close_round(round_num, self.policy.late_updates == "fold", cancelled)
        self.advance(aggregator, round_num)
        up1, down1 = transport.bytes_moved()
        row = tally.row(round_num, aggregator.count, sampled, up1 - up0, down1 - down0)
        row["client_compute_s"] = tally.compute_s
        row.update({k: v - stats0.get(k, 0) for k, v in transfer_stats(transport).items()})
        if self.cfg.train.lockstep:
            row["lockstep_updates"] = tally.lockstep
        stale = [s for s in tally.staleness if s]
        if self.cfg.sync.name != "sync" or reassigned:
            row.update({"sync": self.cfg.sync.name, "reassigned": reassigned, "lost": lost, "late_folded": len(stale)})
            if stale:
                row.update({"staleness_mean": sum(stale) / len(stale), "staleness_max": max(stale)})
        row.update(client_ranks(self.strategy, tally.ranks, chosen))
        if self.privacy is not None:
            row.update(self.privacy.close_round())
        self.record(row, aggregator.count, t0, transport)
        return row

    def run(self, transport: CoordinatorTransport) -> list[dict[str, Any]]:
        """All remaining rounds (from a resumed checkpoint if any)."""
        self.closer = RoundCloser() if overlaps(self.cfg) else None
        if self.recorder.needs_round0():  # overlapped: round 1 trains while the untrained global is evaluated
            initial = self.global_state.clone() if self.closer is not None else self.global_state
            privacy0 = self.privacy.fields() if self.privacy is not None else {}
            job = lambda: self.recorder.write({**self.recorder.round0_row(self.evaluate, initial), **privacy0})  # noqa: E731
            self.closer.submit(job) if self.closer is not None else job()
        try:
            if self.policy.asynchronous:
                run_async(self, transport)
            while self.round < self.cfg.rounds and not self.stop_event.is_set():
                self.stop_note = self.privacy.stop_reason(self.round + 1) if self.privacy is not None else None
                if self.stop_note is not None:  # the last accepted global is checkpointed; exported below
                    log.warning("%s", self.stop_note)
                    self.metrics.stop_note = self.stop_note
                    break
                if self.run_round(transport) is None:
                    break
            if self.closer is not None:  # the last evaluation, checkpoint and line
                self.closer.drain()
        finally:
            if self.closer is not None:
                self.closer.close()
                self.closer = None
        self.recorder.export(self.global_state)
        return self.recorder.rows
