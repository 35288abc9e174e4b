"""`dpeft simulate` on a 4-bit base (model.quantization=nf4): forked and spawned workers, and the CLI's answer to a typo."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from integration_testlib import SHORT, assert_no_traceback, overrides, read_metrics

pytestmark = pytest.mark.integration

TINY_NF4 = dict(
    SHORT,
    rounds=1,
    clients=2,
    clients_per_round=2,
    train__local_steps=2,
    data__max_train_examples=64,
    data__test_examples=32,
    model__quantization="nf4",
    model__layers=2,
)


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_simulate_on_nf4_base(tmp_path: Path, procs, start: str) -> None:
    run = tmp_path / "run"
    rc, p = procs.run("simulate", *overrides(run, simulate__start=start, **TINY_NF4), timeout=240)
    assert rc == 0, f"exit {rc}:\n{p.stderr}"
    assert_no_traceback(p.stderr)
    assert len(p.workers_seen()) == 2, p.cmdlines
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients"] == 2 and math.isfinite(rows[1]["train_loss"]) and math.isfinite(rows[1]["eval_loss"])
    # the export is an ordinary LoRA adapter: nothing in its config ties it to a quantized base
    written = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and not any("quant" in k and written[k] for k in written)


def test_quantization_option_typo_is_a_config_error(tmp_path: Path, procs) -> None:
    rc, p = procs.run(
        "simulate",
        *overrides(tmp_path / "run", model__quantization="nf4", model__quantization_options__double_qant="true"),
        timeout=60,
    )
    assert rc == 2, p.stderr
    assert "model.quantization_options.double_qant" in p.stderr
    assert_no_traceback(p.stderr)
