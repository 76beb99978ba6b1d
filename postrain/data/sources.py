"""Load a dataset from a SourceSpec and shape it into the columns a job needs: read its rows (postrain.data.rows),
map its columns, apply its registered transform (postrain.data.transforms), take its chunk and limit, check the
values the job reads, format its prompts and join its `mix:` (postrain.data.mix).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from postrain.data.mix import MIX_KEYS, check_mix, mix_rows
from postrain.data.rows import format_row, read_labelled_rows, read_rows
from postrain.data.source_spec import MixSpec, SourceSpec, as_mapping, as_source, describe
from postrain.data.transforms import TRANSFORMS, check_transform, given_params, rows_per_row
from postrain.data.transforms.registry import empty_reason
from postrain.data.values import VALUE_KINDS, check_job_values
from postrain.errors import DataError, RecipeError

# What each job reads from its data. Alternatives are tried in order: the first set fully present wins.
JOB_COLUMNS: dict[str, list[tuple[str, ...]]] = {
    "sft": [("messages",), ("prompt", "completion"), ("text",)],
    # The rest depends on the recipe's `loss:` (pairs, K-response lists or unpaired labelled completions): the dpo
    # job checks it once the data loads (postrain.trainers.dpo.check_loss_data), naming the loss that needs it.
    "dpo": [("prompt",)],
    "grpo": [("prompt",)],
    "eval": [("prompt",)],
}


def chunk_rows(n_rows: int, index: int, of: int) -> range:
    """The row positions of chunk `index` of `of`: contiguous, in order; the chunks partition range(n_rows)."""
    return range(index * n_rows // of, (index + 1) * n_rows // of)


def check_source_options(spec: dict, where: str) -> None:
    """Load-time checks of a source (postrain.jobs.checks), naming the key: its `chunk:`, its `transform:` and the
    transform's settings (postrain.data.transforms.check_transform), its `mix:`."""
    chunk = spec.get("chunk")
    if chunk is not None:
        index, of = chunk.get("index"), chunk.get("of")
        if not isinstance(of, int) or of < 1:
            raise RecipeError(f"{where}.chunk.of: must be an integer >= 1 (the number of chunks), got {of!r}")
        if not isinstance(index, int) or not 0 <= index < of:
            raise RecipeError(f"{where}.chunk.index: must be an integer in 0..{of - 1} (chunks are numbered from 0 "
                              f"up to chunk.of - 1), got {index!r}")
    check_transform(spec, where)
    if spec.get("mix") is not None:
        check_mix(spec["mix"], where)
        check_source_options({k: v for k, v in spec["mix"].items() if k not in MIX_KEYS}, f"{where}.mix")


def load_source(spec: dict | SourceSpec, job: str, *, where: str = "data") -> "datasets.Dataset":  # noqa: F821
    """Load one source and return a `datasets.Dataset` with the columns `job` needs (extra columns are kept)."""
    # slow: datasets, only once data loads
    import datasets

    spec = as_source(spec)
    rows, labels = read_labelled_rows(spec)
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
        if spec.transform is None:  # the rows as the file has them: a bad value is named by its line
            _check_values(rows, labels, job, spec, where)
        ds = datasets.Dataset.from_list(rows)
    renames = {src: dst for dst, src in spec.columns.items() if src != dst}
    if renames:
        ds = ds.remove_columns([dst for dst in renames.values() if dst in ds.column_names and dst not in renames])
        ds = ds.rename_columns(renames)
    if spec.transform is not None:
        ds, spec = apply_transform(ds, spec, where)
    if spec.chunk is not None:
        index, of = _chunk_of(spec)
        ds = ds.select(chunk_rows(len(ds), index, of))
        if len(ds) == 0:
            raise DataError(f"{where}: chunk {index} of {of} of {describe(spec)} is empty: fewer rows than chunks")
    if spec.limit is not None:
        ds = ds.select(range(min(spec.limit, len(ds))))
    check_columns(ds.column_names, job, spec, where)
    if labels is None or spec.transform is not None:  # a hub dataset, or rows a transform made
        after = f" (after transform {spec.transform!r})" if spec.transform else ""
        _check_values(ds, (f"row {index}{after}" for index in range(len(ds))), job, spec, where, mapped=False)
    answers = [c for c in ("completion", "chosen", "rejected") if c in ds.column_names]
    if "prompt" in ds.column_names and any(_repeats_prompt(ds[0][c]) for c in answers):
        ds = ds.map(lambda row: {c: _answer_turns(row[c]) for c in answers}, desc=None)
    first_list = ds[0]["completions"] if "prompt" in ds.column_names and "completions" in ds.column_names else None
    if first_list and _repeats_prompt(first_list[0]):
        ds = ds.map(lambda row: {"completions": [_answer_turns(c) for c in row["completions"]]}, desc=None)
    if spec.prompt_template or spec.chat or spec.system_prompt:
        ds = ds.map(lambda row: format_row(row, spec), desc=None)
    if spec.mix is not None:  # DICE's experience replay: a second source's rows joined to these
        ds = mixed(ds, spec, job, where)
    return ds


