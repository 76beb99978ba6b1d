"""Load a dataset from a SourceSpec and shape it into the columns a job needs.

Sources: `builtin:<task>` (postrain.data.tasks), local .jsonl / .json / .csv / .parquet files, or hub datasets
(name, config, split; passed to `datasets.load_dataset` untouched, for users with network).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

from postrain.data.tasks import build_task
from postrain.data.thoughts import check_thought_dropout, drop_thoughts  # also registers builtin:arithmetic_thoughts
from postrain.data.values import VALUE_KINDS, check_consistent_kinds, check_job_values, read_file_rows
from postrain.errors import DataError, RecipeError
from postrain.recipes.schema import PairingSpec, SourceSpec

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


def read_rows(spec: SourceSpec) -> list[dict] | Any:
    return _read_labelled_rows(spec)[0]


def _read_labelled_rows(spec: SourceSpec) -> tuple[list[dict] | Any, list[str] | None]:
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
    import datasets

    try:
        return datasets.load_dataset(src, spec.config, split=spec.split), None
    except Exception as e:  # network, missing dataset, bad split: all the user's to fix
        raise DataError(f"cannot load hub dataset {describe(spec)}: {e}") from None


PAIRING_TRANSFORMS = ("score_pairs", "win_rate_pairs")
# PairingSpec keys that only one of the pairing transforms reads.
PAIRING_KEYS = {"score_pairs": ("min_margin", "min_chosen_score", "all_pairs"),
                "win_rate_pairs": ("win_rate", "temperature", "include_self")}


def pairing_settings(pairing: dict | PairingSpec | None) -> dict:
    """A source's `pairing:` with PairingSpec's defaults filled in."""
    given = dataclasses.asdict(pairing) if isinstance(pairing, PairingSpec) else dict(pairing or {})
    return {**dataclasses.asdict(PairingSpec()), **given}


def check_pairing(spec: dict, where: str) -> None:
    """Load-time checks of a source's `pairing:`: set only with a pairing transform, and only the keys that transform
    reads, with values it can use."""
    pairing, transform = spec.get("pairing"), spec.get("transform")
    if pairing is None:
        return
    if transform not in PAIRING_TRANSFORMS:
        raise RecipeError(f"{where}.pairing: set only with transform: score_pairs or win_rate_pairs (transform is "
                          f"{transform!r}); remove it or set the transform")
    other = next(t for t in PAIRING_TRANSFORMS if t != transform)
    for key in PAIRING_KEYS[other]:
        if key in pairing:
            raise RecipeError(f"{where}.pairing.{key}: read by transform {other!r} only, not by {transform!r}; "
                              f"{transform!r} reads {', '.join(('score',) + PAIRING_KEYS[transform])}")
    settings = pairing_settings(pairing)
    score = settings["score"]
    if not isinstance(score, str) or not score.removeprefix("rewards."):
        raise RecipeError(f"{where}.pairing.score: a column name (default 'score') or 'rewards.<reward name>', "
                          f"got {score!r}")
    if not settings["temperature"] > 0:
        raise RecipeError(f"{where}.pairing.temperature: must be > 0 (P(y > y') = sigmoid((s - s') / temperature)), "
                          f"got {settings['temperature']!r}")
    if settings["min_margin"] is not None and settings["min_margin"] < 0:
        raise RecipeError(f"{where}.pairing.min_margin: must be >= 0 (the chosen's score minus the rejected's), "
                          f"got {settings['min_margin']!r}")


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
        score = (r["rewards"] or {}).get(reward) if reward else r[score_key]
        if score is not None:
            groups.setdefault(json.dumps(r["prompt"], sort_keys=True), []).append((float(score), r))
    return list(groups.values())


def _score_pairs(rows: list[dict], where: str, pairing: dict | PairingSpec | None = None) -> list[dict]:
    """Group (prompt, completion, score) rows by prompt; pair the best-scored completion with the worst (or, with
    `all_pairs`, every higher-scored completion with every lower-scored one), keeping the pairs that pass
    `min_margin` and `min_chosen_score` (DNO's large-margin filter). Equal scores never make a pair. The chosen
    row's other columns are kept; `score_chosen` / `score_rejected` are the two scores."""
    settings = pairing_settings(pairing)
    pairs = []
    for group in scored_groups(rows, where, "score_pairs", settings["score"]):
        if settings["all_pairs"]:
            candidates = [(high, low) for high in group for low in group if high[0] > low[0]]
        else:
            best, worst = max(group, key=lambda g: g[0]), min(group, key=lambda g: g[0])
            candidates = [(best, worst)] if best[0] > worst[0] else []
        for (high, chosen), (low, rejected) in candidates:
            if settings["min_margin"] is not None and high - low < settings["min_margin"]:
                continue
            if settings["min_chosen_score"] is not None and high < settings["min_chosen_score"]:
                continue
            pairs.append({**chosen, "chosen": chosen["completion"], "rejected": rejected["completion"],
                          "score_chosen": high, "score_rejected": low})
    return pairs


def _preference_probability(first: float, second: float, win_rate: str, temperature: float) -> float:
    """P(first > second) from two scalar scores: a logistic in the score difference, or 1 / 0.5 / 0."""
    if win_rate == "hard":
        return 1.0 if first > second else 0.5 if first == second else 0.0
    x = (first - second) / temperature
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))  # no overflow either way


