"""Experiment tracking: every metrics row also goes to TensorBoard and/or MLflow (``tracking:``).

The :class:`Tracker` sits behind :class:`~dpeft.rounds.metrics.MetricsLog`, so every driver that
writes ``metrics.jsonl`` (the coordinator engine under any sync policy, all-reduce rank 0, split
federation) logs the same rows: each numeric field of a row (nested counts such as
``rejected_reasons`` flattened to ``rejected_reasons/<reason>``) at step = the row's round.

TensorBoard: event files in ``<run_dir>/tensorboard`` (the resolved config as a text summary);
a resumed run purges the steps after its checkpoint so redone rounds are not doubled.
MLflow: one run per run directory (its id kept in ``<run_dir>/tracking.json`` so a resume logs
into the same run) with the resolved config as params and ``config.yaml`` as an artifact; the
adapter directory when the last round is recorded, the plots and a FINISHED status at the end.
The default store is ``sqlite:///<run_dir>/mlflow.db`` (MLflow's recommended local backend) with
artifacts under ``<run_dir>/mlartifacts``.

Neither package is imported unless its switch is on (``check_tracking`` tells a user with a
switch on but the package missing how to install it, before the run starts).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from dpeft.config import RunConfig
from dpeft.config.parse import config_to_dict, dump_config
from dpeft.config.tracking_checks import check_tracking

log = logging.getLogger("dpeft.tracking")

STATE_FILE = "tracking.json"


def row_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics row (not ``round``), nested dicts flattened with '/'."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, bool):
            out[prefix] = float(value)
        elif isinstance(value, (int, float)):
            if value == value and abs(value) != float("inf"):  # MLflow refuses NaN/inf in some stores
                out[prefix] = float(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)

    for key, value in row.items():
        if key != "round":
            walk(str(key), value)
    return out


def flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": "0.0001"}`` (lists and nulls as text)."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, name + "."))
        else:
            out[name] = str(value)[:6000]
    return out


class Tracker:
    """TensorBoard and/or MLflow logging of one run directory's metrics rows."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        check_tracking(cfg)
        self.cfg = cfg
        self.run_dir = run_dir
        self.total_rounds = cfg.rounds
        self.run_name = cfg.tracking.run_name or run_dir.resolve().name
        self._tb: Any = None
        self._mlflow: Any = None
        self.mlflow_run_id: str | None = None
        self._started = False
        self._adapter_logged = False
        self._finished = False

    # -- start ------------------------------------------------------------------
    def begin(self, resumed_from: int | None) -> None:
        """Open the writers: a fresh run (``resumed_from`` None) or a resume after that round."""
        if self._started:
            return
        self._started = True
        t = self.cfg.tracking
        if t.tensorboard:
            self._open_tensorboard(resumed_from)
        if t.mlflow:
            self._open_mlflow(resumed_from)

    def _open_tensorboard(self, resumed_from: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = resumed_from + 1 if resumed_from is not None else None
        self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)
        if resumed_from is None:
            self._tb.add_text("config", "```yaml\n" + dump_config(self.cfg) + "```", 0)
            self._tb.flush()

    def _state(self) -> dict[str, Any]:
        path = self.run_dir / STATE_FILE
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _open_mlflow(self, resumed_from: int | None) -> None:
        for name in ("mlflow.store.db.utils", "alembic"):  # the store's table-creation notes
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        t = self.cfg.tracking
        uri = t.mlflow_uri or f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(t.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = (self.run_dir / "mlartifacts").resolve().as_uri() if t.mlflow_uri is None else None
            experiment_id = client.create_experiment(t.experiment, artifact_location=location)
        state = self._state()
        run_id = state.get("mlflow_run_id") if resumed_from is not None and state.get("mlflow_uri") == uri else None
        if run_id is not None:
            try:
                client.update_run(run_id, status="RUNNING")
            except Exception:  # the run is gone from the store: start a new one
                run_id = None
        if run_id is None:
            run_id = client.create_run(
                experiment_id, run_name=self.run_name, tags={"dpeft.run_dir": str(self.run_dir.resolve())}
            ).info.run_id
            params = [Param(k, v) for k, v in flat_params(config_to_dict(self.cfg)).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(run_id, params=params[i : i + 100])
            config_file = self.run_dir / "config.yaml"
            if config_file.is_file():
                client.log_artifact(run_id, str(config_file))
        (self.run_dir / STATE_FILE).write_text(json.dumps({"mlflow_uri": uri, "mlflow_run_id": run_id}) + "\n")
        self._mlflow, self.mlflow_run_id = client, run_id
        log.info("MLflow run %s in experiment %r at %s", run_id, t.experiment, uri)

    # -- rows -------------------------------------------------------------------
    def log_row(self, row: dict[str, Any]) -> None:
        """Log one metrics row at step = its round; the adapter too once the last round is in."""
        self.begin(None)
        step = int(row.get("round", 0))
        values = row_metrics(row)
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, step) for k, v in values.items()]
            for i in range(0, len(metrics), 1000):
                self._mlflow.log_batch(self.mlflow_run_id, metrics=metrics[i : i + 1000])
        if step >= self.total_rounds:
            self.log_adapter()

    def log_adapter(self) -> None:
        """The exported adapter directory as the MLflow artifact ``adapter`` (once)."""
        adapter = self.run_dir / "adapter"
        if self._mlflow is None or self._adapter_logged or not adapter.is_dir():
            return
        self._mlflow.log_artifacts(self.mlflow_run_id, str(adapter), "adapter")
        self._adapter_logged = True

    def finish(self, files: list[Path] | None = None) -> None:
        """End of the run: the adapter and ``files`` (plots) as artifacts, the run marked FINISHED, writers closed."""
        if self._finished or not self._started:
            return
        self._finished = True
        if self._mlflow is not None:
            self.log_adapter()
            for path in files or []:
                if path.is_file():
                    self._mlflow.log_artifact(self.mlflow_run_id, str(path), "plots")
            self._mlflow.set_terminated(self.mlflow_run_id, status="FINISHED")
        if self._tb is not None:
            self._tb.close()
