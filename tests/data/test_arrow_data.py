"""data.dataset=hf: Parquet/Arrow files and Hugging Face ``save_to_disk`` directories, read with pyarrow.

The ``save_to_disk`` directories are written here the way ``datasets`` writes them: Arrow *stream*
shards named ``data-0000N-of-0000M.arrow``, ``state.json`` listing them under ``_data_files``,
``dataset_info.json`` with the features (a ClassLabel column keeps integers and its names), and for
a DatasetDict a ``dataset_dict.json`` naming the split directories.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpeft.config import build_config
from dpeft.data import load_run_data
from dpeft.errors import DataError

POS = ["great film", "loved it", "a joy", "wonderful acting", "brilliant", "so good", "fun ride", "moving story"]
NEG = ["boring", "awful plot", "a mess", "dull and long", "terrible", "so bad", "waste of time", "weak script"]


def _table(texts: list[str], labels: list[int]) -> pa.Table:
    return pa.table({"sentence": pa.array(texts, pa.string()), "label": pa.array(labels, pa.int64())})


def save_to_disk(directory: Path, table: pa.Table, shards: int = 1) -> Path:
    """A ``Dataset.save_to_disk`` directory: stream shards, state.json, dataset_info.json (ClassLabel label)."""
    directory.mkdir(parents=True)
    names = []
    per = -(-table.num_rows // shards)
    for i in range(shards):
        name = f"data-{i:05d}-of-{shards:05d}.arrow"
        with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(i * per, per))
        names.append(name)
    features = {"sentence": {"dtype": "string", "_type": "Value"}, "label": {"names": ["neg", "pos"], "_type": "ClassLabel"}}
    (directory / "dataset_info.json").write_text(
        json.dumps({"citation": "", "description": "", "features": features, "homepage": "", "license": ""})
    )
    state = {
        "_data_files": [{"filename": n} for n in names],
        "_fingerprint": "0123456789abcdef",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (directory / "state.json").write_text(json.dumps(state))
    return directory


def _cfg(path: Path, **data: object):
    return build_config(
        {
            "clients": 2,
            "clients_per_round": 2,
            "data": {
                "dataset": "hf",
                "path": str(path),
                "text_column": "sentence",
                "test_examples": 4,
                "min_examples_per_client": 2,
                "partition": "iid",
                **data,
            },
        }
    )


def test_a_saved_dataset_dict_gives_train_and_test_with_class_names(tmp_path: Path) -> None:
    root = tmp_path / "dd"
    save_to_disk(root / "train", _table(POS + NEG, [1] * 8 + [0] * 8), shards=2)
    save_to_disk(root / "test", _table(["nice", "bad"], [1, 0]))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    data = load_run_data(_cfg(root))
    assert data.label_names == ["neg", "pos"]
    assert sorted(data.test.texts) == ["bad", "nice"]  # the test split, not examples held out of train
    assert len(data.train) == 16 and sorted(i for p in data.partitions for i in p) == list(range(16))
    assert {data.train.label_names[y] for t, y in zip(data.train.texts, data.train.labels, strict=True) if t in POS} == {"pos"}


def test_parquet_and_arrow_files_as_classification_and_instructions(tmp_path: Path) -> None:
    pq.write_table(_table(POS + NEG, [1] * 8 + [0] * 8), tmp_path / "train.parquet")
    with (
        pa.OSFile(str(tmp_path / "test.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, _table(["nice", "bad"], [1, 0]).schema) as w,
    ):
        w.write_table(_table(["nice", "bad"], [1, 0]))
    data = load_run_data(_cfg(tmp_path / "train.parquet", test_path=str(tmp_path / "test.arrow")))
    assert data.label_names == ["0", "1"] and sorted(data.test.texts) == ["bad", "nice"]
    pairs = pa.table({"q": ["2+2?", "capital of France?", "3*3?", "sky colour?", "1+1?"], "a": ["4", "Paris", "9", "blue", "2"]})
    pq.write_table(pairs, tmp_path / "qa.parquet")
    cfg = build_config(
        {
            "clients": 1,
            "clients_per_round": 1,
            "model": {"name": "smollm2", "task": "causal_lm"},
            "data": {
                "dataset": "hf",
                "path": str(tmp_path / "qa.parquet"),
                "format": "instruction",
                "prompt_column": "q",
                "response_column": "a",
                "test_examples": 1,
            },
        }
    )
    lm = load_run_data(cfg, tokenizer=object())
    assert lm.train.responses is not None and len(lm.train) + len(lm.test) == 5
    assert set(lm.train.responses + lm.test.responses) == {"4", "Paris", "9", "blue", "2"}


def test_a_bad_arrow_file_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable Parquet file") as err:
        load_run_data(_cfg(bad))
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty: no \.parquet or \.arrow files"):
        load_run_data(_cfg(empty))


def test_a_csv_row_with_too_few_fields_names_file_row_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood,pos\nbad\n")
    with pytest.raises(DataError) as err:
        load_run_data(build_config({"data": {"dataset": "file", "path": str(path)}}))
    msg = str(err.value)
    assert str(path) in msg and "row 2 (line 3)" in msg and "too few fields" in msg and "\n" not in msg
