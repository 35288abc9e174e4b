"""Reading user data files: CSV/TSV (header row) or JSONL (one JSON object per line) into rows
(Parquet/Arrow files and dataset directories: :mod:`dpeft.data.arrow_files`).

Every row keeps the number a user would look for in an error message: the line number for JSONL,
the data row number (1 = the first row after the header) for CSV.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from dpeft.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def read_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) pairs of a CSV/TSV/JSONL file; ``where`` reads ``line N`` (JSONL) or ``row N`` (CSV)."""
    from dpeft.data.arrow_files import is_table_source, read_table_rows

    p = Path(path)
    if p.exists() and is_table_source(p):  # Parquet/Arrow files, Hugging Face dataset directories
        return read_table_rows(p)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    suffix = p.suffix.lower()
    if suffix not in (*JSONL_SUFFIXES, ".csv", ".tsv"):
        raise DataError(f"{p}: unsupported file type {suffix!r} (use .csv, .tsv, .jsonl, .parquet or .arrow)")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 text ({exc})") from None
    rows: list[tuple[str, dict[str, Any]]] = []
    if suffix in JSONL_SUFFIXES:
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{n}: each line must be a JSON object")
            rows.append((f"line {n}", obj))
    else:
        reader = csv.DictReader(io.StringIO(raw), delimiter="\t" if suffix == ".tsv" else ",")
        for n, r in enumerate(reader, 1):
            if None in r.values():  # DictReader fills the missing trailing fields with None
                have = sum(v is not None for v in r.values())
                raise DataError(
                    f"{p}: row {n} (line {reader.line_num}) has too few fields: {have} of the header's {len(r)} ({', '.join(map(str, r))})"
                )
            rows.append((f"row {n}", dict(r)))
    if not rows:
        raise DataError(f"{p}: no examples")
    return rows


def column(path: str | Path, where: str, row: dict[str, Any], name: str) -> Any:
    """``row[name]``, or a DataError naming the file, the row and the columns it does have."""
    if name not in row:
        raise DataError(f"{path}: {where} has no column {name!r} (columns: {', '.join(map(str, row))})")
    return row[name]


def text_value(path: str | Path, where: str, row: dict[str, Any], name: str, allow_empty: bool = True) -> str:
    """A text column's value (a DataError unless it is a string, and non-blank unless ``allow_empty``)."""
    value = column(path, where, row, name)
    if not isinstance(value, str):
        raise DataError(f"{path}: {where}: column {name!r} must be text, got {value!r}")
    if not allow_empty and not value.strip():
        raise DataError(f"{path}: {where}: column {name!r} is empty")
    return value


def label_value(path: str | Path, where: str, row: dict[str, Any], name: str) -> str:
    """A label/group column's value as text (strings and integers; a DataError otherwise)."""
    value = column(path, where, row, name)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{path}: {where}: column {name!r} must be a string or an integer, got {value!r}")
    return str(value)
