"""Each PEFT family through a real `dpeft simulate` run, exported as a peft dir that loads unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
from integration_testlib import SHORT, assert_no_traceback, compare_exported_adapter, overrides, read_metrics

pytestmark = pytest.mark.integration

METHODS = {
    # method: (peft_type, use_dora)
    "lora": ("LORA", False),
    "dora": ("LORA", True),
    "ia3": ("IA3", None),
    "prompt_tuning": ("PROMPT_TUNING", None),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_method_round_trip(tmp_path: Path, procs, method: str) -> None:
    run = tmp_path / "run"
    args = overrides(
        run,
        adapter__method=method,
        rounds=1,
        simulate__processes=1,
        train__local_steps=3,
        data__max_train_examples=200,
        data__test_examples=64,
        **SHORT,
    )
    rc, p = procs.run("simulate", *args, timeout=180)
    assert rc == 0, f"{method}: exit {rc}:\n{p.stderr}"
    assert_no_traceback(p.stderr)
    assert len(p.workers_seen()) == 1
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients"] == 2 and rows[1]["rejected"] == 0
    assert rows[1]["bytes_up"] > 0 and rows[1]["eval_accuracy"] is not None

    conf = compare_exported_adapter(run, check_trained=False)  # PeftModel.from_pretrained + logits == checkpoint
    peft_type, use_dora = METHODS[method]
    assert conf["peft_type"] == peft_type
    if use_dora is not None:
        assert bool(conf.get("use_dora")) is use_dora
