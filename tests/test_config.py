"""RunConfig: defaults, YAML + overrides, and ConfigError naming the dotted key."""

from __future__ import annotations

import dataclasses

import pytest

from dpeft.codec.updates import registered_codecs
from dpeft.config import RunConfig, check_core, config_to_dict, dump_config
from dpeft.errors import ConfigError
from dpeft.strategies import registered_strategies
from dpeft.validate import config_from_dict, load_config, validate_run


def _error(overrides: list[str] | None = None, path=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides or [])
    return info.value


# ----------------------------------------------------------------- good configs


def test_defaults_validate() -> None:
    cfg = RunConfig()
    check_core(cfg)  # must not raise
    validate_run(cfg)
    loaded = load_config(None, [])
    assert loaded == cfg
    assert cfg.model.name == "minilm" and cfg.adapter.method == "lora" and cfg.data.dataset == "rotten_tomatoes"


def test_dict_round_trip_is_lossless() -> None:
    cfg = load_config(None, ["rounds=7", "adapter.r=4", "strategy.name=fedprox", "strategy.options={mu: 0.1}"])
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg
    assert again.strategy.options == {"mu": 0.1}


def test_yaml_file_plus_overrides(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "rounds: 5\n"
        "clients: 12\n"
        "adapter:\n  r: 4\n  alpha: 8\n"
        "data:\n  partition: dirichlet\n  dirichlet_alpha: 0.5\n"
        "train:\n  lr: 0.001\n"
    )
    cfg = load_config(path, ["rounds=3", "adapter.r=16", "data.partition=iid"])
    assert cfg.rounds == 3  # override wins over the file
    assert cfg.adapter.r == 16
    assert cfg.adapter.alpha == 8  # file value kept where not overridden
    assert cfg.data.partition == "iid"
    assert cfg.data.dirichlet_alpha == 0.5
    assert cfg.clients == 12
    assert cfg.train.lr == pytest.approx(1e-3)
    assert isinstance(cfg.train.lr, float)
    # untouched sections keep their defaults
    assert cfg.train.batch_size == RunConfig().train.batch_size
    # the resolved config dumps and reloads to the same thing
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_config(cfg))
    assert load_config(dumped) == cfg


