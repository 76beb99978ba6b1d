"""Transforms over step-structured solutions, their settings under the source's `steps:` (each reads only its own
keys, checked when the recipe loads):

- `step_pairs` (Step-DPO, arXiv 2406.18629): rows {prompt, <prefix column>, chosen, rejected} of a step-level
  preference dataset (xinlai/Math-Step-DPO-10K) become DPO pairs whose prompt is the question, formatted by the
  source's `prompt_template`, followed by the correct steps so far; chosen / rejected are the correct / wrong next step.
- `step_prefixes` (Step-Controlled DPO, arXiv 2407.00782, stage 1 -> 2): an eval run's samples (prompt, completion,
  score) become continuation prompts: per prompt, its first correct solution cut after k = 0 .. m-1 of its m steps.
- `step_controlled_pairs` (stage 2 -> DPO): the continuation samples become pairs; the prompt is the question plus the
  k correct steps, chosen is the rest of the correct solution, rejected the first wrong continuation sampled there.

A step is the text up to and including a `separator`, so the k-step prefix plus the rest is the solution exactly,
and prompt + prefix is the text the model wrote the solution after. A sample is correct when its score (`score`: a
column, or `rewards.<name>`) is at least `correct_score` (eval's verifiers score a right answer 1.0).
"""

from __future__ import annotations

from postrain.data.rows import format_prompt, read_rows, score_of, scored_groups
from postrain.data.source_spec import SourceSpec
from postrain.data.transforms.pairing import check_score_key
from postrain.data.transforms.registry import TRANSFORMS
from postrain.errors import DataError, RecipeError


def _check_text_prompts(spec: dict, transform: str, where: str) -> None:
    """No chat formatting of a prompt the transform continues a solution in."""
    for key in ("chat", "system_prompt"):
        if spec.get(key):
            raise RecipeError(
                f"{where}.{key}: transform {transform!r} continues a solution inside the prompt's text, which a chat "
                f"turn would close; give the prompt as text (write the chat template into "
                f"{'prompt_template' if transform == 'step_pairs' else 'the sampling stage prompt_template'}, as the "
                f"Step-DPO authors' qwen2-boxed prompt does)")


def _check_sampled(params: dict, spec: dict, where: str, transform: str) -> None:
    """step_prefixes / step_controlled_pairs: text prompts an eval run already formatted, a step separator and a
    score key."""
    _check_text_prompts(spec, transform, where)
    if spec.get("prompt_template"):
        raise RecipeError(f"{where}.prompt_template: transform {transform!r} reads prompts an eval run already "
                          f"formatted; set the template in the stage that sampled them")
    if not isinstance(params["separator"], str) or not params["separator"]:
        raise RecipeError(f"{where}.steps.separator: the non-empty text that ends a step (e.g. \"\\n\"), got "
                          f"{params['separator']!r}")
    check_score_key(params["score"], f"{where}.steps.score")


def _check_prefixes(params: dict, spec: dict, where: str) -> None:
    _check_sampled(params, spec, where, "step_prefixes")


def _check_controlled(params: dict, spec: dict, where: str) -> None:
    _check_sampled(params, spec, where, "step_controlled_pairs")
    if not isinstance(params["solutions"], str) or not params["solutions"]:
        raise RecipeError(f"{where}.steps.solutions: transform 'step_controlled_pairs' needs the samples.jsonl the "
                          f"prefixes were cut from (the correct solutions, whose remaining steps are chosen), e.g. "
                          f"\"${{stages.solve.output}}/samples.jsonl\"; got {params['solutions']!r}")


@TRANSFORMS.register("step_pairs", section="steps", rows_per_row=1, template_after=False,
                     columns=("prompt", "steps.prefix_column", "chosen", "rejected"),
                     check=lambda params, spec, where: _check_text_prompts(spec, "step_pairs", where),
                     empty="the source has no rows",
                     paper="Step-DPO: Step-wise Preference Optimization for Long-chain Reasoning of LLMs",
                     arxiv="2406.18629")
def step_pairs(rows: list[dict], where: str, prompt_template: str | None = None, *,
               prefix_column: str = "initial_reason_steps", prefix_separator: str = "\n") -> list[dict]:
    """Step-DPO's pairs, as the authors' train.py (apply_step_wise_chat_template) builds them: the prompt is the
    question formatted by `prompt_template` (their alpaca / deepseek-math / qwen2-boxed prompts are such templates),
    then, when the row has correct steps before the pair's step (column `prefix_column`, xinlai/Math-Step-DPO-10K's
    by default), `prefix_separator` and those steps ("\\n" after their alpaca prompt, " " after deepseek-math's, ""
    after qwen2-boxed's). chosen / rejected are kept as they are (the correct and the wrong next step); so are the
    other columns."""
    for col in ("prompt", prefix_column, "chosen", "rejected"):
        if rows and col not in rows[0]:
            raise DataError(f"{where}: transform 'step_pairs' needs column {col!r}"
                            f"{' (steps.prefix_column)' if col == prefix_column else ''}; present: {', '.join(rows[0])}")
    out = []
    for row in rows:
        question = row["prompt"]
        if not isinstance(question, str):
            raise DataError(f"{where}: transform 'step_pairs' needs text prompts, got {type(question).__name__}")
        question = format_prompt(question, prompt_template, row)
        prefix = row[prefix_column] or ""
        out.append({**row, "prompt": question + prefix_separator + prefix if prefix else question})
    return out


