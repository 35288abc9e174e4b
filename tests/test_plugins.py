"""Plug-ins from a module outside the package (tests/plugins_fixture/demo_plugin.py): selected by
name from YAML, checked like the built-ins, imported by spawned workers; entry points; the
strategies' own ``server_lr`` defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpeft.config import StrategyConfig
from dpeft.errors import ConfigError
from dpeft.validate import load_config

FIXTURE = Path(__file__).resolve().parent / "plugins_fixture"
ROOT = Path(__file__).resolve().parent.parent

#: every family of the fixture selected by name; tiny enough for a one-round run
PLUGIN_YAML = """\
plugins: [demo_plugin]
rounds: 1
clients: 2
clients_per_round: 2
model: {{max_length: 16}}
data: {{dataset: demo_toy, options: {{size: 48, marker_dir: {markers}}}, test_examples: 8, partition: iid}}
train: {{local_steps: 1, batch_size: 4, loss: demo_smooth, loss_options: {{eps: 0.2, marker_dir: {markers}}}}}
strategy: {{name: demo_capped, options: {{max_step_norm: 5.0}}}}
sync: {{name: demo_sync}}
codec: {{up: demo_half, options: {{demo_clamp: 100.0}}}}
simulate: {{processes: 1, start: {start}}}
"""


@pytest.fixture
def plugin_path(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(FIXTURE))
    return FIXTURE


def write_yaml(tmp_path: Path, start: str = "spawn") -> Path:
    markers = tmp_path / "markers"
    markers.mkdir(exist_ok=True)
    path = tmp_path / "run.yaml"
    path.write_text(PLUGIN_YAML.format(markers=markers, start=start) + f"run_dir: {tmp_path / 'run'}\n")
    return path


def test_every_family_selected_from_yaml(tmp_path: Path, plugin_path: Path) -> None:
    from dpeft.codec.updates import CodecSpec
    from dpeft.data.loaders import dataset_options
    from dpeft.strategies import make_strategy
    from dpeft.sync.base import make_policy
    from dpeft.train.losses import loss_options

    cfg = load_config(write_yaml(tmp_path))
    assert cfg.plugins == ["demo_plugin"]
    strategy = make_strategy(cfg.strategy)
    assert type(strategy).__name__ == "Capped" and strategy.opts.max_step_norm == 5.0
    assert type(make_policy(cfg.sync, 2)).__name__ == "DemoSync"
    assert CodecSpec.from_config({"up": cfg.codec.up, "options": cfg.codec.options}).up_codec().params() == {"clamp": 100.0}
    assert dataset_options(cfg.data).size == 48
    assert loss_options(cfg.train).eps == 0.2


@pytest.mark.parametrize(
    ("override", "key", "says"),
    [
        ("strategy.options.max_step_norm=0", "strategy.options.max_step_norm", "> 0"),
        ("strategy.options.nope=1", "strategy.options.nope", "unknown option for strategy 'demo_capped'"),
        ("data.options.size=2", "data.options.size", ">= 4"),
        ("data.options.nope=1", "data.options.nope", "unknown option for dataset loader 'demo_toy'"),
        ("train.loss_options.eps=1.5", "train.loss_options.eps", "< 1"),
        ("train.loss=demo_nope", "train.loss", "must be one of cross_entropy, prior_calibrated, demo_smooth"),
        ("codec.options.nope=1", "codec.up", "unknown codec option(s) nope"),
        ("sync.name=demo_nope", "sync.name", "demo_sync"),
        ("data.dataset=demo_nope", "data.dataset", "demo_toy"),
        ("train.lockstep=true model.dropout=0", "train.lockstep", "built-in losses only"),
    ],
)
def test_plugin_options_checked_like_builtins(tmp_path: Path, plugin_path: Path, override: str, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write_yaml(tmp_path), override.split())
    assert err.value.key == key and says in str(err.value), str(err.value)


def test_unknown_plugin_module_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    from dpeft_launch.cli import main

    assert main(["config", "validate", "plugins=[no_such_dpeft_plugin]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plugins: cannot import plug-in module 'no_such_dpeft_plugin'" in err[0]


def test_plugin_flag_adds_to_the_config(plugin_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dpeft_launch.cli import main

    assert main(["config", "show", "strategy=demo_capped", "--plugin", "demo_plugin"]) == 0
    out = capsys.readouterr().out
    assert "plugins:\n- demo_plugin\n" in out and "name: demo_capped" in out


def test_registering_a_taken_name() -> None:
    from dpeft.strategies import register_strategy
    from dpeft.strategies.fedavg import FedAvg

    with pytest.raises(ValueError, match="registered twice"):
        register_strategy("fedavg")(type("Other", (FedAvg,), {}))
    register_strategy("fedavg")(FedAvg)  # the same class again (a reloaded module): accepted


def test_entry_point_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dpeft.plugins as plugins

    (tmp_path / "ep_demo_mod.py").write_text(
        "import dpeft\nfrom dpeft.strategies.fedavg import FedAvg\n\n@dpeft.register_strategy('demo_from_ep')\nclass FromEp(FedAvg):\n    pass\n"
    )
    info = tmp_path / "ep_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dpeft.plugins]\ndemo = ep_demo_mod\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    assert load_config(None, ["strategy.name=demo_from_ep"]).strategy.name == "demo_from_ep"


def test_server_lr_defaults_per_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    from dpeft.strategies import make_strategy
    from dpeft.strategies.fedopt import DEFAULT_ADAPTIVE_SERVER_LR
    from dpeft_launch.cli import main

    assert load_config().strategy.server_lr is None
    for name in ("fedadam", "fedyogi", "fedadagrad"):
        assert make_strategy(StrategyConfig(name=name)).server_lr == DEFAULT_ADAPTIVE_SERVER_LR < 0.1
    for name in ("fedavg", "fedavgm", "fedprox", "flora"):
        assert make_strategy(StrategyConfig(name=name)).server_lr == 1.0
    assert make_strategy(StrategyConfig(name="fedadam", server_lr=0.5)).server_lr == 0.5
    assert main(["config", "show", "strategy=fedadam"]) == 0
    assert f"server_lr: null  # null = fedadam's default: {DEFAULT_ADAPTIVE_SERVER_LR:g}\n" in capsys.readouterr().out
    assert main(["config", "show", "strategy=fedadam", "strategy.server_lr=0.2"]) == 0
    assert "  server_lr: 0.2\n" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="strategy.server_lr"):
        load_config(None, ["strategy.server_lr=0"])


@pytest.mark.integration
def test_spawned_worker_imports_the_plugin(tmp_path: Path) -> None:
    """`dpeft simulate` with a spawned worker: the worker process loads the data and trains with
    the plug-in's loader and loss (the config it gets names the plug-in); the coordinator
    aggregates with the plug-in strategy, policy and codec."""
    cfg = write_yaml(tmp_path, start="spawn")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(FIXTURE), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    p = subprocess.Popen(
        [sys.executable, "-m", "dpeft_launch.cli", "simulate", "--fresh", "--config", str(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        _, err = p.communicate(timeout=300)
    finally:
        p.kill()
    assert p.returncode == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 1 and rows[-1]["sync"] == "demo_sync" and rows[-1]["demo_step_norm"] > 0
    marks = [m.name.split("-") for m in (tmp_path / "markers").iterdir()]
    trained_in = {int(pid) for what, pid in marks if what == "loss"}
    loaded_in = {int(pid) for what, pid in marks if what == "dataset"}
    assert len(trained_in) == 1 and p.pid not in trained_in, marks  # the spawned worker trained with the plug-in loss
    assert loaded_in == {p.pid} | trained_in, marks  # the coordinator (evaluation) and the worker loaded the plug-in data
