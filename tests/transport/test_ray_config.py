"""`dpeft ray` argument and config handling (no cluster needed)."""

from __future__ import annotations

import pytest

from dpeft.errors import ConfigError
from dpeft.launch.ray_cli import load_run_config


def test_ray_section_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rounds: 3\nray:\n  actors: 4\n  num_gpus: 0.5\n  resources: {edge: 1}\n")
    cfg, rcfg = load_run_config(str(path), ["ray.num_cpus=2", "clients=8"])
    assert cfg.rounds == 3 and cfg.clients == 8
    assert rcfg.actors == 4 and rcfg.num_gpus == 0.5 and rcfg.num_cpus == 2.0
    spec = rcfg.spec(cfg)
    assert spec.bundle() == {"CPU": 2.0, "GPU": 0.5, "edge": 1.0}
    assert spec.torch_threads() == 2
    _, rcfg = load_run_config(None, ["simulate.processes=3"])
    assert rcfg.spec(_).actors == 3  # defaults to simulate.processes


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("ray.actorz=2", "ray.actorz"),
        ("ray.mode=mpi", "ray.mode"),
        ("ray.num_gpus=1.5", "ray.num_gpus"),
        ("ray.placement_strategy=RANDOM", "ray.placement_strategy"),
        ("ray.resources={edge: -1}", "ray.resources.edge"),
        ("ray=3", "ray"),
        ("rounds=0", "rounds"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_run_config(None, [override])
    assert info.value.key == key


def test_cli_exit_code_2_on_bad_ray_key(capsys):
    from dpeft.launch.cli import main

    assert main(["ray", "ray.actors=0"]) == 2
    assert "ray.actors" in capsys.readouterr().err


def test_cli_help_lists_ray(capsys):
    from dpeft.launch.cli import main

    with pytest.raises(SystemExit) as info:
        main(["ray", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--address" in out and "key=value" in out
