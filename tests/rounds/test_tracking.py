"""Experiment tracking: the rows a run records, read back with TensorBoard's and MLflow's own readers.

The rows go through :class:`RoundRecorder` (the recorder every driver uses), the files are the real
TensorBoard event files and the real MLflow store (SQLite in the run directory).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpeft.config import RunConfig, build_config
from dpeft.errors import ConfigError
from dpeft.rounds.recorder import RoundRecorder
from dpeft.state import AdapterState


def _cfg(**tracking: object) -> RunConfig:
    return build_config({"rounds": 3, "tracking": tracking})


def _row(n: int, acc: float) -> dict:
    return {
        "round": n,
        "clients": 2,
        "train_loss": 0.5,
        "eval_loss": 1 - acc,
        "eval_accuracy": acc,
        "bytes_up": 1000 * n,
        "bytes_down": 500 * n,
        "rejected_reasons": {"late": n},
    }


def _state() -> AdapterState:
    return AdapterState({"lora_A": torch.zeros(2, 2)})


def _export(run_dir: Path):
    def write(state: AdapterState) -> None:
        (run_dir / "adapter").mkdir(exist_ok=True)
        (run_dir / "adapter" / "adapter_config.json").write_text("{}")

    return write


def _scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, round(e.value, 4)) for e in acc.Scalars(tag)]


def test_rows_reach_tensorboard_and_mlflow_and_a_resume_continues_the_run(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    cfg = _cfg(tensorboard=True, mlflow=True, run_name="trial-1")
    rec = RoundRecorder(run, 3, 0, export=_export(run), config_text="rounds: 3\n", cfg=cfg)
    rec.start_over()
    rec.close(_row(0, 0.5), _state(), {})
    rec.close(_row(1, 0.6), _state(), {})
    rec.close(_row(2, 0.9), _state(), {})  # never checkpointed-and-written: the resume redoes round 2
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rec.rows[:2]))
    for ckpt in sorted((run / "checkpoints").glob("round-000002*")):
        ckpt.unlink()
    rec.metrics.tracker._tb.close()

    again = RoundRecorder(run, 3, 0, export=_export(run), cfg=cfg)
    assert again.resume(_state().schema()) is not None
    again.close(_row(2, 0.7), _state(), {})
    again.close(_row(3, 0.8), _state(), {})
    again.metrics.print_summary(again.rows, again.started)

    # TensorBoard: one value per round, the redone round 2 once, with its new value
    assert _scalars(run / "tensorboard", "eval_accuracy") == [(0, 0.5), (1, 0.6), (2, 0.7), (3, 0.8)]
    assert _scalars(run / "tensorboard", "rejected_reasons/late")[-1] == (3, 3.0)

    # MLflow: the same run before and after the resume, finished, with config and adapter
    state = json.loads((run / "tracking.json").read_text())
    assert state["mlflow_uri"] == f"sqlite:///{(run / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=state["mlflow_uri"])
    runs = client.search_runs([client.get_experiment_by_name("dpeft").experiment_id])
    assert [r.info.run_id for r in runs] == [state["mlflow_run_id"]]
    got = runs[0]
    assert got.info.status == "FINISHED" and got.info.run_name == "trial-1"
    assert got.data.params["rounds"] == "3" and got.data.params["tracking.mlflow"] == "True"
    history = client.get_metric_history(got.info.run_id, "eval_accuracy")
    assert max((m.step, m.value) for m in history) == (3, 0.8)
    assert {m.step for m in client.get_metric_history(got.info.run_id, "bytes_up")} == {0, 1, 2, 3}
    top = {a.path for a in client.list_artifacts(got.info.run_id)}
    assert {"config.yaml", "adapter", "plots"} <= top
    assert [a.path for a in client.list_artifacts(got.info.run_id, "adapter")] == ["adapter/adapter_config.json"]


def test_a_switch_without_its_package_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        _cfg(mlflow=True)
    assert err.value.key == "tracking.mlflow" and "dpeft[tracking]" in str(err.value)
    _cfg(tensorboard=True)  # the other switch is fine


def test_tracking_off_imports_neither_package(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; import torch\n"
        "from dpeft.config import build_config; from dpeft.rounds.recorder import RoundRecorder\n"
        f"rec = RoundRecorder(Path({str(tmp_path)!r}), 1, 0, cfg=build_config({{}})); rec.start_over()\n"
        "rec.write({'round': 0, 'clients': 0}); rec.metrics.print_summary(rec.rows, 0.0)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'tensorboard')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "mlflow.db").exists()