def _win_rate_pairs(rows: list[dict], where: str, pairing: dict | PairingSpec | None = None) -> list[dict]:
    """SPPO's pairs (arXiv 2405.00675; uclaml/SPPO scripts/compute_prob.py): per prompt, each sample's estimated win
    rate against the prompt's K samples, P(y > pi_t) = mean_j P(y > y_j) (j = y itself included, at 0.5, unless
    `include_self` is false), P from the scores (`win_rate`, `temperature`); the highest win rate is chosen, the
    lowest rejected, their win rates `chosen_probs` / `rejected_probs` (what the `sppo` loss reads; the authors'
    columns chosen_probs_win / chosen_probs_lose). A prompt whose win rates are all equal (one sample, or equal
    scores) gives no pair."""
    settings = pairing_settings(pairing)
    prefer = functools.partial(_preference_probability, win_rate=settings["win_rate"],
                               temperature=settings["temperature"])
    pairs = []
    for group in scored_groups(rows, where, "win_rate_pairs", settings["score"]):
        scores = [score for score, _ in group]
        opponents = len(scores) if settings["include_self"] else len(scores) - 1
        if opponents < 1:
            continue
        rates = [sum(prefer(s, t) for j, t in enumerate(scores) if settings["include_self"] or j != i) / opponents
                 for i, s in enumerate(scores)]
        best = max(range(len(rates)), key=rates.__getitem__)  # the first of equal ones, as numpy's argmax
        worst = min(range(len(rates)), key=rates.__getitem__)
        if rates[best] <= rates[worst]:
            continue
        chosen, rejected = group[best][1], group[worst][1]
        pairs.append({**chosen, "chosen": chosen["completion"], "rejected": rejected["completion"],
                      "chosen_probs": rates[best], "rejected_probs": rates[worst],
                      "score_chosen": scores[best], "score_rejected": scores[worst]})
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


def curriculum_pairs(rows: list[dict], stage: int, where: str) -> list[dict]:
    """Curry-DPO's pairs for one curriculum stage (arXiv 2403.07230, Fig. 1): per prompt, the best-scored completion
    is chosen against each lower-scored one; those pairs are ordered by score gap, largest (easiest) first, and stage
    `stage` (from 0) takes each prompt's pair at that position (K = 4: (R1, R4), then (R1, R3), then (R1, R2)).
    Ties keep the list's order. The row's other columns are kept; `score_chosen` / `score_rejected` are the scores."""
    for col in ("prompt", "completions", "scores"):
        if rows and col not in rows[0]:
            raise DataError(f"{where}: transform 'curriculum_pairs' needs column {col!r} (rows {{prompt, "
                            f"completions, scores}}); present: {', '.join(rows[0])}")
    pairs = []
    for n, row in enumerate(rows):
        completions, scores = row["completions"], [float(s) for s in row["scores"]]
        if len(completions) != len(scores):
            raise DataError(f"{where}, row {n}: {len(completions)} completions but {len(scores)} scores")
        best = max(range(len(scores)), key=lambda i: scores[i])  # the first of equally best-scored ones
        # by falling gap to the best = by rising score; sorted() is stable, so equal gaps keep the list's order.
        # A tie with the best is no preference.
        others = sorted((i for i in range(len(scores)) if scores[i] < scores[best]), key=lambda i: scores[i])
        if stage < len(others):
            worse = others[stage]
            rest = {k: v for k, v in row.items() if k not in ("completions", "scores", "ranks")}
            pairs.append({**rest, "chosen": completions[best], "rejected": completions[worse],
                          "score_chosen": scores[best], "score_rejected": scores[worse]})
    return pairs