def apply_transform(ds, spec: SourceSpec, where: str):
    """The source's registered transform applied to its rows, called with the data inputs it reads and the settings
    the source gives it; (the new rows, the spec to go on with). An empty result is an error saying why."""
    import datasets  # slow to import: only once data loads

    variant = TRANSFORMS.get(spec.transform, f"{where}.transform")
    params = given_params(spec, variant)
    data = {"dataset": ds, "where": where, "source": spec, "prompt_template": spec.prompt_template}
    if variant.needs("rows"):
        data["rows"] = ds.to_list()
    out = TRANSFORMS.call(variant.name, data, params)
    if not isinstance(out, datasets.Dataset):
        out = datasets.Dataset.from_list(out)
    if len(out) == 0:
        raise DataError(f"{where}: transform {variant.name!r} made no rows: {empty_reason(variant, params)} (in "
                        f"{describe(spec)})")
    if not variant.extra.get("template_after", True):  # its prompts are formatted already
        spec = dataclasses.replace(spec, prompt_template=None)
    return out, spec


def mixed(ds, spec: SourceSpec, job: str, where: str):
    """`ds` (this source, loaded and formatted) mixed with `spec.mix`'s source, loaded the same way."""
    import datasets  # slow to import: only once data loads

    mix = as_mapping(spec.mix)
    defaults = MixSpec()
    settings = {key: mix.get(key, getattr(defaults, key)) for key in MIX_KEYS}
    source = {k: v for k, v in mix.items() if k not in MIX_KEYS}
    there = load_source(source, job, where=f"{where}.mix")
    rows = mix_rows(ds.to_list(), there.to_list(), settings["fraction"], settings["seed"],
                    settings["new_prompts_only"], where)
    try:
        return datasets.Dataset.from_list(rows)
    except Exception as e:  # a column of one source is text where the other's is chat turns, ...
        raise DataError(f"{where}.mix: the two sources' rows do not fit one dataset ({e}); format both alike "
                        f"(e.g. the same chat / system_prompt)") from None


def _check_values(rows, labels, job: str, spec: SourceSpec, where: str, mapped: bool = True) -> None:
    """The columns the job reads hold what it reads, row by row (postrain.data.values.check_job_values). `rows`
    are the file's (columns under their own names, `mapped`) or the dataset's (renamed)."""
    if mapped:
        names = {target: spec.columns.get(target, target) for target in VALUE_KINDS}
        in_file = set().union(*rows) if rows else set()
        present = [t for t in VALUE_KINDS if names[t] in in_file]
        checked = _job_value_columns(job, present)
        renamed = ({t: row.get(names[t], _ABSENT) for t in checked} for row in rows)
        rows = ({t: v for t, v in row.items() if v is not _ABSENT} for row in renamed)
        check_job_values(rows, labels, checked, where, describe(spec), names)
        return
    check_job_values(rows, labels, _job_value_columns(job, rows.column_names), where, describe(spec))


_ABSENT = object()


def _job_value_columns(job: str, present: list[str]) -> list[str]:
    """The columns whose values the job reads, of those present: the first of the job's JOB_COLUMNS options that
    is all there, and for dpo the columns of the preference shape the data has (pairs, K-response lists or
    unpaired labelled completions; postrain.trainers.dpo checks that the shape is the losses')."""
    option = next((o for o in JOB_COLUMNS[job] if all(c in present for c in o)), ())
    columns = list(option)
    if job == "dpo":
        for shape in (("chosen", "rejected"), ("completions", "scores"), ("completion", "label")):
            if all(c in present for c in shape):
                columns += [*shape, *(c for c in ("score_chosen", "score_rejected") if c in present and
                                      shape == ("chosen", "rejected"))]
                break
    return columns


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


def _chunk_of(spec: SourceSpec) -> tuple[int, int]:
    chunk = spec.chunk
    return (chunk["index"], chunk["of"]) if isinstance(chunk, dict) else (chunk.index, chunk.of)


def is_local(spec: dict | SourceSpec) -> bool:
    """Whether a source is read without a network: a built-in task or a file that exists."""
    spec = as_source(spec)
    return spec.source.startswith("builtin:") or Path(spec.source).expanduser().exists()


def source_size(spec: dict | SourceSpec) -> int | None:
    """Number of rows, without loading a model; None where it cannot be known cheaply (hub datasets)."""
    spec = as_source(spec)
    if spec.mix is not None:  # two sources' draws (postrain.data.mix.mix_counts)
        return None
    factor = 1 if spec.transform is None else rows_per_row(TRANSFORMS.get(spec.transform, "transform"))
    if factor is None:  # known once the transform has run (scored, paired, filtered)
        return None
    if is_local(spec):
        n = len(read_rows(spec)) * factor
        if spec.chunk is not None:
            n = len(chunk_rows(n, *_chunk_of(spec)))
        return min(n, spec.limit) if spec.limit is not None else n
    return None

