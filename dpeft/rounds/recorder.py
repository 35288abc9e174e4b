"""The round recorder: what a run leaves in its run directory, and how a run picks up from it.

One per driver (coordinator, split federation, all-reduce rank 0). It owns ``config.yaml``,
``metrics.jsonl`` (through :class:`~dpeft.rounds.metrics.MetricsLog`), the atomic per-round
checkpoints and the PEFT export, and it resumes: the newest readable checkpoint gives the
round, the global, the strategy state and the driver's extra info; the metrics rows past it
are dropped (they will be redone), the run's clock continues from the checkpointed
``elapsed_s``, and a line on stderr (and in the log) says that the run resumed.

A round is closed in one order: its row is finished (``wall_s``, ``elapsed_s``), the checkpoint
is written with the row in its info, the adapter is exported, and only then the metrics line is
appended. A process that dies in between leaves a checkpoint whose round has no line; the run
that resumes from it writes the line from the checkpoint (or, for a driver whose rows wait for
an evaluation, hands the row back to be evaluated again). Checkpoints without a row still load.

Sample generations of a causal LM (``generations.jsonl``) arrive inside an evaluated row and are
written just before its metrics line; a resume drops the samples of the rounds it redoes (and
of a lost row's round, which its checkpoint brings back) exactly as it drops their rows.

A run that starts over forgets what an earlier run left. Without a run directory (split tests)
the rows stay in memory and nothing is checkpointed.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpeft.config import RunConfig
from dpeft.config.tracking_checks import tracking_enabled
from dpeft.errors import DpeftError
from dpeft.rounds.checkpoint import clear_checkpoints, latest_checkpoint, save_checkpoint
from dpeft.rounds.generations import GENERATIONS_KEY, GenerationsLog
from dpeft.rounds.metrics import MetricsLog
from dpeft.state import AdapterState

log = logging.getLogger("dpeft.rounds")

#: the first fields of a round-0 row (the untrained global); its evaluation is added to it
ROUND0_FIELDS: dict[str, Any] = {"round": 0, "clients": 0, "num_examples": 0, "train_loss": None, "bytes_up": 0, "bytes_down": 0, "rejected": 0}


@dataclass
class ResumePoint:
    """What a checkpoint gives back: the round it closed, the global, the strategy state, the driver's info."""

    round: int
    global_state: AdapterState
    strategy_state: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)
    #: the checkpointed round's row when ``metrics.jsonl`` lacked its line (the process that
    #: wrote the checkpoint died before the line); None otherwise
    lost_row: dict[str, Any] | None = None


