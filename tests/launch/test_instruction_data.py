"""Instruction data through the `dpeft` command: bad rows exit 2 naming the file and row, and a
tiny SmolLM2 run (2 layers) on an instruction JSONL finishes with response-only training."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from integration_testlib import assert_no_traceback, read_metrics

pytestmark = pytest.mark.integration

LM = ["model.name=smollm2", "model.task=causal_lm", "model.layers=2", "model.max_length=32"]


def _write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=["prompt", "response"])
            w.writeheader()
            w.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "response": str(2 * i)} for i in range(n)]


@pytest.mark.parametrize(
    "suffix, fmt, bad, where, needle",
    [
        (".jsonl", "instruction", {"prompt": "What is 1 plus 1?"}, "line 5", "'response'"),
        (".csv", "instruction", {"prompt": "What is 1 plus 1?", "response": ""}, "row 5", "'response' is empty"),
    ],
)
def test_bad_row_exits_2_naming_the_row(tmp_path: Path, procs, suffix: str, fmt: str, bad: dict, where: str, needle: str) -> None:
    rows = _rows(12)
    rows[4] = bad
    path = _write(tmp_path / f"data{suffix}", rows)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data:\n  dataset: file\n  path: {path}\n  format: {fmt}\n")
    run = tmp_path / "run"
    rc, p = procs.run("simulate", "--config", str(cfg), *LM, f"run_dir={run}", timeout=90, cwd=tmp_path)
    err = p.stderr
    assert rc == 2, f"exit {rc}:\n{err}"
    assert_no_traceback(err + p.stdout)
    # (third-party import warnings, e.g. bitsandbytes' about its CPU kernels, are not ours to count)
    lines = [line for line in err.splitlines() if line.startswith("dpeft")]
    assert len(lines) == 1, err
    assert f"{path}: {where}" in lines[0] and needle in lines[0], lines[0]
    assert not run.exists()


def test_simulate_smollm2_on_instruction_jsonl(tmp_path: Path, procs) -> None:
    path = _write(tmp_path / "train.jsonl", _rows(24))
    run = tmp_path / "run"
    args = [
        *LM,
        "data.dataset=file",
        f"data.path={path}",
        "data.format=instruction",
        "data.test_examples=4",
        "rounds=1",
        "clients=2",
        "clients_per_round=2",
        "train.local_steps=2",
        "train.batch_size=4",
        "train.eval_batch_size=4",
        "simulate.processes=1",
        f"run_dir={run}",
    ]
    rc, p = procs.run("simulate", *args, timeout=240, cwd=tmp_path)
    assert rc == 0, f"exit {rc}:\n{p.stderr}"
    assert_no_traceback(p.stderr)
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients"] == 2 and rows[1]["num_examples"] == 20  # 24 - 4 held out, iid over 2 clients
    assert math.isfinite(rows[1]["train_loss"]) and math.isfinite(rows[1]["eval_loss"])
    assert 0.0 <= rows[1]["eval_accuracy"] <= 1.0
