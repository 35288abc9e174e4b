"""`dpeft ray` argument and config handling (no cluster needed)."""

from __future__ import annotations

import pytest

from dpeft.config import RayConfig, config_to_dict, dump_config
from dpeft.errors import ConfigError
from dpeft.validate import config_from_dict, load_config
from dpeft_launch.ray_cli import actor_spec, warn_simulate_only


def test_ray_section_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rounds: 3\nray:\n  actors: 4\n  num_gpus: 0.5\n  resources: {edge: 1}\n")
    cfg = load_config(str(path), ["ray.num_cpus=2", "clients=8"])
    assert cfg.rounds == 3 and cfg.clients == 8
    assert isinstance(cfg.ray, RayConfig)
    assert cfg.ray.actors == 4 and cfg.ray.num_gpus == 0.5 and cfg.ray.num_cpus == 2.0
    spec = actor_spec(cfg)
    assert spec.bundle() == {"CPU": 2.0, "GPU": 0.5, "edge": 1.0}
    assert spec.torch_threads() == 2
    cfg = load_config(None, ["simulate.processes=3"])
    assert cfg.ray == RayConfig() and actor_spec(cfg).actors == 3  # defaults to simulate.processes


def test_ray_section_round_trips_through_the_resolved_config(tmp_path):
    cfg = load_config(None, ["ray.actors=3", "ray.resources={edge: 2}", "ray.placement_strategy=null"])
    assert config_from_dict(config_to_dict(cfg)).ray == cfg.ray  # as sent to workers and actors
    (tmp_path / "config.yaml").write_text(dump_config(cfg))  # as written to run_dir
    assert load_config(tmp_path / "config.yaml").ray == cfg.ray


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("ray.actorz=2", "ray.actorz"),
        ("ray.mode=mpi", "ray.mode"),
        ("ray.actors=0", "ray.actors"),
        ("ray.num_gpus=1.5", "ray.num_gpus"),
        ("ray.num_cpus=many", "ray.num_cpus"),
        ("ray.placement_strategy=RANDOM", "ray.placement_strategy"),
        ("ray.resources={edge: -1}", "ray.resources.edge"),
        ("ray.max_restarts=-2", "ray.max_restarts"),
        ("ray.backend=mpi", "ray.backend"),
        ("ray=3", "ray"),
        ("rounds=0", "rounds"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert info.value.key == key


def test_cli_exit_code_2_on_bad_ray_key(capsys):
    from dpeft_launch.cli import main

    assert main(["ray", "ray.actors=0"]) == 2
    assert "ray.actors" in capsys.readouterr().err
    assert main(["ray", "ray.mode=mpi"]) == 2
    assert "ray.mode" in capsys.readouterr().err


def test_one_yaml_serves_simulate_and_ray(tmp_path, capsys):
    """`dpeft simulate --config FILE` accepts a file with a ray: section (and still checks it)."""
    from dpeft_launch.cli import main

    good = tmp_path / "run.yaml"
    good.write_text("rounds: 2\nclients: 4\nray:\n  actors: 2\n  num_cpus: 1\n  placement_strategy: SPREAD\n")
    # rounds=0 makes both commands stop at validation, after the whole file (ray: included) was read
    assert main(["simulate", "--config", str(good), "rounds=0"]) == 2
    err = capsys.readouterr().err
    assert "rounds" in err and "ray" not in err
    assert main(["ray", "--config", str(good), "rounds=0"]) == 2
    err = capsys.readouterr().err
    assert "rounds" in err and "ray." not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("ray:\n  actors: 2\n  nmu_cpus: 1\n")
    for command in ("simulate", "ray"):
        assert main([command, "--config", str(bad)]) == 2
        assert "ray.nmu_cpus" in capsys.readouterr().err


def test_simulate_only_keys_warn_only_in_allreduce_mode(capsys):
    keys = ["simulate.speed_factors=[1, 3]", "simulate.dropout=0.2", "simulate.byzantine_clients=[1]", "sync.task_timeout_s=30"]
    assert warn_simulate_only(load_config(None, keys)) == []  # actors mode honours them all
    assert capsys.readouterr().err == ""
    ignored = warn_simulate_only(load_config(None, [*keys, "aggregation=allreduce"]))
    assert ignored == ["simulate.speed_factors", "simulate.dropout"]
    err = capsys.readouterr().err
    assert "warning" in err and "simulate.speed_factors" in err and "simulate.dropout" in err and "ignored" in err
    assert warn_simulate_only(load_config(None, ["aggregation=allreduce"])) == []


def test_cli_help_lists_ray(capsys):
    from dpeft_launch.cli import main

    with pytest.raises(SystemExit) as info:
        main(["ray", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--address" in out and "key=value" in out


def test_earlier_spellings_of_aggregation_still_read(capsys):
    """`sync.name: allreduce` and `ray.mode` (earlier spellings) select `aggregation`, with a note on stderr."""
    from dpeft.validate import load_config

    assert load_config(None, []).aggregation == "coordinator"
    for old in ("sync.name=allreduce", "ray.mode=allreduce"):
        cfg = load_config(None, [old])
        assert cfg.aggregation == "allreduce" and cfg.sync.name == "sync"
    assert load_config(None, ["ray.mode=actors"]).aggregation == "coordinator"
    with pytest.raises(ConfigError) as info:
        load_config(None, ["ray.mode=allreduce", "aggregation=coordinator"])
    assert info.value.key == "ray.mode"
    with pytest.raises(ConfigError) as info:
        load_config(None, ["aggregation=allreduce", "sync.name=async"])
    assert info.value.key == "sync.name"