class RoundRecorder:
    """Run directory, metrics rows, checkpoints, resume and export of one run.

    ``export(state)`` writes the PEFT directory (None: no export); ``config_text`` is written
    to ``config.yaml`` (None: the caller writes its own); ``elapsed`` adds the run's clock
    (``elapsed_s``) to every row, rounded to ``elapsed_digits`` when given. ``cfg``: the run's
    config, whose ``tracking:`` switches send the rows to TensorBoard/MLflow too.
    """

    def __init__(
        self,
        run_dir: Path | None,
        total_rounds: int,
        seed: int,
        export: Callable[[AdapterState], Any] | None = None,
        config_text: str | None = None,
        elapsed: bool = True,
        elapsed_digits: int | None = None,
        cfg: RunConfig | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.total_rounds = total_rounds
        self.seed = seed
        self._export = export
        self._elapsed = elapsed
        self._elapsed_digits = elapsed_digits
        self.started = time.time()
        self.resumed_from: int | None = None
        self._rows: list[dict[str, Any]] = []
        self._held: dict[int, dict[str, Any]] = {}  # rows waiting for an evaluation (split)
        self.metrics: MetricsLog | None = None
        self.generations: GenerationsLog | None = None
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            if config_text is not None:
                (run_dir / "config.yaml").write_text(config_text)
            self.metrics = MetricsLog(run_dir, total_rounds=total_rounds)
            self.generations = GenerationsLog(run_dir)
            if tracking_enabled(cfg):
                from dpeft.rounds.tracking import Tracker

                assert cfg is not None
                self.metrics.tracker = Tracker(cfg, run_dir)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.metrics.rows if self.metrics is not None else self._rows

    @property
    def checkpoint_dir(self) -> Path | None:
        return self.run_dir / "checkpoints" if self.run_dir is not None else None

    def elapsed(self) -> float:
        """Seconds this run has been going, an earlier process's time included when it resumed."""
        return time.time() - self.started

    # -- resume / start over ----------------------------------------------------
    def resume(self, schema: Any, write_lost_row: bool = True) -> ResumePoint | None:
        """Pick up from the newest readable checkpoint (None: there is none); its adapter must have ``schema``.

        When ``metrics.jsonl`` lacks the checkpointed round's line, the row kept in the checkpoint
        is appended as it was recorded (with ``write_lost_row``) or only handed back in
        :attr:`ResumePoint.lost_row` (a driver that evaluates the row again before writing it)."""
        directory = self.checkpoint_dir
        found = latest_checkpoint(directory) if directory is not None else None
        if found is None:
            return None
        round_num, glob, strat, info = found
        if glob.schema() != schema:
            raise DpeftError(f"checkpoint in {self.run_dir} is for a different adapter; use a new run_dir or --fresh")
        assert self.metrics is not None
        earlier = next((r.get("elapsed_s") for r in self.metrics.rows if r.get("round") == round_num), None)
        self.metrics.truncate_after(round_num)
        lost = self._lost_row(round_num, info)
        if self.generations is not None:  # a lost row's round is written (or evaluated) again, samples included
            self.generations.truncate_after(round_num - 1 if lost is not None else round_num)
        offset = info.get("elapsed_s", earlier)  # checkpoints before elapsed_s was kept: the round's row
        if isinstance(offset, (int, float)):
            self.started -= float(offset)
        self.resumed_from = self.metrics.resumed_from = round_num
        if self.metrics.tracker is not None:
            self.metrics.tracker.begin(round_num)
        print(f"resumed from round {round_num} of {self.total_rounds} in {self.run_dir}", file=sys.stderr, flush=True)
        log.info("resumed from round %d of %d in %s", round_num, self.total_rounds, self.run_dir)
        if lost is not None and write_lost_row:
            log.info("round %d's metrics line was missing; written from its checkpoint", round_num)
            self._append(dict(lost))
        return ResumePoint(round_num, glob, strat, info, lost)

    def _lost_row(self, round_num: int, info: dict[str, Any]) -> dict[str, Any] | None:
        """The row checkpointed with round ``round_num`` when the metrics have no line for it."""
        row = info.get("row")
        if not isinstance(row, dict) or row.get("round") != round_num:
            return None
        return None if any(r.get("round") == round_num for r in self.rows) else dict(row)

    def start_over(self) -> None:
        """A run from round 0: forget the metrics rows and checkpoints an earlier run left in the run directory
        (left in place, old checkpoints would outrank the new run's on resume and survive the keep-N pruning)."""
        if self.metrics is not None:
            self.metrics.truncate_after(-1)
            if self.metrics.tracker is not None:
                self.metrics.tracker.begin(None)
        if self.generations is not None:
            self.generations.truncate_after(-1)
        directory = self.checkpoint_dir
        if directory is not None and clear_checkpoints(directory):
            log.info("starting over: removed the checkpoints of an earlier run in %s", self.run_dir)

    # -- rounds -----------------------------------------------------------------
    def needs_round0(self) -> bool:
        """True before the first row of a run that starts at round 0."""
        return self.resumed_from is None and not self.rows

    def round0_row(self, evaluate: Callable[[AdapterState], dict[str, float]] | None, state: AdapterState) -> dict[str, Any]:
        """The untrained global's row (evaluated when ``evaluate`` is given), timed into ``wall_s``."""
        t0 = time.time()
        row = dict(ROUND0_FIELDS)
        if evaluate is not None:
            row.update(evaluate(state))
        row["wall_s"] = time.time() - t0
        return row

    def save(
        self,
        round_num: int,
        state: AdapterState,
        strategy_state: dict[str, torch.Tensor],
        extra: dict[str, Any] | None = None,
        row: dict[str, Any] | None = None,
    ) -> None:
        """Checkpoint round ``round_num`` (with the run's clock, the driver's ``extra`` info and the
        round's ``row``, which a resume writes when its line is missing) and export ``state``."""
        directory = self.checkpoint_dir
        if directory is not None:
            info = {"seed": self.seed, **(extra or {}), "elapsed_s": self.elapsed()}
            if row is not None:
                info["row"] = row
            save_checkpoint(directory, round_num, state, strategy_state, info)
        self.export(state)

    def close(
        self, row: dict[str, Any], state: AdapterState, strategy_state: dict[str, torch.Tensor], t0: float | None = None, extra: dict[str, Any] | None = None
    ) -> None:
        """Record a finished round: stamp its row's clock (as :meth:`write`), checkpoint it with the
        row (and the driver's JSON ``extra`` info, such as the privacy accountant's state), export
        ``state``, then append the row's line."""
        self._stamp(row, t0)
        self.save(int(row["round"]), state, strategy_state, extra=extra, row=row)
        self._append(row)

    def export(self, state: AdapterState) -> None:
        """Write ``state`` as the run's PEFT adapter (when this recorder exports)."""
        if self._export is not None:
            self._export(state)

    def write(self, row: dict[str, Any], t0: float | None = None) -> None:
        """Append a round's row: ``wall_s`` since ``t0`` (when given) and the run's ``elapsed_s``."""
        self._stamp(row, t0)
        self._append(row)

    def _stamp(self, row: dict[str, Any], t0: float | None) -> None:
        if t0 is not None:
            row["wall_s"] = time.time() - t0
        if self._elapsed:
            elapsed = self.elapsed()
            row["elapsed_s"] = round(elapsed, self._elapsed_digits) if self._elapsed_digits is not None else elapsed

    def _append(self, row: dict[str, Any]) -> None:
        samples = row.pop(GENERATIONS_KEY, None)
        if samples and self.generations is not None:  # before the metrics line: see resume
            self.generations.append(int(row["round"]), samples)
        if self.metrics is not None:
            self.metrics.append(row)
        else:
            self._rows.append(row)

    def progress(self, text: str) -> None:
        if self.metrics is not None:
            self.metrics.progress(text)

    # -- rows waiting for an evaluation -----------------------------------------
    def hold(self, round_num: int, row: dict[str, Any]) -> None:
        """Keep round ``round_num``'s row until :meth:`release` (its evaluation comes from elsewhere)."""
        self._held[round_num] = row

    def is_held(self, round_num: int) -> bool:
        return round_num in self._held

    def release(self, round_num: int, evaluation: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Write the held rows of earlier rounds as they are, then round ``round_num``'s with ``evaluation``.
        Returns the rows written, in order."""
        written = [self._held.pop(r) for r in sorted(r for r in self._held if r < round_num)]
        row = self._held.pop(round_num, None)
        if row is not None:
            row.update(evaluation or {})
            written.append(row)
        for r in written:
            self.write(r)
        return written

    def flush(self) -> list[dict[str, Any]]:
        """Write every held row as it is (end of the run)."""
        return self.release(max(self._held) + 1) if self._held else []
