"""Data transforms over step-structured or sampled-and-scored solutions (`data.train.transform` / an eval set's):

- `step_pairs` (Step-DPO, arXiv 2406.18629): rows {prompt, <prefix column>, chosen, rejected} of a step-level
  preference dataset (xinlai/Math-Step-DPO-10K) become DPO pairs whose prompt is the question, formatted by the
  source's `prompt_template`, followed by the correct steps so far; chosen / rejected are the correct / wrong next step.
- `step_prefixes` (Step-Controlled DPO, arXiv 2407.00782, stage 1 -> 2): an eval run's samples (prompt, completion,
  score) become continuation prompts: per prompt, its first correct solution cut after k = 0 .. m-1 of its m steps.
- `step_controlled_pairs` (stage 2 -> DPO): the continuation samples become pairs; the prompt is the question plus the
  k correct steps, chosen is the rest of the correct solution, rejected the first wrong continuation sampled there.
- `best_of_k` (RAFT, arXiv 2304.06767): scored samples become SFT rows {prompt, completion}, the best-scored one (or
  the `keep` best, those scoring at least `min_score`) of each prompt.

Their settings are the source's `steps:` and `best_of_k:` sections (postrain.recipes.schema.StepsSpec, BestOfKSpec),
checked when the recipe loads (`check_sample_transform`). A step is the text up to and including a `separator`, so the
k-step prefix plus the rest is the solution exactly, and prompt + prefix is the text the model wrote the solution after.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from postrain.errors import DataError, RecipeError
from postrain.recipes.schema import BestOfKSpec, StepsSpec

STEP_TRANSFORMS = ("step_pairs", "step_prefixes", "step_controlled_pairs")
SAMPLE_TRANSFORMS = STEP_TRANSFORMS + ("best_of_k",)
# The `steps:` keys each step transform reads.
STEP_KEYS = {
    "step_pairs": ("prefix_column", "prefix_separator"),
    "step_prefixes": ("separator", "score", "correct_score"),
    "step_controlled_pairs": ("separator", "score", "correct_score", "solutions", "max_pairs_per_prompt"),
}


def _settings(section: Any, spec_class: type) -> dict:
    """A `steps:` / `best_of_k:` section (a dict as written, or the dataclass) with the dataclass's defaults filled."""
    given = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else dict(section or {})
    return {**dataclasses.asdict(spec_class()), **given}


# --- load-time checks ----------------------------------------------------------------------------------------------

def check_sample_transform(spec: dict, where: str) -> None:
    """A source's `steps:` / `best_of_k:` sections: set only with their transforms, only the keys the transform reads,
    values it can use; and no chat formatting the transform would apply to text it has already put together."""
    transform, steps, best = spec.get("transform"), spec.get("steps"), spec.get("best_of_k")
    if steps is not None and transform not in STEP_TRANSFORMS:
        raise RecipeError(f"{where}.steps: set only with transform: {', '.join(STEP_TRANSFORMS)} (transform is "
                          f"{transform!r}); remove it or set the transform")
    if best is not None and transform != "best_of_k":
        raise RecipeError(f"{where}.best_of_k: set only with transform: best_of_k (transform is {transform!r}); "
                          f"remove it or set the transform")
    if transform in STEP_TRANSFORMS:
        _check_steps(spec, transform, steps or {}, where)
    if transform == "best_of_k":
        settings = _settings(best, BestOfKSpec)
        _check_score(settings["score"], f"{where}.best_of_k.score")
        if settings["keep"] is not None and (not isinstance(settings["keep"], int) or settings["keep"] < 1):
            raise RecipeError(f"{where}.best_of_k.keep: an integer >= 1 (1: each prompt's best sample, RAFT's "
                              f"best-of-K) or null (every sample that passes min_score), got {settings['keep']!r}")
        if settings["keep"] is None and settings["min_score"] is None:
            raise RecipeError(f"{where}.best_of_k: keep: null with no min_score keeps every sample; set min_score (e.g. "
                              f"1.0: the verified-correct samples) or keep (1: the best per prompt)")


