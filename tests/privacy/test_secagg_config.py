"""Secure aggregation's config checks: what it cannot be combined with is refused at load time,
naming the key (exit 2 from the CLI)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dpeft.errors import ConfigError
from dpeft.validate import load_config

ON = ["privacy.secure_aggregation=true", "clients=10", "clients_per_round=8"]


@pytest.mark.parametrize(
    "extra, key, why",
    [
        (["strategy.name=median"], "strategy.name", "individual updates"),
        (["strategy.name=krum"], "strategy.name", "individual updates"),
        (["strategy.name=trimmed_mean"], "strategy.name", "individual updates"),
        (["strategy.name=flora"], "strategy.name", "per-client LoRA factors"),
        (["strategy.name=flexlora"], "strategy.name", "per-client LoRA factors"),
        (["strategy.options.clip_norm=1.0"], "strategy.options.clip_norm", "server-side clipping"),
        (["sync.name=async"], "sync.name", "not supported"),
        (["sync.name=deadline", "sync.late_updates=fold"], "sync.late_updates", "own round"),
        (["aggregation=allreduce"], "aggregation", "aggregation=coordinator"),
        (["codec.up=int8"], "codec.up", "lossy"),
        (["codec.up=topk"], "codec.up", "lossy"),
        (["privacy.mode=central", "privacy.clipping=server"], "privacy.clipping", "clip on the clients"),
        (["clients_per_round=2"], "clients_per_round", "at least 3"),
        (["privacy.secagg_bits=16", "privacy.secagg_max_weight=10000"], "privacy.secagg_bits", "cannot hold"),
    ],
)
def test_refused_combinations(extra: list[str], key: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [*ON, *extra])
    assert err.value.key == key and why in err.value.problem


@pytest.mark.parametrize(
    "bad, key",
    [
        ("privacy.secagg_threshold=0", "privacy.secagg_threshold"),
        ("privacy.secagg_bits=70", "privacy.secagg_bits"),
        ("privacy.secagg_neighbours=1", "privacy.secagg_neighbours"),
        ("privacy.secagg_clip_range=-1", "privacy.secagg_clip_range"),
        ("privacy.secagg_max_weight=0", "privacy.secagg_max_weight"),
    ],
)
def test_key_ranges(bad: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [bad])
    assert err.value.key == key


def test_accepted_combinations() -> None:
    cfg = load_config(None, [*ON, "strategy.name=fedadam", "sync.name=deadline"])
    assert cfg.privacy.secure_aggregation
    cfg = load_config(None, [*ON, "strategy.name=fedadam", "privacy.mode=central", "privacy.noise_multiplier=1.0"])
    assert cfg.privacy.secure_aggregation and cfg.privacy.mode == "central"


def test_cli_exit_2_and_ray_split_refused(tmp_path) -> None:
    from dpeft.privacy.secagg.checks import refuse_command

    p = subprocess.run(
        [sys.executable, "-m", "dpeft_launch.cli", "config", "validate", *ON, "strategy.name=median"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "strategy.name" in p.stderr and "Traceback" not in p.stderr
    cfg = load_config(None, ON)
    for command in ("ray", "split"):
        with pytest.raises(ConfigError, match=f"dpeft {command}"):
            refuse_command(cfg, command)
