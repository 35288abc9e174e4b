"""`dpeft simulate` end to end with lora_fair and hetlora (real coordinator and worker processes, MiniLM).

Tiny settings: 3 clients, 2 rounds of a few local steps on a few hundred examples; each run learns
(eval loss below the untrained model's). HetLoRA runs with a high pruning threshold so clients
prune their tail ranks in the first round and are sent the reduced ranks in the second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from simulate_runs import simulate_rows

pytestmark = pytest.mark.integration

TINY = [
    "rounds=2",
    "clients=3",
    "clients_per_round=3",
    "train.local_steps=10",
    "train.lr=5e-3",
    "train.batch_size=8",
    "data.max_train_examples=240",
    "data.test_examples=64",
    "data.partition=iid",
    "simulate.processes=2",
    "model.max_length=32",
]


def simulate(run_dir: Path, *overrides: str, timeout: float = 400) -> list[dict]:
    return simulate_rows(run_dir, TINY, *overrides, timeout=timeout)


def test_hetlora_prunes_ranks_and_learns(tmp_path) -> None:
    rows = simulate(
        tmp_path / "run", "adapter.r=8", "strategy.name=hetlora", "strategy.options={client_ranks: [4, 8], prune_threshold: 0.9}"
    )
    assert [r["round"] for r in rows] == [0, 1, 2]
    first, second = rows[1], rows[2]
    assert first["clients"] == 3 and first["rejected"] == 0
    assert first["client_ranks"] == {"0": 4, "1": 8, "2": 4}  # initial ranks, cycled
    assert first["hetlora_pruned"] == 3  # every tail fell under the (high) threshold
    assert second["client_ranks"] == {"0": 3, "1": 6, "2": 3}  # floor(0.75 r): the server sent the reduced ranks
    # the clients trained and uploaded at the reduced ranks they received (per-round download bytes
    # are not compared: under load a late transfer of one round can fall in the next round's window)
    assert second["hetlora_rank_mean"] < first["hetlora_rank_mean"]
    assert second["bytes_up"] < first["bytes_up"]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8  # the global keeps the largest rank


def test_lora_fair_corrects_the_average_and_learns(tmp_path) -> None:
    rows = simulate(tmp_path / "run", "strategy.name=lora_fair", "strategy.options={similarity: frobenius}")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["clients"] == 3 and r["rejected"] == 0
        assert r["lora_fair_residual_after"] < r["lora_fair_residual_before"]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["strategy.name=hetlora", "strategy.options.prune_keep=2"], "strategy.options.prune_keep"),
        (["strategy.name=lora_fair", "strategy.options={similarity: l2}"], "strategy.options.similarity"),
        (["strategy.name=lora_fair", "privacy.secure_aggregation=true"], "privacy.secure_aggregation"),
    ],
)
def test_bad_options_exit_2_naming_the_key(overrides: list[str], key: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "dpeft_launch.cli", "config", "validate", *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert f"config error: {key}:" in proc.stderr and "Traceback" not in proc.stderr