def test_int_accepted_for_float_field() -> None:
    cfg = load_config(None, ["train.lr=1", "strategy.server_lr=2"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_scientific_notation_learning_rate(tmp_path) -> None:
    """PyYAML (YAML 1.1) reads ``1e-3`` as a string; a learning rate written that way must still work."""
    cfg = load_config(None, ["train.lr=1e-3"])
    assert cfg.train.lr == pytest.approx(1e-3)
    path = tmp_path / "sci.yaml"
    path.write_text("train:\n  lr: 5e-4\n")
    assert load_config(path).train.lr == pytest.approx(5e-4)


def test_optional_fields_accept_null() -> None:
    cfg = load_config(None, ["data.max_train_examples=null", "train.max_grad_norm=null", "adapter.target_modules=[query]"])
    assert cfg.data.max_train_examples is None and cfg.train.max_grad_norm is None
    assert cfg.adapter.target_modules == ["query"]


# ----------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "override, key",
    [
        ("bogus=1", "bogus"),
        ("train.bogus=1", "train.bogus"),
        ("data.text_colum=x", "data.text_colum"),
        ("adapter.rank=8", "adapter.rank"),
    ],
)
def test_unknown_key_override_names_dotted_key(override: str, key: str) -> None:
    err = _error([override])
    assert err.key == key
    assert key in str(err)
    assert "unknown" in str(err)


def test_unknown_nested_key_in_file_names_dotted_key(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rounds: 2\nstrategy:\n  name: fedavg\n  sever_lr: 0.5\n")
    err = _error(path=path)
    assert err.key == "strategy.sever_lr"
    assert "strategy.sever_lr" in str(err)


def test_unknown_top_level_key_in_file(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rounds: 2\nroundz: 3\n")
    err = _error(path=path)
    assert err.key == "roundz" and "roundz" in str(err)


# ----------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["rounds=abc"], "rounds"),
        (["train.lr=[1]"], "train.lr"),
        (["rounds=1.5"], "rounds"),
        (["rounds=true"], "rounds"),
        (["train.keep_optimizer_state=3"], "train.keep_optimizer_state"),
        (["model.name=[minilm]"], "model.name"),
        (["adapter.target_modules=query"], "adapter.target_modules"),
        (["train=5"], "train"),
        (["data.max_train_examples=many"], "data.max_train_examples"),
    ],
)
def test_wrong_type_names_key(overrides: list[str], key: str) -> None:
    err = _error(overrides)
    assert err.key == key
    assert key in str(err)


def test_wrong_type_error_is_exit_code_2() -> None:
    assert _error(["rounds=abc"]).exit_code == 2


def test_override_without_equals_sign() -> None:
    err = _error(["rounds"])
    assert "key=value" in str(err)


# ----------------------------------------------------------------- impossible values


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["clients_per_round=20", "clients=10"], "clients_per_round"),
        (["rounds=0"], "rounds"),
        (["rounds=-3"], "rounds"),
        (["train.lr=0"], "train.lr"),
        (["train.batch_size=0"], "train.batch_size"),
        (["data.dirichlet_alpha=-1"], "data.dirichlet_alpha"),
        (["data.partition=zipf"], "data.partition"),
        (["model.task=regression"], "model.task"),
        (["simulate.start=thread"], "simulate.start"),
        (["data.dataset=file"], "data.path"),
        (["transport.chunk_bytes=999999999"], "transport.chunk_bytes"),
        (["transport.chunk_bytes=4"], "transport.chunk_bytes"),  # meant as 4 MiB: in bytes, it would be 4
        (["split.chunk_bytes=100"], "split.chunk_bytes"),
    ],
)
def test_impossible_values_name_key(overrides: list[str], key: str) -> None:
    err = _error(overrides)
    assert err.key == key, str(err)
    assert key in str(err)


def test_clients_per_round_equal_to_clients_is_fine() -> None:
    cfg = load_config(None, ["clients=3", "clients_per_round=3"])
    assert cfg.clients_per_round == cfg.clients == 3


# ----------------------------------------------------------------- files


def test_bad_yaml_file(tmp_path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("rounds: [1, 2\nadapter: {r: 4\n")
    err = _error(path=path)
    assert "YAML" in str(err) and str(path) in str(err)


def test_yaml_file_that_is_not_a_mapping(tmp_path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    assert "mapping" in str(_error(path=path))


def test_missing_config_file(tmp_path) -> None:
    err = _error(path=tmp_path / "nope.yaml")
    assert "nope.yaml" in str(err)


def test_empty_yaml_file_gives_defaults(tmp_path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == RunConfig()


# ----------------------------------------------------------------- registries


def test_unknown_strategy_name() -> None:
    err = _error(["strategy.name=fedmagic"])
    assert err.key == "strategy.name"
    assert "fedmagic" in str(err) and "fedavg" in str(err)  # lists what is available


def test_unknown_adapter_method() -> None:
    err = _error(["adapter.method=superlora"])
    assert err.key == "adapter.method"
    assert "superlora" in str(err) and "lora" in str(err)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prompt_tuning"])
def test_known_adapter_methods_validate(method: str) -> None:
    assert load_config(None, [f"adapter.method={method}"]).adapter.method == method


def test_known_strategy_validates() -> None:
    assert load_config(None, ["strategy.name=fedadam"]).strategy.name == "fedadam"


def test_every_field_has_help() -> None:
    def walk(cls) -> None:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help string"
            if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
                walk(type(getattr(cls(), f.name)))

    walk(RunConfig)
    for registered in [*registered_strategies().values(), *registered_codecs().values()]:
        walk(registered.options)
