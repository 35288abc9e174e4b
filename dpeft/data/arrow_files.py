"""Columnar data: Parquet and Arrow files, and Hugging Face ``datasets`` directories, read with pyarrow.

What ``data.path`` may name (``data.dataset=hf``, or ``file`` with one of these):

- a Parquet file (``.parquet``) or an Arrow IPC file or stream (``.arrow``, ``.feather``, ``.ipc``);
- a directory written by ``Dataset.save_to_disk``: Arrow stream shards listed in its
  ``state.json`` (``_data_files``), column types in ``dataset_info.json``; ``ClassLabel``
  columns (integers there) are read as their class names;
- a directory written by ``DatasetDict.save_to_disk`` (``dataset_dict.json`` names the splits,
  one such directory per split): ``train`` is the training data and, unless ``data.test_path``
  is set, ``test`` (or ``validation``) the held-out set;
- any other directory of ``.parquet``/``.arrow`` files (read in name order).

The ``datasets`` package is not needed and nothing is downloaded. Rows come back as
``(where, row)`` pairs like the CSV/JSONL reader's (``row N`` counts from 1 over all the files of a
directory); a file pyarrow cannot read is a DataError naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpeft.errors import DataError

TABLE_SUFFIXES = (".parquet", ".arrow", ".feather", ".ipc")
#: the splits of a DatasetDict directory used as held-out data, in order of preference
TEST_SPLITS = ("test", "validation")


def is_table_source(path: str | Path) -> bool:
    """True for a directory or a Parquet/Arrow file (read here rather than as CSV/JSONL)."""
    p = Path(path)
    return p.is_dir() or p.suffix.lower() in TABLE_SUFFIXES


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from None


def dataset_dict_splits(path: str | Path) -> list[str] | None:
    """The split names of a ``DatasetDict.save_to_disk`` directory (None: not one)."""
    marker = Path(path) / "dataset_dict.json"
    if not marker.is_file():
        return None
    splits = _json(marker).get("splits") if isinstance(_json(marker), dict) else None
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise DataError(f"{marker}: expected {{'splits': [names...]}}")
    return splits


def resolve_splits(path: str, test_path: str | None) -> tuple[str, str | None]:
    """(train, test) paths when ``path`` is a DatasetDict directory; else the two unchanged."""
    splits = dataset_dict_splits(path)
    if splits is None:
        return path, test_path
    if "train" not in splits:
        raise DataError(
            f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(splits)}); point data.path at a split"
        )
    if test_path is None:
        test_path = next((str(Path(path) / s) for s in TEST_SPLITS if s in splits), None)
    return str(Path(path) / "train"), test_path


def _shards(directory: Path) -> list[Path]:
    """The data files of a directory: ``state.json``'s list for a saved Dataset, else every table file."""
    if dataset_dict_splits(directory) is not None:
        raise DataError(
            f"{directory}: a DatasetDict directory; use it as data.path (train/test splits) or name one split's directory"
        )
    state = directory / "state.json"
    if state.is_file():
        listed = _json(state).get("_data_files") if isinstance(_json(state), dict) else None
        if not isinstance(listed, list) or not listed:
            raise DataError(f"{state}: no _data_files listed")
        files = [directory / str(entry.get("filename", "")) for entry in listed if isinstance(entry, dict)]
        for f in files:
            if not f.is_file():
                raise DataError(f"{state}: lists {f.name}, which is missing")
        return files
    files = sorted(f for f in directory.iterdir() if f.suffix.lower() in TABLE_SUFFIXES)
    if not files:
        raise DataError(f"{directory}: no .parquet or .arrow files (nor a Hugging Face save_to_disk layout)")
    return files


def _read_table(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            return pq.read_table(path)
        with pa.memory_map(str(path)) as source:
            try:
                return pa.ipc.open_file(source).read_all()
            except pa.ArrowInvalid:  # save_to_disk writes the stream format
                source.seek(0)
                return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "Parquet" if path.suffix.lower() == ".parquet" else "Arrow"
        raise DataError(f"{path}: not a readable {kind} file ({first})") from None


def _class_names(directory: Path) -> dict[str, list[str]]:
    """ClassLabel columns of a saved Dataset (``dataset_info.json``): column -> class names."""
    info = directory / "dataset_info.json"
    if not info.is_file():
        return {}
    features = _json(info).get("features") if isinstance(_json(info), dict) else None
    out: dict[str, list[str]] = {}
    if isinstance(features, dict):
        for name, feature in features.items():
            if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list):
                out[name] = [str(n) for n in feature["names"]]
    return out


def read_table_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) pairs of a Parquet/Arrow file or a dataset directory (see the module docstring)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {p}")
    files = _shards(p) if p.is_dir() else [p]
    names = _class_names(p) if p.is_dir() else {}
    rows: list[tuple[str, dict[str, Any]]] = []
    for f in files:
        for row in _read_table(f).to_pylist():
            for col, classes in names.items():
                value = row.get(col)
                if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(classes):
                    row[col] = classes[value]
            where = f"row {len(rows) + 1}" if len(files) == 1 else f"row {len(rows) + 1} ({f.name})"
            rows.append((where, row))
    if not rows:
        raise DataError(f"{p}: no examples")
    return rows
