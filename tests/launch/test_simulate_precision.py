"""`dpeft simulate` with bf16 autocast, gradient accumulation, checkpointing and a cosine schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from integration_testlib import SHORT, assert_no_traceback, overrides, read_metrics

pytestmark = pytest.mark.integration


def test_simulate_bf16_with_memory_savers(tmp_path: Path, procs) -> None:
    from safetensors.torch import load_file

    run = tmp_path / "run"
    settings = dict(
        rounds=1,
        train__local_steps=3,
        train__precision="bf16",
        train__grad_accum_steps=2,
        train__gradient_checkpointing="true",
        train__lr_schedule="cosine",
        train__warmup_steps=1,
        data__max_train_examples=120,
        data__test_examples=32,
        **SHORT,
    )
    rc, p = procs.run("simulate", *overrides(run, **settings), timeout=240)
    assert rc == 0, f"exit {rc}:\n{p.stderr}"
    assert_no_traceback(p.stderr)
    rows = read_metrics(run)
    last = rows[-1]
    assert last["round"] == 1 and last["clients"] == 2
    assert math.isfinite(last["train_loss"]) and math.isfinite(last["eval_loss"])
    ckpt = load_file(sorted((run / "checkpoints").glob("round-*.safetensors"))[-1])
    exported = load_file(run / "adapter" / "adapter_model.safetensors")
    assert {str(t.dtype) for t in ckpt.values()} == {"torch.float32"}  # the global adapter stays fp32
    assert {str(t.dtype) for t in exported.values()} == {"torch.float32"}
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
