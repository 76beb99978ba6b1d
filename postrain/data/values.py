"""Read local data files row by row and check their values, so that a bad row is an error naming the file, the
row (its line in a .jsonl or .csv file) and the column, before anything is written.

Without these checks a null prompt, a number where text is expected, a JSON array on a .jsonl line or a CSV row
with an extra field surfaced as a pyarrow or tokenizer traceback once the run directory existed, or not at all (a
CSV row's extra field was dropped by csv.DictReader; a row missing a column became a null).

Two checks:
  - `read_file_rows`: the file's rows with a label per row ("line 7", "record 3", "row 12"): UTF-8, one mapping
    per row, CSV rows with as many fields as the header, a parquet file pyarrow can read. Then, before the rows
    become a `datasets.Dataset`, `check_consistent_kinds`: a column holds one kind of value (text, number,
    list, mapping) in every row (pyarrow cannot build a column of mixed kinds).
  - `check_job_values`: the columns a job reads hold what it reads (`VALUE_KINDS`): text or chat turns for
    prompts and completions, a bool label, finite numeric scores; no null, no NaN, no missing column in any row.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable

from postrain.errors import DataError

# What a job reads from a column (postrain.data.sources.JOB_COLUMNS and the DPO shapes' columns).
TEXT_OR_TURNS = "text or a list of chat turns ({role, content} mappings)"
VALUE_KINDS: dict[str, str] = {
    "prompt": TEXT_OR_TURNS,
    "completion": TEXT_OR_TURNS,
    "chosen": TEXT_OR_TURNS,
    "rejected": TEXT_OR_TURNS,
    "messages": "a non-empty list of chat turns ({role, content} mappings)",
    "text": "text",
    "completions": "a list of completions (each text or a list of chat turns)",
    "scores": "a list of finite numbers",
    "label": "true or false",
    "score_chosen": "a finite number",
    "score_rejected": "a finite number",
}


# -- reading ------------------------------------------------------------------------------------------------------


def decode_utf8(raw: bytes, src: str) -> str:
    """The file's text; a DataError naming the line and byte of the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{src}, line {line}: byte 0x{raw[e.start]:02x} (offset {e.start}) is not UTF-8 text; "
                        f"save the file as UTF-8") from None


def read_file_rows(path: Path, src: str, split: str) -> tuple[list[dict], list[str]]:
    """The rows of a local .jsonl / .json / .csv / .parquet file and a label for each ("line 3")."""
    suffix = path.suffix
    if suffix == ".parquet":
        return _parquet_rows(path, src)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise DataError(f"data file {src} is a directory") from None
    except OSError as e:
        raise DataError(f"cannot read data file {src}: {e.strerror or e}") from None
    text = decode_utf8(raw, src)
    if suffix == ".jsonl":
        return _jsonl_rows(text, src)
    if suffix == ".json":
        return _json_rows(text, src, split)
    if suffix == ".csv":
        return _csv_rows(text, src)
    raise AssertionError(suffix)


def _jsonl_rows(text: str, src: str) -> tuple[list[dict], list[str]]:
    rows, labels = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{src}, line {number}: not valid JSON: {e}") from None
        if not isinstance(row, dict):
            raise DataError(f"{src}, line {number}: expected one JSON object (a mapping of column -> value) per "
                            f"line, got {_kind(row)} {_short(row)}")
        rows.append(row)
        labels.append(f"line {number}")
    return rows, labels


