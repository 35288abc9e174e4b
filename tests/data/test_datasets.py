"""Datasets: the embedded rotten tomatoes corpus and user CSV/JSONL files."""

from __future__ import annotations

import json

import pytest

from dpeft.config import DataConfig
from dpeft.data import load_dataset, load_text_file
from dpeft.errors import DataError
from dpeft.validate import load_config

# ---------------------------------------------------------------------- rotten tomatoes


@pytest.fixture(scope="module")
def rt_full():
    return load_dataset(DataConfig(test_examples=300), seed=0)


def test_rotten_tomatoes_shape(rt_full) -> None:
    train, test = rt_full
    assert train.label_names == test.label_names
    assert len(train.label_names) == 2
    assert set(train.labels) == {0, 1}
    assert len(train) + len(test) > 10_000
    assert len(test) == 300
    assert all(isinstance(t, str) and t for t in train.texts[:50])
    # both classes are well represented
    frac = sum(train.labels) / len(train)
    assert 0.3 < frac < 0.7


def test_rotten_tomatoes_test_disjoint_from_train(rt_full) -> None:
    train, test = rt_full
    # texts can repeat in the corpus; compare multisets of (text, label) by position-free identity
    train_set = set(zip(train.texts, train.labels, strict=True))
    overlap = [p for p in zip(test.texts, test.labels, strict=True) if p in train_set]
    # duplicates inside the corpus are rare; an overlapping split would share ~all 300
    assert len(overlap) <= 3


def test_rotten_tomatoes_seeded_and_capped() -> None:
    cfg = DataConfig(max_train_examples=100, test_examples=40)
    a_train, a_test = load_dataset(cfg, seed=3)
    b_train, b_test = load_dataset(cfg, seed=3)
    c_train, _ = load_dataset(cfg, seed=4)
    assert len(a_train) == 100 and len(a_test) == 40
    assert a_train.texts == b_train.texts and a_test.texts == b_test.texts
    assert a_train.texts != c_train.texts
    assert not set(a_test.texts) & set(a_train.texts)


def test_test_split_does_not_depend_on_train_cap() -> None:
    _, t1 = load_dataset(DataConfig(max_train_examples=50, test_examples=40), seed=0)
    _, t2 = load_dataset(DataConfig(max_train_examples=500, test_examples=40), seed=0)
    assert t1.texts == t2.texts


# ---------------------------------------------------------------------- user files


def _rows(n: int = 30) -> list[dict]:
    return [
        {"review": f"text number {i} {'good' if i % 2 else 'bad'}", "sentiment": "pos" if i % 2 else "neg", "extra": i}
        for i in range(n)
    ]


def _write_csv(path, rows, columns=("review", "sentiment", "extra")) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns))
        w.writeheader()
        for r in rows:
            w.writerow({c: r[c] for c in columns})


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_user_file_with_custom_columns(tmp_path, fmt: str) -> None:
    path = tmp_path / f"data.{fmt}"
    rows = _rows(30)
    (_write_csv if fmt == "csv" else _write_jsonl)(path, rows)
    cfg = load_config(
        None,
        [
            "data.dataset=file",
            f"data.path={path}",
            "data.text_column=review",
            "data.label_column=sentiment",
            "data.test_examples=5",
        ],
    )
    train, test = load_dataset(cfg.data, seed=0)
    assert train.label_names == ["neg", "pos"]
    assert len(test) == 5 and len(train) == 25
    all_texts = sorted(train.texts + test.texts)
    assert all_texts == sorted(r["review"] for r in rows)
    assert not set(train.texts) & set(test.texts)
    # labels line up with their texts
    truth = {r["review"]: r["sentiment"] for r in rows}
    for text, lab in zip(train.texts + test.texts, train.labels + test.labels, strict=True):
        assert train.label_names[lab] == truth[text]


def test_user_file_integer_labels_sorted_numerically(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    _write_jsonl(path, [{"text": f"t{i}", "label": [2, 10, 1][i % 3]} for i in range(30)])
    train, _ = load_dataset(DataConfig(dataset="file", path=str(path), test_examples=3), seed=0)
    assert train.label_names == ["1", "2", "10"]


def test_user_file_separate_test_file(tmp_path) -> None:
    tr, te = tmp_path / "train.csv", tmp_path / "test.csv"
    _write_csv(tr, _rows(20))
    _write_csv(te, [dict(r, review="held out " + r["review"]) for r in _rows(8)])
    cfg = DataConfig(
        dataset="file", path=str(tr), test_path=str(te), text_column="review", label_column="sentiment", test_examples=100
    )
    train, test = load_dataset(cfg, seed=0)
    assert len(train) == 20 and len(test) == 8
    assert all(t.startswith("held out") for t in test.texts)


def test_missing_file(tmp_path) -> None:
    cfg = DataConfig(dataset="file", path=str(tmp_path / "absent.csv"))
    with pytest.raises(DataError) as info:
        load_dataset(cfg, seed=0)
    assert "absent.csv" in str(info.value)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_missing_column_is_named(tmp_path, fmt: str) -> None:
    path = tmp_path / f"d.{fmt}"
    (_write_csv if fmt == "csv" else _write_jsonl)(path, _rows(10))
    cfg = DataConfig(dataset="file", path=str(path), text_column="review", label_column="stars")
    with pytest.raises(DataError) as info:
        load_dataset(cfg, seed=0)
    assert "'stars'" in str(info.value)


def test_bad_json_line_names_line_number(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(6)]
    lines[3] = '{"text": "broken", "label": '  # line 4
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_text_file(path, "text", "label")
    assert f"{path}:4:" in str(info.value)


def test_json_line_that_is_not_an_object(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 0}\n[1, 2]\n')
    with pytest.raises(DataError) as info:
        load_text_file(path, "text", "label")
    assert ":2:" in str(info.value)


def test_single_label_file(tmp_path) -> None:
    path = tmp_path / "d.csv"
    _write_csv(path, [dict(r, sentiment="pos") for r in _rows(20)])
    cfg = DataConfig(dataset="file", path=str(path), text_column="review", label_column="sentiment")
    with pytest.raises(DataError) as info:
        load_dataset(cfg, seed=0)
    assert "sentiment" in str(info.value) and "2" in str(info.value)


def test_unsupported_extension(tmp_path) -> None:
    path = tmp_path / "d.parquet"
    path.write_text("x")
    with pytest.raises(DataError):
        load_text_file(path, "text", "label")


def test_empty_file(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError) as info:
        load_text_file(path, "text", "label")
    assert "no examples" in str(info.value)


def test_errors_are_exit_code_2(tmp_path) -> None:
    with pytest.raises(DataError) as info:
        load_text_file(tmp_path / "nope.csv", "text", "label")
    assert info.value.exit_code == 2