def chunk_rows(n_rows: int, index: int, of: int) -> range:
    """The row positions of chunk `index` of `of`: contiguous, in order; the chunks partition range(n_rows)."""
    return range(index * n_rows // of, (index + 1) * n_rows // of)


def check_source_options(spec: dict, where: str) -> None:
    """Load-time checks of a source's `chunk:` and `curriculum_stage` (postrain.recipes.checks), naming the key."""
    chunk = spec.get("chunk")
    if chunk is not None:
        index, of = chunk.get("index"), chunk.get("of")
        if not isinstance(of, int) or of < 1:
            raise RecipeError(f"{where}.chunk.of: must be an integer >= 1 (the number of chunks), got {of!r}")
        if not isinstance(index, int) or not 0 <= index < of:
            raise RecipeError(f"{where}.chunk.index: must be an integer in 0..{of - 1} (chunks are numbered from 0 "
                              f"up to chunk.of - 1), got {index!r}")
    stage, transform = spec.get("curriculum_stage"), spec.get("transform")
    if transform == "curriculum_pairs" and (not isinstance(stage, int) or stage < 0):
        raise RecipeError(f"{where}.curriculum_stage: transform 'curriculum_pairs' needs the stage, an integer >= 0 "
                          f"(0: each prompt's easiest pair, the largest score gap), got {stage!r}")
    if transform != "curriculum_pairs" and stage is not None:
        raise RecipeError(f"{where}.curriculum_stage: set only with transform: curriculum_pairs (transform is "
                          f"{transform!r}); remove it or set the transform")
    check_pairing(spec, where)
    check_thought_dropout(spec, where)
    from postrain.data.sample_transforms import check_sample_transform  # it reads this module's helpers

    check_sample_transform(spec, where)
    from postrain.data.implicit_rewards import check_implicit_reward, check_mix  # DICE (arXiv 2406.09760)

    check_implicit_reward(spec, where)
    check_mix(spec, where)


def _filters(pairing: dict | PairingSpec | None) -> str:
    """The pairing filters in force, for an error message: " by at least 2 (the higher scoring at least 5)"."""
    settings = pairing_settings(pairing)
    words = []
    if settings["min_margin"] is not None:
        words.append(f" by at least {settings['min_margin']}")
    if settings["min_chosen_score"] is not None:
        words.append(f" (the higher scoring at least {settings['min_chosen_score']})")
    return "".join(words)


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
    rows, labels = _read_labelled_rows(spec)
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
    if spec.transform == "score_pairs":
        ds = datasets.Dataset.from_list(_score_pairs(ds.to_list(), where, spec.pairing))
        if len(ds) == 0:
            raise DataError(f"{where}: 'score_pairs' found no prompt whose completions scored differently"
                            f"{_filters(spec.pairing)} in {describe(spec)}")
    if spec.transform == "win_rate_pairs":
        ds = datasets.Dataset.from_list(_win_rate_pairs(ds.to_list(), where, spec.pairing))
        if len(ds) == 0:
            raise DataError(f"{where}: 'win_rate_pairs' found no prompt with two samples of different win rates in "
                            f"{describe(spec)}")
    if spec.transform == "score_lists":
        ds = datasets.Dataset.from_list(_score_lists(ds.to_list(), where))
        if len(ds) == 0:
            raise DataError(f"{where}: 'score_lists' found no prompt with two completions scored differently in "
                            f"{describe(spec)}")
    if spec.transform == "unpair":
        ds = _unpair(ds, where)
    if spec.transform in ("step_pairs", "step_prefixes", "step_controlled_pairs", "best_of_k"):
        from postrain.data.sample_transforms import apply_sample_transform  # it reads this module's helpers

        ds = datasets.Dataset.from_list(apply_sample_transform(ds.to_list(), spec, where))
        spec = dataclasses.replace(spec, prompt_template=None)  # step_pairs templated the question before the steps
    if spec.transform == "implicit_reward_pairs":  # DICE: pairs by the DPO implicit reward of two models
        from postrain.data.implicit_rewards import implicit_reward_pairs

        ds = datasets.Dataset.from_list(implicit_reward_pairs(ds.to_list(), spec, where))
        if len(ds) == 0:
            raise DataError(f"{where}: 'implicit_reward_pairs' found no prompt with at least "
                            f"implicit_reward.min_samples samples of different implicit rewards in {describe(spec)}")
    if spec.transform == "thought_dropout":  # TON: empty each row's thought with probability p
        ds = datasets.Dataset.from_list(drop_thoughts(ds.to_list(), spec.thought_dropout, where))
    if spec.transform == "curriculum_pairs":
        ds = datasets.Dataset.from_list(curriculum_pairs(ds.to_list(), spec.curriculum_stage, where))
        if len(ds) == 0:
            raise DataError(f"{where}: 'curriculum_pairs' stage {spec.curriculum_stage} has no pair in "
                            f"{describe(spec)}: no prompt has {spec.curriculum_stage + 1} completions scored below "
                            f"its best")
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
        from postrain.data.implicit_rewards import apply_mix

        ds = apply_mix(ds, spec, job, where)
    return ds


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


def format_row(row: dict, spec: SourceSpec) -> dict:
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
    if spec.mix is not None:  # two sources' draws (postrain.data.implicit_rewards.mix_counts)
        return None
    if spec.transform in ("score_pairs", "score_lists", "curriculum_pairs", "win_rate_pairs", "step_prefixes",
                          "step_controlled_pairs", "best_of_k", "implicit_reward_pairs"):  # known once scored
        return None
    if is_local(spec):
        n = len(read_rows(spec)) * (2 if spec.transform == "unpair" else 1)
        if spec.chunk is not None:
            n = len(chunk_rows(n, *_chunk_of(spec)))
        return min(n, spec.limit) if spec.limit is not None else n
    return None

