"""Load a dataset from a SourceSpec and shape it into the columns a job needs.

Sources: `builtin:<task>` (postrain.data.tasks), local .jsonl / .json / .csv / .parquet files, or hub datasets
(name, config, split; passed to `datasets.load_dataset` untouched, for users with network).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

from postrain.data.tasks import build_task
from postrain.errors import DataError
from postrain.recipes.schema import SourceSpec

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

# What each job reads from its data. Alternatives are tried in order: the first set fully present wins.
JOB_COLUMNS: dict[str, list[tuple[str, ...]]] = {
    "sft": [("messages",), ("prompt", "completion"), ("text",)],
    # The rest depends on the recipe's `loss:` (pairs, K-response lists or unpaired labelled completions): the dpo
    # job checks it once the data loads (postrain.trainers.dpo.check_loss_data), naming the loss that needs it.
    "dpo": [("prompt",)],
    "grpo": [("prompt",)],
    "eval": [("prompt",)],
}


def as_source(spec: dict | SourceSpec) -> SourceSpec:
    if isinstance(spec, SourceSpec):
        return spec
    fields = {f.name for f in dataclasses.fields(SourceSpec)}
    # Keys of richer specs (an eval set's `generation:`) are not the source's business; the recipe was validated.
    return SourceSpec(**{k: v for k, v in spec.items() if k in fields})


def describe(spec: SourceSpec) -> str:
    extra = f" (config {spec.config})" if spec.config else ""
    return f"{spec.source}{extra} [{spec.split}]"


def _read_rows(spec: SourceSpec) -> list[dict] | Any:
    src = spec.source
    if src.startswith("builtin:"):
        return build_task(src.removeprefix("builtin:"), spec.split, dict(spec.task))
    path = Path(src).expanduser()
    if path.suffix in FILE_SUFFIXES or path.exists():
        if not path.exists():
            raise DataError(f"data file not found: {src}")
        if path.suffix == ".jsonl":
            rows = []
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{src}, line {i}: not valid JSON: {e}") from None
            return rows
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict) and spec.split in data:
                data = data[spec.split]
            if not isinstance(data, list):
                raise DataError(f"{src}: expected a list of records (or a mapping of split -> list)")
            return data
        if path.suffix == ".csv":
            with path.open(newline="") as f:
                return list(csv.DictReader(f))
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        raise DataError(f"{src}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")
    import datasets

    try:
        return datasets.load_dataset(src, spec.config, split=spec.split)
    except Exception as e:  # network, missing dataset, bad split: all the user's to fix
        raise DataError(f"cannot load hub dataset {describe(spec)}: {e}") from None


def _score_pairs(rows: list[dict], where: str) -> list[dict]:
    """Group (prompt, completion, score) rows by prompt; pair the best-scored completion with the worst."""
    for col in ("prompt", "completion", "score"):
        if rows and col not in rows[0]:
            raise DataError(f"{where}: transform 'score_pairs' needs column {col!r}; present: {', '.join(rows[0])}")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(json.dumps(r["prompt"], sort_keys=True), []).append(r)
    pairs = []
    for group in groups.values():
        best = max(group, key=lambda r: r["score"])
        worst = min(group, key=lambda r: r["score"])
        if best["score"] > worst["score"]:
            pairs.append({**best, "chosen": best["completion"], "rejected": worst["completion"]})
    return pairs


def _score_lists(rows: list[dict], where: str) -> list[dict]:
    """Group (prompt, completion, score) rows by prompt into K-response lists {prompt, completions, scores} (the
    other columns from the prompt's first row), for every prompt with at least two completions scored
    differently."""
    for col in ("prompt", "completion", "score"):
        if rows and col not in rows[0]:
            raise DataError(f"{where}: transform 'score_lists' needs column {col!r}; present: {', '.join(rows[0])}")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(json.dumps(r["prompt"], sort_keys=True), []).append(r)
    lists = []
    for group in groups.values():
        if len({r["score"] for r in group}) > 1:
            rest = {k: v for k, v in group[0].items() if k not in ("completion", "score")}
            lists.append({**rest, "completions": [r["completion"] for r in group],
                          "scores": [float(r["score"]) for r in group]})
    return lists


def _unpair(ds, where: str):
    """Each (prompt, chosen, rejected) row -> a desirable row (chosen, label true) and an undesirable one
    (rejected, label false): TRL's unpair_preference_dataset, other columns copied to both."""
    from trl.data_utils import unpair_preference_dataset

    for col in ("chosen", "rejected"):
        if col not in ds.column_names:
            raise DataError(f"{where}: transform 'unpair' needs column {col!r}; present: {', '.join(ds.column_names)}")
    # TRL copies every other column to both rows: an existing `completion` (built-in rows carry the SFT target)
    # would overwrite the unpaired completion, and an existing `label` the new labels.
    stale = [c for c in ("completion", "label") if c in ds.column_names]
    return unpair_preference_dataset(ds.remove_columns(stale) if stale else ds)


def _as_chat(text: Any, role: str) -> Any:
    return text if isinstance(text, list) else [{"role": role, "content": text}]


def load_source(spec: dict | SourceSpec, job: str, *, where: str = "data") -> "datasets.Dataset":  # noqa: F821
    """Load one source and return a `datasets.Dataset` with the columns `job` needs (extra columns are kept)."""
    import datasets

    spec = as_source(spec)
    rows = _read_rows(spec)
    ds = rows if isinstance(rows, datasets.Dataset) else None
    present = list(ds.column_names) if ds is not None else (list(rows[0]) if rows else [])
    if ds is None and not rows:
        raise DataError(f"{where}: dataset {describe(spec)} is empty")
    # Column mapping: target <- source column.
    for target, column in spec.columns.items():
        if column not in present:
            raise DataError(
                f"{where}: dataset {describe(spec)} has no column {column!r} (mapped to {target!r}); "
                f"columns present: {', '.join(present)}"
            )
    if ds is None:
        ds = datasets.Dataset.from_list(rows)
    renames = {src: dst for dst, src in spec.columns.items() if src != dst}
    if renames:
        ds = ds.remove_columns([dst for dst in renames.values() if dst in ds.column_names and dst not in renames])
        ds = ds.rename_columns(renames)
    if spec.transform == "score_pairs":
        ds = datasets.Dataset.from_list(_score_pairs(ds.to_list(), where))
        if len(ds) == 0:
            raise DataError(f"{where}: 'score_pairs' found no prompt whose completions scored differently in {describe(spec)}")
    if spec.transform == "score_lists":
        ds = datasets.Dataset.from_list(_score_lists(ds.to_list(), where))
        if len(ds) == 0:
            raise DataError(f"{where}: 'score_lists' found no prompt with two completions scored differently in "
                            f"{describe(spec)}")
    if spec.transform == "unpair":
        ds = _unpair(ds, where)
    if spec.limit is not None:
        ds = ds.select(range(min(spec.limit, len(ds))))
    check_columns(ds.column_names, job, spec, where)
    answers = [c for c in ("completion", "chosen", "rejected") if c in ds.column_names]
    if "prompt" in ds.column_names and any(_repeats_prompt(ds[0][c]) for c in answers):
        ds = ds.map(lambda row: {c: _answer_turns(row[c]) for c in answers}, desc=None)
    first_list = ds[0]["completions"] if "prompt" in ds.column_names and "completions" in ds.column_names else None
    if first_list and _repeats_prompt(first_list[0]):
        ds = ds.map(lambda row: {"completions": [_answer_turns(c) for c in row["completions"]]}, desc=None)
    if spec.prompt_template or spec.chat or spec.system_prompt:
        ds = ds.map(lambda row: _format_row(row, spec), desc=None)
    return ds


def _repeats_prompt(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and value[0].get("role") != "assistant"


def _answer_turns(turns: Any) -> Any:
    """The answer part of a chosen / rejected / completion conversation that also repeats the prompt's turns
    (UltraFeedback-style data: `prompt` a string, `chosen` [user, assistant]). With a prompt column as well, the
    user turn would be rendered twice and trained on as part of the answer: keep what follows the last
    non-assistant turn."""
    if not _repeats_prompt(turns):
        return turns
    last = max(i for i, turn in enumerate(turns) if turn.get("role") != "assistant")
    return turns[last + 1 :] or turns


def check_columns(present: list[str], job: str, spec: SourceSpec, where: str) -> tuple[str, ...]:
    options = JOB_COLUMNS[job]
    for option in options:
        if all(c in present for c in option):
            return option
    wanted = " or ".join("(" + ", ".join(o) + ")" for o in options)
    missing = [c for c in options[0] if c not in present]
    raise DataError(
        f"{where}: dataset {describe(spec)} lacks column {', '.join(repr(m) for m in missing)} needed by `{job}` "
        f"(wants {wanted}); columns present: {', '.join(present)}. Map one with {where}.columns, "
        f"e.g. columns: {{{missing[0] if missing else 'prompt'}: <your column>}}"
    )


def _format_row(row: dict, spec: SourceSpec) -> dict:
    out = dict(row)
    if "prompt" in out and isinstance(out["prompt"], str):
        prompt = out["prompt"]
        if spec.prompt_template:
            try:
                prompt = spec.prompt_template.format(**row)
            except KeyError as e:
                raise DataError(f"prompt_template refers to column {e} which the dataset lacks") from None
        out["prompt"] = prompt
        if spec.chat or spec.system_prompt:
            turns = [{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []
            out["prompt"] = turns + [{"role": "user", "content": prompt}]
    if spec.chat or spec.system_prompt:
        for col in ("completion", "chosen", "rejected"):
            if col in out and isinstance(out[col], str):
                out[col] = _as_chat(out[col], "assistant")
        if isinstance(out.get("completions"), list):
            out["completions"] = [_as_chat(c, "assistant") if isinstance(c, str) else c for c in out["completions"]]
    return out


def is_local(spec: dict | SourceSpec) -> bool:
    """Whether a source is read without a network: a built-in task or a file that exists."""
    spec = as_source(spec)
    return spec.source.startswith("builtin:") or Path(spec.source).expanduser().exists()


def source_size(spec: dict | SourceSpec) -> int | None:
    """Number of rows, without loading a model; None where it cannot be known cheaply (hub datasets)."""
    spec = as_source(spec)
    if spec.transform in ("score_pairs", "score_lists"):  # pairs / lists are only known once scores are grouped
        return None
    if is_local(spec):
        n = len(_read_rows(spec)) * (2 if spec.transform == "unpair" else 1)
        return min(n, spec.limit) if spec.limit is not None else n
    return None

