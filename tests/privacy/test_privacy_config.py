"""Differential-privacy configs: combinations that would break the guarantee are refused when the
config is loaded, naming the key (exit 2 on the command line)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dpeft.errors import ConfigError
from dpeft.validate import load_config

CENTRAL = ["privacy.mode=central", "privacy.noise_multiplier=1.0"]
LOCAL = ["privacy.mode=local", "privacy.noise_multiplier=1.0", "train.loss=cross_entropy"]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["privacy.mode=centrl"], "privacy.mode"),
        (["privacy.mode=central"], "privacy.noise_multiplier"),
        ([*CENTRAL, "privacy.clipping=edge"], "privacy.clipping"),
        ([*CENTRAL, "privacy.accountant=moments"], "privacy.accountant"),
        ([*CENTRAL, "privacy.delta=1.5"], "privacy.delta"),
        ([*CENTRAL, "privacy.clip_norm=0"], "privacy.clip_norm"),
        ([*CENTRAL, "privacy.target_quantile=1.0"], "privacy.target_quantile"),
        ([*CENTRAL, "strategy.name=median"], "strategy.name"),
        ([*CENTRAL, "strategy.name=flora"], "strategy.name"),
        ([*CENTRAL, "strategy.name=flexlora"], "strategy.name"),
        ([*CENTRAL, "sync.name=async"], "sync.name"),
        ([*CENTRAL, "sync.name=deadline"], "sync.name"),
        ([*CENTRAL, "aggregation=allreduce"], "privacy.mode"),
        ([*CENTRAL, "eval.federated=true"], "eval.federated"),
        (["privacy.target_epsilon=3"], "privacy.target_epsilon"),
        ([*LOCAL, "train.lockstep=true", "model.dropout=0"], "train.lockstep"),
        ([*LOCAL, "train.grad_accum_steps=2"], "train.grad_accum_steps"),
        ([*LOCAL, "train.precision=bf16"], "train.precision"),
        ([*LOCAL, "train.loss=prior_calibrated"], "train.loss"),
        ([*LOCAL, "privacy.target_epsilon=2"], "privacy.target_epsilon"),
        ([*LOCAL, "privacy.adaptive_clipping=true"], "privacy.adaptive_clipping"),
        ([*LOCAL, "adapter.method=ia3"], "adapter.method"),
    ],
)
def test_refused_combinations_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key


def test_supported_combinations_load() -> None:
    for extra in (
        ["strategy.name=ffa_lora"],
        ["strategy.name=fedadam", "privacy.clipping=server"],
        ["privacy.adaptive_clipping=true"],
    ):
        assert load_config(None, [*CENTRAL, *extra]).privacy.mode == "central"
    assert load_config(None, ["privacy.mode=central", "privacy.target_epsilon=4"]).privacy.noise_multiplier is None
    assert load_config(None, LOCAL).privacy.mode == "local"


def test_command_line_exits_2_naming_the_key() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpeft_launch.cli",
            "config",
            "validate",
            "privacy.mode=central",
            "privacy.noise_multiplier=1",
            "strategy.name=median",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "strategy.name" in proc.stderr and "privacy.mode=central" in proc.stderr