def _json_rows(text: str, src: str, split: str) -> tuple[list[dict], list[str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{src}: not valid JSON: {e}") from None
    if isinstance(data, dict) and split in data:
        data = data[split]
    if not isinstance(data, list):
        raise DataError(f"{src}: expected a list of records (or a mapping of split -> list)")
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{src}, record {index}: expected a JSON object (a mapping of column -> value), got "
                            f"{_kind(row)} {_short(row)}")
    return data, [f"record {index}" for index in range(len(data))]


def _csv_rows(text: str, src: str) -> tuple[list[dict], list[str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DataError(f"{src}, line 1: not valid CSV: {e}") from None
    if header is None:
        return [], []
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise DataError(f"{src}, line 1: the header names column {duplicated[0]!r} twice")
    rows, labels = [], []
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{src}, line {reader.line_num}: not valid CSV: {e}") from None
        if not fields:  # a blank line
            continue
        if len(fields) != len(header):
            more = len(fields) > len(header)
            hint = "quote a field that holds a comma" if more else "a field is missing (or its quotes run on)"
            raise DataError(f"{src}, line {reader.line_num}: {len(fields)} field{'s' if len(fields) != 1 else ''}, "
                            f"{'more' if more else 'fewer'} than the header's {len(header)} columns "
                            f"({', '.join(header)}); {hint}")
        rows.append(dict(zip(header, fields)))
        labels.append(f"line {reader.line_num}")
    return rows, labels


def _parquet_rows(path: Path, src: str) -> tuple[list[dict], list[str]]:
    # slow: pyarrow, only for a parquet file
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{src}: not a readable parquet file ({' '.join(str(e).split())[:200]})") from None
    return rows, [f"row {index}" for index in range(len(rows))]


# -- values -------------------------------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _family(value: Any) -> str | None:
    """The kind pyarrow builds one column of (None for null and NaN, which fit any column)."""
    kind = _kind(value)
    return None if kind in ("null", "NaN") else kind


def check_consistent_kinds(rows: list[dict], labels: list[str], src: str) -> None:
    """Every column holds one kind of value over the rows (nulls aside), which a `datasets.Dataset` needs."""
    first: dict[str, tuple[str, str]] = {}
    for row, label in zip(rows, labels):
        for column, value in row.items():
            kind = _family(value)
            if kind is None:
                continue
            seen = first.setdefault(column, (kind, label))
            if seen[0] != kind:
                raise DataError(f"{src}, {label}, column {column!r}: {kind} {_short(value)}, but {seen[1]} holds "
                                f"{seen[0]} in that column; a column holds one kind of value")


def _is_turn(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("role"), str) and "content" in value


def _text_or_turns(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and bool(value) and all(map(_is_turn, value)))


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


VALUE_CHECKS = {
    TEXT_OR_TURNS: _text_or_turns,
    VALUE_KINDS["messages"]: lambda v: isinstance(v, list) and bool(v) and all(map(_is_turn, v)),
    "text": lambda v: isinstance(v, str),
    VALUE_KINDS["completions"]: lambda v: isinstance(v, list) and bool(v) and all(map(_text_or_turns, v)),
    VALUE_KINDS["scores"]: lambda v: isinstance(v, list) and bool(v) and all(map(_finite_number, v)),
    "true or false": lambda v: isinstance(v, bool),
    "a finite number": _finite_number,
}


def check_job_values(rows: Iterable[dict], labels: Iterable[str], columns: list[str], where: str,
                     source: str, mapped: dict[str, str] | None = None) -> None:
    """Each of `columns` (the job's) holds, in every row, what the job reads (VALUE_KINDS). `mapped`: target ->
    the file's column name, to name the column as the file has it."""
    checked = [c for c in columns if c in VALUE_KINDS]
    if not checked:
        return
    original = {target: name for target, name in (mapped or {}).items()}
    for row, label in zip(rows, labels):
        for column in checked:
            name = original.get(column, column)
            shown = f"column {name!r}" + (f" (mapped to {column!r})" if name != column else "")
            if column not in row:
                raise DataError(f"{where}: {source}, {label} has no {shown}; every row needs it")
            value = row[column]
            expected = VALUE_KINDS[column]
            if not VALUE_CHECKS[expected](value):
                found = _kind(value)
                got = found if found in ("null", "NaN") else f"{found} {_short(value)}"
                raise DataError(f"{where}: {source}, {label}, {shown}: expected {expected}, got {got}")