def split_steps(solution: str, separator: str) -> list[str]:
    """The steps of a solution: each ends with `separator` except the last; "".join(steps) == solution. A trailing
    separator ends the last step (no empty step after it)."""
    pieces = solution.split(separator)
    steps = [piece + separator for piece in pieces[:-1]]
    if pieces[-1]:
        steps.append(pieces[-1])
    return steps


def _first_correct(rows: list[dict], where: str, transform: str, score: str, correct_score: float) -> list[dict]:
    """Each prompt's first sample scoring at least `correct_score` (the SCDPO authors take correct_solutions[0])."""
    chosen = []
    for group in scored_groups(rows, where, transform, score):
        correct = [row for s, row in group if s >= correct_score]
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


@TRANSFORMS.register("step_prefixes", section="steps", rows_per_row=None, template_after=False,
                     columns=("prompt", "completion", "steps.score"), check=_check_prefixes,
                     empty="no prompt has a correct sample (score >= steps.correct_score)",
                     paper="Step-Controlled DPO: Leveraging Stepwise Error for Enhanced Mathematical Reasoning",
                     arxiv="2407.00782")
def step_prefixes(rows: list[dict], where: str, *, separator: str = "\n", score: str = "score",
                  correct_score: float = 1.0) -> list[dict]:
    """SCDPO's continuation prompts (the authors' prepare_initial_data_divided): per prompt, its first correct
    solution, cut after each k = 0 .. m-1 of its m steps; rows {prompt: prompt + the k steps, answer, prefix_steps: k}.
    Sampling from them (an eval stage, at a raised temperature) gives solutions that go wrong after step k."""
    out = []
    for row in _first_correct(rows, where, "step_prefixes", score, correct_score):
        for prompt, k, _ in _prefixes(row, where, "step_prefixes", separator):
            out.append({"prompt": prompt, "answer": row.get("answer"), "prefix_steps": k})
    return out


@TRANSFORMS.register("step_controlled_pairs", section="steps", rows_per_row=None, template_after=False,
                     columns=("prompt", "completion", "steps.score"), check=_check_controlled,
                     ranges={"max_pairs_per_prompt": ">= 1"},
                     empty="no continuation is wrong (score < steps.correct_score)",
                     paper="Step-Controlled DPO: Leveraging Stepwise Error for Enhanced Mathematical Reasoning",
                     arxiv="2407.00782")
def step_controlled_pairs(rows: list[dict], where: str, solution_rows: list[dict] | None = None, *,
                          separator: str = "\n", score: str = "score", correct_score: float = 1.0, solutions: str,
                          max_pairs_per_prompt: int | None = None) -> list[dict]:
    """SCDPO's step-controlled pairs (the authors' get_chosen_rejected_controled_steps_limited): each continuation
    prompt (question + k correct steps, as `step_prefixes` cut it from the samples.jsonl `solutions`; read from there
    unless `solution_rows` gives them) with a wrong continuation gives {prompt, chosen: the correct solution's
    remaining steps, rejected: the first wrong continuation sampled there}. Per question at most
    `max_pairs_per_prompt` (the SCDPO authors' neg_limit: 2 GSM8K, 3 MATH), fewest prefix steps first. The shared k
    steps are prompt, so the loss reads only what follows them (the paper's L_SC, Eq. 4)."""
    if solution_rows is None:
        solution_rows = read_rows(SourceSpec(source=solutions))
    cut: dict[str, tuple[dict, int, str]] = {}
    for solution in _first_correct(solution_rows, f"{where}.steps.solutions", "step_controlled_pairs", score,
                                   correct_score):
        for prompt, k, rest in _prefixes(solution, where, "step_controlled_pairs", separator):
            cut[prompt] = (solution, k, rest)
    groups = scored_groups(rows, where, "step_controlled_pairs", score)
    unknown = [group[0][1]["prompt"] for group in groups if group[0][1]["prompt"] not in cut]
    if unknown:
        raise DataError(f"{where}: {len(unknown)} continuation prompt(s) are no prefix of a correct solution in "
                        f"steps.solutions ({solutions}), e.g. {unknown[0]!r}: steps.solutions must be the "
                        f"samples the step_prefixes stage read, with the same steps.separator / correct_score")
    per_question: dict[str, list[dict]] = {}
    for group in groups:
        wrong = [(s, row) for s, row in group if s < correct_score]
        if not wrong:
            continue
        wrong_score, row = wrong[0]
        solution, k, rest = cut[row["prompt"]]
        per_question.setdefault(solution["prompt"], []).append({
            "prompt": row["prompt"], "chosen": rest, "rejected": row["completion"], "answer": solution.get("answer"),
            "prefix_steps": k, "score_chosen": float(score_of(solution, score)), "score_rejected": wrong_score})
    pairs = []
    for question_pairs in per_question.values():
        pairs += sorted(question_pairs, key=lambda p: p["prefix_steps"])[:max_pairs_per_prompt]
    return pairs
