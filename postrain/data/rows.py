"""Reading a source's rows and the row helpers the data transforms share: the files and built-in tasks a source
names, prompts grouped with their scored samples, and the prompt formatting (template, chat turns) of a source.

Sources: `builtin:<task>` (postrain.data.tasks), local .jsonl / .json / .csv / .parquet files, or hub datasets
(name, config, split; passed to `datasets.load_dataset` untouched, for users with network).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from postrain.data import thoughts  # noqa: F401  (registers builtin:arithmetic_thoughts)
from postrain.data.source_spec import SourceSpec, describe
from postrain.data.tasks import build_task
from postrain.data.values import check_consistent_kinds, read_file_rows
from postrain.errors import DataError

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def read_rows(spec: SourceSpec) -> list[dict] | Any:
    return read_labelled_rows(spec)[0]


def read_labelled_rows(spec: SourceSpec) -> tuple[list[dict] | Any, list[str] | None]:
    """The source's rows and, for a local file, a label per row naming where it is ("line 7"), checked row by row
    (postrain.data.values); a hub dataset comes back as a `datasets.Dataset` with no labels."""
    src = spec.source
    if src.startswith("builtin:"):
        rows = build_task(src.removeprefix("builtin:"), spec.split, dict(spec.task))
        return rows, [f"row {index}" for index in range(len(rows))]
    path = Path(src).expanduser()
    if path.suffix in FILE_SUFFIXES or path.exists():
        if not path.exists():
            raise DataError(f"data file not found: {src}")
        if path.suffix not in FILE_SUFFIXES:
            raise DataError(f"{src}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")
        rows, labels = read_file_rows(path, src, spec.split)
        check_consistent_kinds(rows, labels, src)
        return rows, labels
    import datasets  # slow to import: only for a hub dataset

    try:
        return datasets.load_dataset(src, spec.config, split=spec.split), None
    except Exception as e:  # network, missing dataset, bad split: all the user's to fix
        raise DataError(f"cannot load hub dataset {describe(spec)}: {e}") from None


def require_columns(rows: list[dict], columns, where: str, transform: str, hint: str = "") -> None:
    """A DataError naming the first of `columns` the rows lack (`hint`: what the rows should be)."""
    for col in columns:
        if rows and col not in rows[0]:
            raise DataError(f"{where}: transform {transform!r} needs column {col!r}{hint}; "
                            f"present: {', '.join(rows[0])}")


def group_by_prompt(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by prompt (a chat prompt compared as its JSON), in the order prompts first appear."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(json.dumps(r["prompt"], sort_keys=True), []).append(r)
    return groups


def score_of(row: dict, key: str) -> Any:
    """A row's score: column `key`, or for `rewards.<name>` that reward's own score in the row's `rewards`."""
    return (row["rewards"] or {}).get(key.removeprefix("rewards.")) if key.startswith("rewards.") else row[key]


def scored_groups(rows: list[dict], where: str, transform: str, score_key: str) -> list[list[tuple[float, dict]]]:
    """(score, row) per row, grouped by prompt in the order prompts first appear. `score_key` is a column or
    `rewards.<name>` (that reward's own score in the row's `rewards` mapping). A row whose score is None (a judge
    that gave no parsable score) is left out: no score is not a score of 0."""
    reward = score_key.removeprefix("rewards.") if score_key.startswith("rewards.") else None
    for col in ("prompt", "completion", "rewards" if reward else score_key):
        if rows and col not in rows[0]:
            raise DataError(f"{where}: transform {transform!r} needs column {col!r}; present: {', '.join(rows[0])}")
    if reward and rows:
        present = rows[0]["rewards"] or {}
        if reward not in present:
            raise DataError(f"{where}: pairing.score is {score_key!r}, but the rows' `rewards` hold no {reward!r}; "
                            f"rewards present: {', '.join(present) or 'none'}")
    groups: dict[str, list[tuple[float, dict]]] = {}
    for r in rows:
        score = score_of(r, score_key)
        if score is not None:
            groups.setdefault(json.dumps(r["prompt"], sort_keys=True), []).append((float(score), r))
    return list(groups.values())


def as_chat(text: Any, role: str) -> Any:
    return text if isinstance(text, list) else [{"role": role, "content": text}]


def format_prompt(question: str, template: str | None, row: dict) -> str:
    """`template` (a Python format string over the row's columns) applied to a text prompt."""
    if not template:
        return question
    try:
        return template.format(**row)
    except KeyError as e:
        raise DataError(f"prompt_template refers to column {e} which the dataset lacks") from None


def format_row(row: dict, spec: SourceSpec) -> dict:
    out = dict(row)
    if "prompt" in out and isinstance(out["prompt"], str):
        prompt = format_prompt(out["prompt"], spec.prompt_template, row)
        out["prompt"] = prompt
        if spec.chat or spec.system_prompt:
            turns = [{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []
            out["prompt"] = turns + [{"role": "user", "content": prompt}]
    if spec.chat or spec.system_prompt:
        for col in ("completion", "chosen", "rejected"):
            if col in out and isinstance(out[col], str):
                out[col] = as_chat(out[col], "assistant")
        if isinstance(out.get("completions"), list):
            out["completions"] = [as_chat(c, "assistant") if isinstance(c, str) else c for c in out["completions"]]
    return out
