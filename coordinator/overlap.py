"""Overlapped evaluation (``eval.overlap``): round r's global is evaluated while round r+1 trains.

Nothing in a synchronous round depends on the previous round's evaluation: sampling is seeded
per round, the strategy step and the sync policy read updates only. So once round r is
aggregated, the engine hands a :class:`RoundCloser` a copy of the new global, the strategy's
state and the round's row, and goes on with round r+1. One background thread closes rounds in
their order: it evaluates the global (when due), then the recorder checkpoints (atomically,
with the row), exports (atomically) and appends the metrics line, exactly as a sequential run
does. So ``metrics.jsonl`` is complete and in order, a line is written only when its round and
its evaluation are done, and a process that dies mid-evaluation leaves the previous round's
checkpoint, from which a resumed run redoes the round (tasks are seeded, so the same adapter).

At most one closed round waits behind the one being evaluated (:data:`MAX_WAITING`): training
runs ahead of evaluation by at most two rounds, and the copies kept stay bounded. The run
waits for the last evaluation before it ends (:meth:`RoundCloser.drain`); an error in the
background is raised in the round loop at the next hand-over or at the end.

Evaluation stays sequential where the round loop itself waits on the clients' evaluation
(``eval.federated``: its tasks share the transport with training) and under ``sync=async``.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dpeft.config import RunConfig
from dpeft.rounds.tally import evaluate_into

if TYPE_CHECKING:
    from dpeft_coordinator.engine import RoundEngine

log = logging.getLogger("dpeft.coordinator")

#: closed rounds waiting behind the one in evaluation before the round loop waits too
MAX_WAITING = 1


class RoundCloser:
    """A background thread running round-closing jobs one at a time, in the order given."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=MAX_WAITING)
        self._error: BaseException | None = None
        self._failed = False  # once a job failed, later ones are skipped (a resume redoes their rounds)
        self._thread = threading.Thread(target=self._serve, daemon=True, name="dpeft-eval")
        self._thread.start()

    def _serve(self) -> None:
        # no torch.set_num_threads here: this thread's first parallel op takes the process's last
        # setting, and setting it would reach threads that train in this process (their BLAS pool)
        while (job := self._jobs.get()) is not None:
            try:
                if not self._failed:
                    job()
            except BaseException as exc:  # noqa: BLE001 - handed to the round loop
                log.error("closing a round in the background failed: %s", exc)
                self._error, self._failed = exc, True
            finally:
                self._jobs.task_done()
        self._jobs.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job`` (waits while :data:`MAX_WAITING` jobs already wait); raises an earlier job's error."""
        self._raise()
        self._jobs.put(job)

    def drain(self) -> None:
        """Wait until every queued job is done; raises a job's error."""
        self._jobs.join()
        self._raise()

    def close(self) -> None:
        """Finish the queued jobs and end the thread (errors are left to :meth:`drain`)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()


def overlaps(cfg: RunConfig) -> bool:
    """Whether a run's rounds are closed in the background (``eval.overlap``, where nothing waits on the evaluation)."""
    return bool(cfg.eval.overlap) and not cfg.eval.federated and cfg.sync.name != "async"


def closing_job(engine: RoundEngine, row: dict[str, Any], t0: float) -> Callable[[], None]:
    """The job that closes ``row``'s round as a sequential run would: evaluation when due, then the
    recorder's checkpoint, export and line. It works on copies of the global and of the strategy
    state taken now, so the next round may change them meanwhile."""
    state = engine.global_state.clone()
    strategy_state = copy.deepcopy(engine.strategy.state_dict())
    cfg = engine.cfg
    privacy = getattr(engine, "privacy", None)  # DP state (accountant, clip bound) as of this round
    extra = {"privacy": copy.deepcopy(privacy.state_dict())} if privacy is not None else None

    def job() -> None:
        evaluate_into(row, engine.evaluate, state, int(row["round"]), cfg.train.eval_every, cfg.rounds)
        engine.recorder.close(row, state, strategy_state, t0, extra=extra)

    return job
