"""Secure-aggregation tasks on a worker (the client side of :mod:`dpeft.privacy.secagg`).

The worker keeps each of its clients' :class:`~dpeft.privacy.secagg.client.ClientRound` in
memory from the ``secagg-keys`` task to the ``secagg-unmask`` task of one round (the coordinator
pins those tasks to this worker); a newer round's key task drops whatever an older round left.
A ``secagg-mask`` task trains exactly like a training task, then encodes the weighted update
(:mod:`dpeft.privacy.secagg.encoding`), masks it and answers the masked vector and its tag
instead of the update; its metrics carry timings only (the train loss travels masked). A request
the client cannot honour (inconsistent, replayed, for a round it holds no secrets of) gets no
reply, and the coordinator treats the client as gone. No secret is logged or written anywhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dpeft.codec import decode_state, encode_state
from dpeft.privacy.secagg import messages
from dpeft.privacy.secagg.client import ClientRound, SecAggError
from dpeft.privacy.secagg.encoding import encode, to_wire
from dpeft.transport.base import TrainTask

if TYPE_CHECKING:
    from dpeft_workers.runtime import WorkerRuntime

log = logging.getLogger("dpeft.worker")

#: the metric of a client that clipped its own update for central DP: 1 if it was within the bound
UNCLIPPED_KEY = "dp_unclipped"

Result = tuple[bytes, int, dict[str, float]]


class ClientSecrets:
    """The in-memory protocol state of the clients a worker serves (one round at a time)."""

    def __init__(self) -> None:
        self.rounds: dict[int, ClientRound] = {}  # client id -> its round

    def start(self, task: TrainTask) -> ClientRound:
        ctx, _ = messages.parse_request(task.hyperparams)
        if ctx.round != task.round:
            raise SecAggError("the context is for another round")
        stale = [c for c, r in self.rounds.items() if r.ctx.round < ctx.round]
        for c in stale:  # one round only: an older round's secrets go
            self.rounds.pop(c).forget()
        if task.client_id in self.rounds and self.rounds[task.client_id].ctx == ctx:
            raise SecAggError("keys were already advertised for this round")
        state = self.rounds[task.client_id] = ClientRound(ctx, task.client_id)
        return state

    def get(self, task: TrainTask) -> tuple[ClientRound, dict[str, Any]]:
        ctx, body = messages.parse_request(task.hyperparams)
        state = self.rounds.get(task.client_id)
        if state is None or state.ctx != ctx:
            raise SecAggError("no secrets of this round (a task of another round, a replay, or a restarted worker)")
        return state, body

    def finish(self, client_id: int) -> None:
        state = self.rounds.pop(client_id, None)
        if state is not None:
            state.forget()


def secrets_of(runtime: WorkerRuntime) -> ClientSecrets:
    found = getattr(runtime, "_secagg", None)
    if found is None:
        found = ClientSecrets()
        runtime._secagg = found  # type: ignore[attr-defined]
    return found


def run_secagg_tasks(
    runtime: WorkerRuntime, items: list[tuple[TrainTask, Any]], should_stop: Callable[[], bool]
) -> list[Result | None]:
    """Results of secure-aggregation tasks in order; None: the task gets no reply."""
    store = secrets_of(runtime)
    out: list[Result | None] = [None] * len(items)
    train: list[int] = []
    for i, (task, _) in enumerate(items):
        try:
            if task.kind == messages.KEYS:
                c_pk, s_pk = store.start(task).advertise()
                out[i] = (encode_state(messages.reply({"c_pk": c_pk, "s_pk": s_pk})), 1, {})
            elif task.kind == messages.SHARE:
                state, body = store.get(task)
                sealed = state.share_keys(messages.read_share_request(body))
                out[i] = (encode_state(messages.reply({f"to.{v}": s for v, s in sealed.items()})), 1, {})
            elif task.kind == messages.MASK:
                store.get(task)
                train.append(i)
            elif task.kind == messages.UNMASK:
                state, body = store.get(task)
                shares, tag = state.unmask(*messages.read_unmask_request(body))
                store.finish(task.client_id)
                out[i] = (encode_state(messages.reply({**shares, "tag": tag})), 1, {})
        except (SecAggError, ValueError, KeyError) as exc:
            log.warning("secure aggregation: task %s refused (no reply): %s", task.task_id, exc)
            if task.kind != messages.KEYS:
                store.finish(task.client_id)
    if train:
        trained = runtime.train_tasks([items[i] for i in train], should_stop=should_stop)
        for i, (update, n, metrics) in zip(train, trained, strict=True):
            out[i] = _masked(store, items[i][0], update, n, metrics, runtime.cfg.privacy.mode == "central")
    return out


def _masked(
    store: ClientSecrets, task: TrainTask, update: bytes, n: int, metrics: dict[str, float], unit_weight: bool
) -> Result | None:
    t0 = time.perf_counter()
    try:
        state, body = store.get(task)
        ctx = state.ctx
        delta = decode_state(update)
        weight = 1 if unit_weight else min(int(n), ctx.max_weight)  # central DP: unit weights
        if weight < n and not unit_weight:
            log.warning("client %d: weight %d capped at privacy.secagg_max_weight=%d", task.client_id, n, ctx.max_weight)
        unclipped = float(metrics.get(UNCLIPPED_KEY, 0.0))  # central DP, clipped on the client
        encoded = encode(delta, weight, float(metrics.get("train_loss", 0.0)), ctx.bits, ctx.scale, ctx.clip, unclipped)
        masked, tag = state.mask(encoded, *messages.read_mask_request(body))
    except (SecAggError, ValueError, KeyError) as exc:
        log.warning("secure aggregation: task %s refused (no reply): %s", task.task_id, exc)
        store.finish(task.client_id)
        return None
    kept = {k: float(metrics[k]) for k in ("compute_s", "task_s", "lockstep_clients") if k in metrics}
    kept["secagg_mask_s"] = time.perf_counter() - t0
    return encode_state(messages.reply({"masked": to_wire(masked, ctx.bits), "tag": tag})), 1, kept
