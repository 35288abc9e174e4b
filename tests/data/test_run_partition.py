"""How a run's data is split among clients (data.partition auto/iid/dirichlet/column), and the
data settings a run would ignore, refused at load naming the key."""

from __future__ import annotations

import csv
import json

import pytest

from dpeft.config.data_checks import resolve_partition
from dpeft.data import column_partition, load_run_data
from dpeft.errors import ConfigError
from dpeft.validate import load_config

LM = ["model.name=smollm2", "model.task=causal_lm"]


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _instruction_rows(n: int = 40) -> list[dict]:
    return [{"prompt": f"q{i}", "response": f"a{i}", "user": f"u{i % 7}", "kind": "even" if i % 2 else "odd"} for i in range(n)]


# ---------------------------------------------------------------------- column partition


def test_column_partition_keeps_each_value_on_one_client() -> None:
    groups = [f"u{i % 9}" for i in range(90)] + ["big"] * 30
    shards = column_partition(groups, 4, seed=0)
    assert sorted(i for s in shards for i in s) == list(range(len(groups)))
    owner = {}
    for c, shard in enumerate(shards):
        for i in shard:
            assert owner.setdefault(groups[i], c) == c, f"value {groups[i]} split over clients"
    sizes = sorted(len(s) for s in shards)
    assert sizes[0] >= 20 and sizes[-1] == 30  # even-ish: the big value alone, the others dealt around it
    assert column_partition(groups, 4, seed=0) == shards
    assert any(column_partition(groups, 4, seed=s) != shards for s in range(1, 5))


def test_column_partition_needs_a_value_per_client() -> None:
    with pytest.raises(ConfigError) as info:
        column_partition(["a", "b", "a"], 3, seed=0)
    assert info.value.key == "data.partition_column" and "2 distinct values" in str(info.value)


def test_partition_column_from_a_file(tmp_path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", _instruction_rows(70))
    cfg = load_config(
        None,
        [
            *LM,
            "data.dataset=file",
            f"data.path={path}",
            "data.format=instruction",
            "data.partition_column=user",
            "clients=3",
            "clients_per_round=3",
            "data.test_examples=7",
        ],
    )
    assert resolve_partition(cfg) == "column"  # auto with a partition column
    data = load_run_data(cfg)
    users = [{data.train.groups[i] for i in shard} for shard in data.partitions]
    assert all(users) and not (users[0] & users[1] or users[0] & users[2] or users[1] & users[2])
    assert set().union(*users) == {f"u{k}" for k in range(7)}
    # CSV too, and a classification file
    csv_path = tmp_path / "d.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "label", "site"])
        w.writeheader()
        w.writerows({"text": f"t{i}", "label": i % 2, "site": f"s{i % 4}"} for i in range(40))
    cfg = load_config(
        None,
        [
            "data.dataset=file",
            f"data.path={csv_path}",
            "data.partition=column",
            "data.partition_column=site",
            "clients=4",
            "data.test_examples=4",
        ],
    )
    data = load_run_data(cfg)
    assert data.train.groups is not None
    sites = [{data.train.groups[i] for i in shard} for shard in data.partitions]
    assert sorted(len(s) for s in sites) == [1, 1, 1, 1] and len(set().union(*sites)) == 4


# ---------------------------------------------------------------------- auto


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], "dirichlet"),  # classification
        (LM, "iid"),  # plain text of an LM corpus
        ([*LM, "data.format=instruction"], "dirichlet"),  # built-in corpus as instructions keeps its classes
        ([*LM, "data.format=chat", "data.dataset=reuters_r8"], "dirichlet"),
        ([*LM, "data.format=instruction", "data.dataset=file", "data.path=x.jsonl"], "iid"),
        ([*LM, "data.format=instruction", "data.dataset=file", "data.path=x.jsonl", "data.label_column=kind"], "dirichlet"),
        ([*LM, "data.dataset=file", "data.path=x.jsonl", "data.partition_column=user"], "column"),
        ([*LM, "data.partition=dirichlet"], "dirichlet"),  # explicit, over the corpus labels
    ],
)
def test_partition_auto(overrides: list[str], expected: str) -> None:
    assert resolve_partition(load_config(None, overrides)) == expected


