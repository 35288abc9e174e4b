"""The coordinator's secure-aggregation rounds (``privacy.secure_aggregation``; the protocol is
:mod:`dpeft.privacy.secagg`).

A round runs the four SecAgg+ steps as task kinds over the ordinary task protocol, each client's
tasks pinned to the worker that answered its first step (its secrets live in that process):

1. ``secagg-keys``: the sampled clients advertise public keys (no reply in time: left out);
2. ``secagg-share``: each sends its neighbours' sealed shares, routed through here (no reply: left out);
3. ``secagg-mask``: each trains on the global adapter (the ordinary training payload and
   hyperparameters) and sends its masked, authenticated update; the round's sync policy decides
   when this step closes (``deadline``: at the quorum or the deadline); a client that shared keys
   but misses it is a dropout after masking;
4. ``secagg-unmask``: the survivors release the shares that remove the dropouts' pairwise masks
   and the survivors' self masks.

The unmasked sum (weighted update, total weight, weighted train loss) is turned into the
strategy's weighted mean -- one aggregate with the round's total weight -- or, with central
differential privacy, into the DP mechanism's noisy mean (:func:`release`, the one call site), and
the round is recorded as usual. When the sum cannot be
recovered (more dropouts after masking than the shares tolerate) nothing is released and the run
stops with :class:`SecureAggregationFailed`; its checkpoint is the previous round's, so a rerun
resumes there. Key material is never logged, checkpointed or written to the run directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dpeft.codec.tensors import Limits, StateDecoder
from dpeft.errors import DpeftError, RejectedUpdate
from dpeft.privacy.secagg import crypto, messages
from dpeft.privacy.secagg.client import SecAggError
from dpeft.privacy.secagg.context import RoundContext, SecAggSettings
from dpeft.privacy.secagg.encoding import decode, from_wire, vector_length
from dpeft.privacy.secagg.server import SecAggFailure, ServerRound
from dpeft.rounds.tally import RoundTally
from dpeft.state import AdapterState
from dpeft.strategies import ClientUpdate
from dpeft.strategies.hyperparams import update_schema
from dpeft.transport.base import CoordinatorTransport, Rejection, TaskResult, TrainTask
from dpeft_coordinator.errors import RoundTimeout

if TYPE_CHECKING:
    from dpeft_coordinator.engine import RoundEngine

log = logging.getLogger("dpeft.coordinator")


def _take(events: dict[int, Any], what: str, add: Callable[[int, Any], None], tally: RoundTally | None) -> None:
    """``add(client, reply)`` for each reply of one protocol step; a reply the protocol refuses is
    logged (and, with ``tally``, counted as a rejected update) and the client goes on as a dropout."""
    for client, ev in events.items():
        try:
            add(client, ev)
        except (SecAggError, ValueError) as exc:
            log.warning("secure aggregation: %s of client %d refused: %s", what, client, exc)
            if tally is not None:
                tally.reject("secagg")


class SecureAggregationFailed(DpeftError):
    """A secure-aggregation round whose sum cannot be recovered; nothing of it was released."""


def release(
    engine: RoundEngine, summed: AdapterState, weight: int, unclipped: int, round_num: int
) -> tuple[AdapterState, int, dict[str, Any]]:
    """The single call site of central differential privacy under secure aggregation: (the
    round's aggregate, its weight, the row's privacy fields).

    Without central DP the aggregate is the weighted mean ``summed / weight``. With
    ``privacy.mode: central`` the clients clipped their updates and sent them with weight 1, so
    ``summed`` is the sum of the clipped updates and ``unclipped`` how many were within the bound;
    the coordinator's DP mechanism (``engine.privacy``, :mod:`dpeft.privacy.central`) adds its
    Gaussian noise to that unmasked sum and divides by its fixed denominator, and charges the
    round to the accountant."""
    dp = getattr(engine, "privacy", None)
    if engine.cfg.privacy.mode == "central":
        if dp is None or not hasattr(dp, "release"):
            raise DpeftError("privacy.mode=central: this build has no central DP mechanism for secure aggregation")
        noisy = dp.release(summed, float(unclipped), round_num)
        return noisy, 1, dict(dp.close_round())
    mean = AdapterState({k: (v.double() / weight).to(v.dtype) for k, v in summed.items()})
    return mean, weight, {}


class SecureRounds:
    """Secure-aggregation rounds of one run: task bookkeeping, decoders, the round driver."""

    def __init__(self, engine: RoundEngine) -> None:
        self.engine = engine
        self.cfg = engine.cfg
        self.settings = SecAggSettings.from_config(engine.cfg)
        self._open: dict[str, tuple[str, int]] = {}  # task id -> (kind, client) of the step being collected
        self._schemas: dict[str, Any] = {}  # task id -> the exact reply schema
        self._closed: set[str] = set()
        self.last: dict[str, Any] = {}  # the last round's protocol figures (benchmarks, tests)

    # -- transport hooks ------------------------------------------------------------
    def owns(self, task_id: str) -> bool:
        return task_id in self._open or task_id in self._closed

    def decoder_for(self, task_id: str, client_id: int) -> StateDecoder | None:
        """The decoder of a protocol reply (exact tensor names, shapes and dtypes); None for other tasks."""
        if task_id in self._closed:
            raise RejectedUpdate("late", f"secure-aggregation task {task_id!r} is closed")
        entry = self._open.get(task_id)
        if entry is None:
            return None
        if entry[1] != client_id:
            raise RejectedUpdate("wrong_client", f"task {task_id!r} belongs to client {entry[1]}")
        return StateDecoder(self._schemas[task_id], Limits(max_total_bytes=self.cfg.transport.max_update_bytes))

    # -- one step -------------------------------------------------------------------
    def eligible(self, transport: CoordinatorTransport) -> tuple[list[int], dict[int, str]]:
        """(clients a worker that runs the protocol's task kinds can serve, client -> the worker holding its data)."""
        workers = {k: v for k, v in transport.workers().items() if v["alive"] and not v["left"]}
        pinned = {c: wid for wid, w in workers.items() for c in w["client_ids"]}
        able = {wid for wid, w in workers.items() if set(messages.TASK_KINDS) <= set(w.get("task_kinds", ()))}
        if any(not workers[w]["own_data"] for w in able):
            return [c for c in range(self.cfg.clients) if c not in pinned or pinned[c] in able], pinned
        return sorted(c for c, wid in pinned.items() if wid in able), pinned

    def _step(
        self,
        transport: CoordinatorTransport,
        kind: str,
        ctx: RoundContext,
        requests: dict[int, tuple[dict[str, Any], dict[str, Any]]],
        pinned: dict[int, str],
        closed: Any,
        blob: tuple[str, int, bytes, int],
    ) -> dict[int, TaskResult]:
        """Submit one step's tasks (client -> (hyperparameters, reply schema spec)) and collect
        the replies until ``closed(arrived, elapsed_s)`` or every client answered."""
        blob_id, size, digest, crc = blob
        tag = ctx.digest().hex()[:12]
        tasks = []
        for c, (hp, spec) in requests.items():
            task = TrainTask(
                f"r{ctx.round}s-{kind[7:]}-c{c}-{tag}", ctx.round, c, blob_id, size, digest, hp, blob_crc32=crc, kind=kind
            )
            self._open[task.task_id] = (kind, c)
            self._schemas[task.task_id] = messages.reply_schema(kind, **spec)
            tasks.append(task)
        transport.submit(tasks, pinned)
        got: dict[int, TaskResult] = {}
        t0 = time.time()
        engine = self.engine
        while len(got) < len(tasks) and not engine.stop_event.is_set():
            if closed(len(got), time.time() - t0):
                break
            event = transport.next_event(timeout=0.2)
            if event is None:
                continue
            entry = self._open.pop(event.task_id, None)
            if entry is None:
                if engine.fed_eval is None or not engine.fed_eval.owns(event.task_id):
                    log.info("reply to task %s outside its secure-aggregation step dropped", event.task_id)
                continue
            self._closed.add(event.task_id)
            if isinstance(event, Rejection):
                log.warning("secure aggregation: %s reply of client %d refused: %s", kind, entry[1], event.reason)
                continue
            assert isinstance(event, TaskResult)
            got[entry[1]] = event
            engine.recorder.progress(f"round {ctx.round}: secure aggregation {kind[7:]} {len(got)}/{len(tasks)} clients")
        missing = [t.task_id for t in tasks if t.task_id in self._open]
        if missing:
            transport.forget_tasks(missing)
        for tid in missing:
            self._open.pop(tid, None)
            self._closed.add(tid)
        for t in tasks:
            self._schemas.pop(t.task_id, None)
        return got

    def _wait(self) -> float:
        """How long a key, share or unmask step waits for replies."""
        s = self.cfg.sync
        if s.task_timeout_s is not None:
            return float(min(s.task_timeout_s, s.round_timeout_s))
        return float(s.deadline_s if s.name == "deadline" else s.round_timeout_s)

    # -- the round --------------------------------------------------------------------
    def run_round(self, transport: CoordinatorTransport) -> dict[str, Any] | None:
        engine, cfg = self.engine, self.cfg
        tally = RoundTally()
        t0 = tally.t0
        round_num = engine.round + 1
        engine.wait_for_workers(transport)
        eligible, pinned = self.eligible(transport)
        if engine.stop_event.is_set():
            return None
        if len(eligible) < 3:
            raise RoundTimeout(
                f"round {round_num}: only {len(eligible)} clients on workers that run secure aggregation (at least 3 are needed)"
            )
        sampled = engine.sample(round_num, eligible, engine.policy.sample_size(cfg.clients_per_round, len(eligible)))
        hp = engine.strategy.configure_train(round_num, engine.global_state)
        dp = getattr(engine, "privacy", None)
        if dp is not None and hasattr(dp, "hyperparams"):  # central DP: the clients clip to the round's bound
            hp = {**hp, **dp.hyperparams()}
        up0, down0 = transport.bytes_moved()
        client_state = engine.strategy.client_state(engine.global_state, sampled[0])
        schema = update_schema(client_state.schema(), hp)
        server_key = crypto.new_private_key()
        run_id = f"{getattr(transport, 'run_id', '')}/{engine.run_dir}/{cfg.seed}"
        ctx = RoundContext.create(self.settings, run_id, round_num, os.urandom(16), sampled, crypto.public_bytes(server_key))
        srv = ServerRound(ctx, server_key, vector_length(schema))
        empty = engine.publish_state(transport, AdapterState(), f"s{round_num}")
        wait = self._wait()
        timing: dict[str, float] = {}

        def quick(arrived: int, elapsed: float) -> bool:
            return elapsed >= wait

        # 1. advertise keys
        t = time.time()
        req = {c: ({"secagg": messages.request(ctx)}, {}) for c in ctx.clients}
        owners = dict(pinned)

        def add_keys(c: int, ev: Any, srv: ServerRound = srv) -> None:
            srv.add_keys(c, messages.raw(ev.delta["c_pk"]), messages.raw(ev.delta["s_pk"]))
            owners[c] = ev.worker_id  # the client's secrets live in that worker: pin its next steps there

        _take(self._step(transport, messages.KEYS, ctx, req, pinned, quick, empty), "keys", add_keys, tally)
        timing["secagg_keys_s"] = time.time() - t
        # 2. share keys
        t = time.time()
        peers = srv.peers_u1()
        req = {
            u: ({"secagg": messages.request(ctx, **messages.share_request(p))}, {"peers": sorted(p)}) for u, p in peers.items()
        }
        events = self._step(transport, messages.SHARE, ctx, req, owners, quick, empty)
        _take(events, "shares", lambda u, ev, srv=srv: srv.add_shares(u, messages.read_shares(ev.delta)), tally)
        timing["secagg_share_s"] = time.time() - t
        # 3. train and send masked inputs
        t = time.time()
        masks = srv.mask_requests()
        if len(masks) < 3:
            raise SecureAggregationFailed(
                f"round {round_num}: only {len(masks)} clients completed the key exchange (at least 3 are needed); nothing was aggregated"
            )
        task_blob = engine.publish_state(
            transport, AdapterState(client_state.tensors, {**engine.global_state.meta, "round": round_num}), f"r{round_num}"
        )
        spec = {"length": srv.length, "bits": ctx.bits}
        req = {u: ({**hp, "secagg": messages.request(ctx, **messages.mask_request(*m))}, spec) for u, m in masks.items()}
        policy, min_updates = engine.policy, engine.strategy.min_updates()

        def training_closed(arrived: int, elapsed: float) -> bool:
            since = time.time() - t0
            if cfg.sync.task_timeout_s is not None and elapsed >= cfg.sync.task_timeout_s:
                return True
            return since >= cfg.sync.round_timeout_s or policy.round_closed(arrived, len(masks), since, 0, min_updates)

        def add_masked(u: int, ev: Any, srv: ServerRound = srv) -> None:
            srv.add_masked(u, from_wire(ev.delta["masked"], ctx.bits), messages.raw(ev.delta["tag"]))
            tally.compute_s += float(ev.metrics.get("compute_s", 0.0))

        _take(
            self._step(transport, messages.MASK, ctx, req, owners, training_closed, task_blob), "masked input", add_masked, tally
        )
        timing["secagg_mask_s"] = time.time() - t
        # 4. unmask
        t = time.time()
        unmask = srv.unmask_requests()
        req = {
            u: ({"secagg": messages.request(ctx, **messages.unmask_request(d, s))}, {"dropped": d, "survived": s})
            for u, (d, s) in unmask.items()
        }

        def add_unmask(u: int, ev: Any, srv: ServerRound = srv) -> None:
            srv.add_unmask(u, {k: messages.raw(v) for k, v in ev.delta.items() if k != "tag"}, messages.raw(ev.delta["tag"]))

        _take(self._step(transport, messages.UNMASK, ctx, req, owners, quick, empty), "unmasking reply", add_unmask, None)
        if engine.stop_event.is_set():
            return None
        try:
            total = srv.result()
        except SecAggFailure as exc:
            raise SecureAggregationFailed(
                f"{exc}: {len(srv.sealed) - len(srv.masked)} client(s) dropped after masking, more than this round's shares tolerate "
                f"({ctx.tolerated} with {ctx.degree} neighbours and threshold {ctx.threshold}); nothing of the round was released. "
                "The run stops at the previous round's checkpoint; rerun to resume (lower privacy.secagg_threshold or set sync.task_timeout_s / sync.deadline_s higher)"
            ) from None
        timing["secagg_unmask_s"] = time.time() - t
        t = time.time()
        summed, weight, loss_sum, unclipped = decode(total, schema, ctx.bits, ctx.scale, ctx.clip)
        survivors = len(srv.masked)
        if weight <= 0:
            raise SecureAggregationFailed(
                f"round {round_num}: the surviving clients' total weight is {weight}; nothing was aggregated"
            )
        aggregate, agg_weight, privacy_fields = release(engine, summed, weight, unclipped, round_num)
        aggregator = engine.strategy.begin_round(engine.global_state)  # the strategy's own weighted mean, fed one aggregate
        local_dp = dp is not None and cfg.privacy.mode != "central"
        if local_dp:  # local DP: the clients noised their own training; the ledger sees the round's aggregate
            aggregator = dp.wrap(aggregator, round_num)
        aggregator.add(ClientUpdate(-1, aggregate, agg_weight, {"train_loss": loss_sum / weight}))
        if local_dp:
            privacy_fields = dict(dp.close_round())
        engine.advance(aggregator, round_num)
        timing["secagg_coordinator_s"] = time.time() - t
        tally.num_examples = weight
        tally.losses.append((loss_sum / weight, weight))
        up1, down1 = transport.bytes_moved()
        row = tally.row(round_num, survivors, sampled, up1 - up0, down1 - down0)
        row["client_compute_s"] = tally.compute_s
        row.update(
            {
                "secagg_clients": len(srv.masked),
                "secagg_dropped": len(srv.sealed) - len(srv.masked),
                "secagg_left_out": len(ctx.clients) - len(srv.sealed),
                "secagg_neighbours": ctx.degree,
                "secagg_threshold": ctx.threshold,
                "secagg_step": 1.0 / ctx.scale,
                **{k: round(v, 4) for k, v in timing.items()},
            }
        )
        if cfg.sync.name != "sync":
            row["sync"] = cfg.sync.name
        row.update(privacy_fields)
        self.last = {
            "ctx": ctx,
            "survivors": sorted(srv.masked),
            "dropped": sorted(set(srv.sealed) - set(srv.masked)),
            "digest": hashlib.sha256(total.tobytes()).hexdigest(),
        }
        del srv, server_key, total
        engine.record(row, survivors, t0, transport)
        return row


__all__ = ["SecureRounds", "SecureAggregationFailed", "release"]