def _check_steps(spec: dict, transform: str, steps: dict, where: str) -> None:
    for key in steps:
        if key not in STEP_KEYS[transform]:
            readers = [t for t, keys in STEP_KEYS.items() if key in keys]
            raise RecipeError(f"{where}.steps.{key}: read by transform {' / '.join(readers) or 'none'}, not by "
                              f"{transform!r}; {transform!r} reads {', '.join(STEP_KEYS[transform])}")
    settings = _settings(steps, StepsSpec)
    for key in ("chat", "system_prompt"):
        if spec.get(key):
            raise RecipeError(
                f"{where}.{key}: transform {transform!r} continues a solution inside the prompt's text, which a chat "
                f"turn would close; give the prompt as text (write the chat template into "
                f"{'prompt_template' if transform == 'step_pairs' else 'the sampling stage prompt_template'}, as the "
                f"Step-DPO authors' qwen2-boxed prompt does)")
    if transform != "step_pairs":
        if spec.get("prompt_template"):
            raise RecipeError(f"{where}.prompt_template: transform {transform!r} reads prompts an eval run already "
                              f"formatted; set the template in the stage that sampled them")
        if not isinstance(settings["separator"], str) or not settings["separator"]:
            raise RecipeError(f"{where}.steps.separator: the non-empty text that ends a step (e.g. \"\\n\"), got "
                              f"{settings['separator']!r}")
        _check_score(settings["score"], f"{where}.steps.score")
    if transform == "step_controlled_pairs":
        if not isinstance(settings["solutions"], str) or not settings["solutions"]:
            raise RecipeError(f"{where}.steps.solutions: transform 'step_controlled_pairs' needs the samples.jsonl the "
                              f"prefixes were cut from (the correct solutions, whose remaining steps are chosen), e.g. "
                              f"\"${{stages.solve.output}}/samples.jsonl\"; got {settings['solutions']!r}")
        limit = settings["max_pairs_per_prompt"]
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise RecipeError(f"{where}.steps.max_pairs_per_prompt: an integer >= 1 or null (no limit), got {limit!r}")


def _check_score(score: Any, where: str) -> None:
    if not isinstance(score, str) or not score.removeprefix("rewards."):
        raise RecipeError(f"{where}: a column name (default 'score') or 'rewards.<reward name>', got {score!r}")


# --- the transforms ------------------------------------------------------------------------------------------------

def apply_sample_transform(rows: list[dict], spec, where: str) -> list[dict]:
    """Run the source's transform (one of SAMPLE_TRANSFORMS) on its rows; an empty result is an error saying why."""
    transform = spec.transform
    if transform == "best_of_k":
        out = best_of_k(rows, where, spec.best_of_k)
        why = "no prompt has a sample scoring at least best_of_k.min_score"
    elif transform == "step_pairs":
        out = step_pairs(rows, where, spec.steps, prompt_template=spec.prompt_template)
        why = "the source has no rows"
    elif transform == "step_prefixes":
        out = step_prefixes(rows, where, spec.steps)
        why = "no prompt has a correct sample (score >= steps.correct_score)"
    else:
        out = step_controlled_pairs(rows, where, spec.steps, read_solutions(_settings(spec.steps, StepsSpec)["solutions"]))
        why = "no continuation is wrong (score < steps.correct_score)"
    if not out:
        raise DataError(f"{where}: transform {transform!r} made no rows: {why}")
    return out


def step_pairs(rows: list[dict], where: str, steps: Any = None, *, prompt_template: str | None = None) -> list[dict]:
    """Step-DPO's pairs, as the authors' train.py (apply_step_wise_chat_template) builds them: the prompt is the
    question formatted by `prompt_template` (their alpaca / deepseek-math / qwen2-boxed prompts are such templates),
    then, when the row has correct steps before the pair's step, `prefix_separator` and those steps. chosen / rejected
    are kept as they are (the correct and the wrong next step); so are the other columns."""
    settings = _settings(steps, StepsSpec)
    column = settings["prefix_column"]
    for col in ("prompt", column, "chosen", "rejected"):
        if rows and col not in rows[0]:
            raise DataError(f"{where}: transform 'step_pairs' needs column {col!r}"
                            f"{' (steps.prefix_column)' if col == column else ''}; present: {', '.join(rows[0])}")
    out = []
    for row in rows:
        question = row["prompt"]
        if not isinstance(question, str):
            raise DataError(f"{where}: transform 'step_pairs' needs text prompts, got {type(question).__name__}")
        if prompt_template:
            try:
                question = prompt_template.format(**row)
            except KeyError as e:
                raise DataError(f"prompt_template refers to column {e} which the dataset lacks") from None
        prefix = row[column] or ""
        out.append({**row, "prompt": question + settings["prefix_separator"] + prefix if prefix else question})
    return out


def split_steps(solution: str, separator: str) -> list[str]:
    """The steps of a solution: each ends with `separator` except the last; "".join(steps) == solution. A trailing
    separator ends the last step (no empty step after it)."""
    pieces = solution.split(separator)
    steps = [piece + separator for piece in pieces[:-1]]
    if pieces[-1]:
        steps.append(pieces[-1])
    return steps


def _first_correct(rows: list[dict], where: str, transform: str, settings: dict) -> list[dict]:
    """Each prompt's first sample scoring at least `correct_score` (the SCDPO authors take correct_solutions[0])."""
    from postrain.data.sources import scored_groups

    chosen = []
    for group in scored_groups(rows, where, transform, settings["score"]):
        correct = [row for score, row in group if score >= settings["correct_score"]]
        if correct:
            chosen.append(correct[0])
    return chosen