def test_readme_causal_lm_example_loads_and_partitions() -> None:
    """The getting-started guide's causal-LM line with a small training set: split IID among the 10 default clients."""
    cfg = load_config(None, ["model.name=smollm2", "model.task=causal_lm", "data.max_train_examples=64"])
    data = load_run_data(cfg)
    assert data.format == "text" and data.train.responses is None
    assert len(data.partitions) == 10 and sorted(len(p) for p in data.partitions) == [6] * 6 + [7] * 4
    inst = load_run_data(
        load_config(None, [*LM, "data.format=instruction", "data.max_train_examples=800", "data.test_examples=50"])
    )
    assert len(inst.partitions) == 10 and min(len(p) for p in inst.partitions) >= 16


def test_instruction_file_dirichlet_over_a_label_column(tmp_path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", _instruction_rows(200))
    cfg = load_config(
        None,
        [
            *LM,
            "data.dataset=file",
            f"data.path={path}",
            "data.format=instruction",
            "data.label_column=kind",
            "clients=4",
            "data.min_examples_per_client=5",
        ],
    )
    data = load_run_data(cfg)
    assert data.train.label_names == ["even", "odd"] and data.num_labels is None
    assert len(data.partitions) == 4 and min(len(p) for p in data.partitions) >= 5


# ---------------------------------------------------------------------- ignored settings are errors


@pytest.mark.parametrize(
    "overrides, key",
    [
        ([*LM, "data.dataset=file", "data.path=x.csv", "data.label_column=response"], "data.label_column"),
        ([*LM, "data.dirichlet_alpha=0.3"], "data.dirichlet_alpha"),
        ([*LM, "data.min_examples_per_client=4"], "data.min_examples_per_client"),
        (["data.partition=iid", "data.dataset=file", "data.path=x.csv", "data.partition_column=user"], "data.partition_column"),
        (["data.partition=column"], "data.partition_column"),
        (
            [*LM, "data.format=instruction", "data.dataset=file", "data.path=x.jsonl", "data.partition=dirichlet"],
            "data.partition",
        ),
        (
            [
                *LM,
                "data.format=instruction",
                "data.dataset=file",
                "data.path=x.jsonl",
                "data.partition=iid",
                "data.label_column=kind",
            ],
            "data.label_column",
        ),
        (
            [*LM, "data.format=instruction", "data.dataset=file", "data.path=x.jsonl", "data.text_column=question"],
            "data.text_column",
        ),
        (
            [*LM, "data.format=instruction", "data.dataset=file", "data.path=x.jsonl", "data.messages_column=conv"],
            "data.messages_column",
        ),
        (["data.dataset=file", "data.path=x.csv", "data.prompt_column=q"], "data.prompt_column"),
        ([*LM, "data.system_prompt=hi"], "data.system_prompt"),
        ([*LM, "data.format=instruction", "data.instruction=no placeholder"], "data.instruction"),
        (["data.path=reviews.csv"], "data.path"),
        (["data.text_column=review"], "data.text_column"),
        (["data.format=chat"], "data.format"),
        ([*LM, "data.format=classification"], "data.format"),
        (["data.format=tabular"], "data.format"),
    ],
)
def test_ignored_or_contradictory_settings_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key, str(info.value)


def test_explicit_iid_keeps_a_file_alpha() -> None:
    """An explicit partition choice on the command line over a config that tunes Dirichlet is fine."""
    cfg = load_config(None, ["data.partition=iid", "data.dirichlet_alpha=0.5"])
    assert resolve_partition(cfg) == "iid"


def test_split_mode_refuses_instruction_data() -> None:
    from dpeft.split.config import validate_run_for_split

    with pytest.raises(ConfigError) as info:
        validate_run_for_split(load_config(None, [*LM, "data.format=instruction"]))
    assert info.value.key == "data.format"
    validate_run_for_split(load_config(None, LM))  # plain text still runs split


def test_a_workers_own_instruction_file(tmp_path) -> None:
    from dpeft.data import load_client_file

    path = _jsonl(tmp_path / "mine.jsonl", _instruction_rows(5))
    cfg = load_config(None, [*LM, "data.format=instruction", "data.partition=iid"])
    own = load_client_file(cfg, path, None)
    assert own.responses == [f"a{i}" for i in range(5)]
    assert own.texts[2] == "q2\n\nResponse:\n"


def test_a_resolved_config_of_an_earlier_version_still_loads() -> None:
    """Resolved configs written before data.label_column defaulted to null carry `label_column: label`."""
    from dpeft.config import config_to_dict
    from dpeft.validate import config_from_dict

    for overrides in ([], LM):
        tree = config_to_dict(load_config(None, overrides))
        tree["data"].update(label_column="label", partition="dirichlet")
        cfg = config_from_dict(tree)
        assert resolve_partition(cfg) == "dirichlet"
