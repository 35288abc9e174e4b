"""Config that forgives the obvious: one-word shorthands for a section's choice, and a suggestion for a mistyped key."""

from __future__ import annotations

import pytest

from dpeft.errors import ConfigError
from dpeft.validate import load_config


@pytest.mark.parametrize(
    "override, section, field, value",
    [
        ("strategy=fedadam", "strategy", "name", "fedadam"),
        ("sync=async", "sync", "name", "async"),
        ("codec=int8", "codec", "up", "int8"),
        ("adapter=dora", "adapter", "method", "dora"),
        ("data=reuters_r8", "data", "dataset", "reuters_r8"),
    ],
)
def test_a_section_given_one_word_names_its_choice(override: str, section: str, field: str, value: str) -> None:
    cfg = load_config(None, [override])
    assert getattr(getattr(cfg, section), field) == value


def test_shorthand_combines_with_the_sections_keys_in_either_order(tmp_path) -> None:
    for overrides in (["strategy=fedadam", "strategy.server_lr=0.1"], ["strategy.server_lr=0.1", "strategy=fedadam"]):
        cfg = load_config(None, overrides)
        assert (cfg.strategy.name, cfg.strategy.server_lr) == ("fedadam", 0.1)
    path = tmp_path / "run.yaml"
    path.write_text("strategy: fedyogi\nsync: deadline\n")
    cfg = load_config(path, ["strategy.server_lr=0.05"])
    assert (cfg.strategy.name, cfg.strategy.server_lr, cfg.sync.name) == ("fedyogi", 0.05, "deadline")


def test_a_shorthand_still_checks_the_value() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["strategy=fedadamm"])
    assert "strategy.name" in str(err.value)


@pytest.mark.parametrize(
    "override, key, suggestion",
    [("train.learning_rate=0.1", "train.learning_rate", None), ("train.lr_shedule=cosine", "train.lr_shedule", "lr_schedule"), ("rouns=3", "rouns", "rounds")],
)
def test_a_mistyped_key_gets_a_suggestion(override: str, key: str, suggestion: str | None) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    text = str(err.value)
    assert key in text
    if suggestion is None:
        assert "did you mean" not in text
    else:
        assert f"did you mean {suggestion!r}?" in text


def _dpeft(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "dpeft_launch.cli", *args], capture_output=True, text=True, timeout=120)


def test_config_show_and_validate(tmp_path) -> None:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text("strategy: fedadam\nrounds: 3\n")
    shown = _dpeft("config", "show", str(path), "strategy.server_lr=0.05")
    assert shown.returncode == 0, shown.stderr
    tree = yaml.safe_load(shown.stdout)
    assert tree["rounds"] == 3 and tree["strategy"]["name"] == "fedadam" and tree["strategy"]["server_lr"] == 0.05
    assert tree["train"]["lr"] == 2e-3  # defaults filled in
    ok = _dpeft("config", "validate", "--config", str(path))
    assert (ok.returncode, ok.stdout.strip()) == (0, "ok")
    bad = _dpeft("config", "validate", str(path), "sync.deadline_s=-1")
    assert bad.returncode == 2 and "sync.deadline_s" in bad.stderr and "Traceback" not in bad.stderr