def _prefixes(solution_row: dict, where: str, transform: str, separator: str) -> list[tuple[str, int, str]]:
    """(prompt + the first k steps, k, the remaining steps) for k = 0 .. m-1 (k = m leaves nothing to continue)."""
    prompt = solution_row["prompt"]
    if not isinstance(prompt, str):
        raise DataError(f"{where}: transform {transform!r} continues solutions inside the prompt's text, so the samples' "
                        f"prompts must be text, got a {type(prompt).__name__} (a chat conversation?): sample with a "
                        f"text prompt (the chat template written into prompt_template)")
    steps = split_steps(solution_row["completion"], separator)
    return [(prompt + "".join(steps[:k]), k, "".join(steps[k:])) for k in range(len(steps))]


def step_prefixes(rows: list[dict], where: str, steps: Any = None) -> list[dict]:
    """SCDPO's continuation prompts (the authors' prepare_initial_data_divided): per prompt, its first correct
    solution, cut after each k = 0 .. m-1 of its m steps; rows {prompt: prompt + the k steps, answer, prefix_steps: k}.
    Sampling from them (an eval stage, at a raised temperature) gives solutions that go wrong after step k."""
    settings = _settings(steps, StepsSpec)
    out = []
    for row in _first_correct(rows, where, "step_prefixes", settings):
        for prompt, k, _ in _prefixes(row, where, "step_prefixes", settings["separator"]):
            out.append({"prompt": prompt, "answer": row.get("answer"), "prefix_steps": k})
    return out


def read_solutions(path: str) -> list[dict]:
    from postrain.data.sources import read_rows
    from postrain.recipes.schema import SourceSpec

    return read_rows(SourceSpec(source=path))


def step_controlled_pairs(rows: list[dict], where: str, steps: Any, solutions: list[dict]) -> list[dict]:
    """SCDPO's step-controlled pairs (the authors' get_chosen_rejected_controled_steps_limited): each continuation
    prompt (question + k correct steps, as `step_prefixes` cut it from `solutions`) with a wrong continuation gives
    {prompt, chosen: the correct solution's remaining steps, rejected: the first wrong continuation sampled there}.
    Per question at most `max_pairs_per_prompt`, fewest prefix steps first. The shared k steps are prompt, so the loss
    reads only what follows them (the paper's L_SC, Eq. 4)."""
    settings = _settings(steps, StepsSpec)
    cut: dict[str, tuple[dict, int, str]] = {}
    for solution in _first_correct(solutions, f"{where}.steps.solutions", "step_controlled_pairs", settings):
        for prompt, k, rest in _prefixes(solution, where, "step_controlled_pairs", settings["separator"]):
            cut[prompt] = (solution, k, rest)
    from postrain.data.sources import scored_groups

    groups = scored_groups(rows, where, "step_controlled_pairs", settings["score"])
    unknown = [group[0][1]["prompt"] for group in groups if group[0][1]["prompt"] not in cut]
    if unknown:
        raise DataError(f"{where}: {len(unknown)} continuation prompt(s) are no prefix of a correct solution in "
                        f"steps.solutions ({settings['solutions']}), e.g. {unknown[0]!r}: steps.solutions must be the "
                        f"samples the step_prefixes stage read, with the same steps.separator / correct_score")
    per_question: dict[str, list[dict]] = {}
    for group in groups:
        wrong = [(score, row) for score, row in group if score < settings["correct_score"]]
        if not wrong:
            continue
        score, row = wrong[0]
        solution, k, rest = cut[row["prompt"]]
        per_question.setdefault(solution["prompt"], []).append({
            "prompt": row["prompt"], "chosen": rest, "rejected": row["completion"], "answer": solution.get("answer"),
            "prefix_steps": k, "score_chosen": _score(solution, settings["score"]), "score_rejected": score})
    limit = settings["max_pairs_per_prompt"]
    pairs = []
    for question_pairs in per_question.values():
        pairs += sorted(question_pairs, key=lambda p: p["prefix_steps"])[:limit]
    return pairs


def _score(row: dict, key: str) -> float:
    return float((row["rewards"] or {})[key.removeprefix("rewards.")] if key.startswith("rewards.") else row[key])


def best_of_k(rows: list[dict], where: str, section: Any = None) -> list[dict]:
    """RAFT's SFT data (arXiv 2304.06767 Sec. 3, "local ranking"; LMFlow RaftAligner._get_batch_dataset_local): per
    prompt, the `keep` highest-scored samples (ties: the first sampled, as numpy's argmax), of those the ones scoring at
    least `min_score`; rows {prompt, completion, score} (+ answer where the samples have it)."""
    from postrain.data.sources import scored_groups

    settings = _settings(section, BestOfKSpec)
    out = []
    for group in scored_groups(rows, where, "best_of_k", settings["score"]):
        ranked = sorted(group, key=lambda g: -g[0])  # stable: equal scores keep their sampled order
        for score, row in ranked[: settings["keep"]]:
            if settings["min_score"] is None or score >= settings["min_score"]:
                out.append({"prompt": row["prompt"], "completion": row["completion"], "score": score,
                            **({"answer": row["answer"]} if "answer" in row else {})})
    return out
