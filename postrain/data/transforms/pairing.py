"""Transforms between preference shapes: scored samples (an eval run's samples.jsonl: prompt, completion, score; K
rows per prompt) into pairs (`score_pairs`, `win_rate_pairs`) or K-response lists (`score_lists`), K-response lists
into one pair per prompt by curriculum stage (`curriculum_pairs`), pairs into labelled completions (`unpair`).

`score_pairs` and `win_rate_pairs` read their settings under the source's `pairing:`; `curriculum_pairs` reads the
source's `curriculum_stage`.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

from postrain.data.rows import group_by_prompt, require_columns, scored_groups
from postrain.data.transforms.registry import TRANSFORMS
from postrain.errors import DataError, RecipeError


def check_score_key(score: object, where: str) -> None:
    """A score setting: a column name or `rewards.<reward name>`."""
    if not isinstance(score, str) or not score.removeprefix("rewards."):
        raise RecipeError(f"{where}: a column name (default 'score') or 'rewards.<reward name>', got {score!r}")


def _check_pairing(params: dict, spec: dict, where: str) -> None:
    check_score_key(params["score"], f"{where}.pairing.score")


def _filters(params: dict) -> str:
    """The pairing filters in force, for an error message: " by at least 2 (the higher scoring at least 5)"."""
    words = []
    if params["min_margin"] is not None:
        words.append(f" by at least {params['min_margin']}")
    if params["min_chosen_score"] is not None:
        words.append(f" (the higher scoring at least {params['min_chosen_score']})")
    return "".join(words)


@TRANSFORMS.register("score_pairs", section="pairing", rows_per_row=None, columns=("prompt", "completion", "score"),
                     ranges={"min_margin": ">= 0"}, check=_check_pairing,
                     empty=lambda p: f"no prompt has completions scored differently{_filters(p)}")
def score_pairs(rows: list[dict], where: str, *, score: str = "score", min_margin: float | None = None,
                min_chosen_score: float | None = None, all_pairs: bool = False) -> list[dict]:
    """Scored samples -> preference pairs: per prompt, the best-scored completion against the worst (or, with
    `all_pairs`, every higher-scored completion against every lower-scored one, as DNO), keeping the pairs whose
    chosen scores at least `min_margin` above the rejected (DNO's large-margin filter) and at least
    `min_chosen_score` itself (DNO: positives must score 5 or 6 of 6).

    `score`: the score read from each row, a column (default `score`, the weighted sum of an eval's rewards) or
    `rewards.<name>`, one reward's own score from the row's `rewards` mapping. Rows whose score is None (an
    `llm_judge` whose judgment had no parsable score) are left out, not counted as 0. Equal scores never make a pair.
    The chosen row's other columns are kept; `score_chosen` / `score_rejected` are the two scores."""
    pairs = []
    for group in scored_groups(rows, where, "score_pairs", score):
        if all_pairs:
            candidates = [(high, low) for high in group for low in group if high[0] > low[0]]
        else:
            best, worst = max(group, key=lambda g: g[0]), min(group, key=lambda g: g[0])
            candidates = [(best, worst)] if best[0] > worst[0] else []
        for (high, chosen), (low, rejected) in candidates:
            if min_margin is not None and high - low < min_margin:
                continue
            if min_chosen_score is not None and high < min_chosen_score:
                continue
            pairs.append({**chosen, "chosen": chosen["completion"], "rejected": rejected["completion"],
                          "score_chosen": high, "score_rejected": low})
    return pairs


def preference_probability(first: float, second: float, win_rate: str, temperature: float) -> float:
    """P(first > second) from two scalar scores: a logistic in the score difference, or 1 / 0.5 / 0."""
    if win_rate == "hard":
        return 1.0 if first > second else 0.5 if first == second else 0.0
    x = (first - second) / temperature
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))  # no overflow either way


@TRANSFORMS.register("win_rate_pairs", section="pairing", rows_per_row=None,
                     columns=("prompt", "completion", "score"), ranges={"temperature": "> 0"},
                     check=_check_pairing, empty="no prompt has two samples of different win rates",
                     paper="Self-Play Preference Optimization for Language Model Alignment", arxiv="2405.00675")
def win_rate_pairs(rows: list[dict], where: str, *, score: str = "score",
                   win_rate: Literal["sigmoid", "hard"] = "sigmoid", temperature: float = 1.0,
                   include_self: bool = True) -> list[dict]:
    """SPPO's pairs (arXiv 2405.00675; uclaml/SPPO scripts/compute_prob.py): per prompt, each sample's estimated win
    rate against the prompt's K samples, P(y > pi_t) = mean_j P(y > y_j) (j = y itself included, at 0.5, unless
    `include_self` is false: the mean over the K - 1 others), P from the scores: `win_rate: sigmoid`,
    1 / (1 + exp(-(s - s') / temperature)) (compute_prob.py on PairRM scores, temperature 1), or `hard`: 1, 0.5 or
    0. The highest win rate is chosen, the lowest rejected, their win rates `chosen_probs` / `rejected_probs` (what
    the `sppo` loss reads; the authors' columns chosen_probs_win / chosen_probs_lose). A prompt whose win rates are
    all equal (one sample, or equal scores) gives no pair. `score` as score_pairs reads it."""
    prefer = functools.partial(preference_probability, win_rate=win_rate, temperature=temperature)
    pairs = []
    for group in scored_groups(rows, where, "win_rate_pairs", score):
        scores = [s for s, _ in group]
        opponents = len(scores) if include_self else len(scores) - 1
        if opponents < 1:
            continue
        rates = [sum(prefer(s, t) for j, t in enumerate(scores) if include_self or j != i) / opponents
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


@TRANSFORMS.register("score_lists", rows_per_row=None, columns=("prompt", "completion", "score"),
                     empty="no prompt has two completions scored differently")
def score_lists(rows: list[dict], where: str) -> list[dict]:
    """Scored samples -> K-response lists {prompt, completions, scores} (list-wise losses; the other columns from
    the prompt's first row), for every prompt with at least two completions scored differently."""
    require_columns(rows, ("prompt", "completion", "score"), where, "score_lists")
    lists = []
    for group in group_by_prompt(rows).values():
        if len({r["score"] for r in group}) > 1:
            rest = {k: v for k, v in group[0].items() if k not in ("completion", "score")}
            lists.append({**rest, "completions": [r["completion"] for r in group],
                          "scores": [float(r["score"]) for r in group]})
    return lists


def _check_stage(params: dict, spec: dict, where: str) -> None:
    stage = params["curriculum_stage"]
    if not isinstance(stage, int) or isinstance(stage, bool) or stage < 0:
        raise RecipeError(f"{where}.curriculum_stage: transform 'curriculum_pairs' needs the stage, an integer >= 0 "
                          f"(0: each prompt's easiest pair, the largest score gap), got {stage!r}")


@TRANSFORMS.register("curriculum_pairs", rows_per_row=None, columns=("prompt", "completions", "scores"),
                     check=_check_stage,
                     empty=lambda p: f"stage {p['curriculum_stage']} has no pair: no prompt has "
                                     f"{p['curriculum_stage'] + 1} completions scored below its best",
                     paper="Curry-DPO: Enhancing Alignment using Curriculum Learning & Ranked Preferences",
                     arxiv="2403.07230")
def curriculum_pairs(rows: list[dict], where: str, *, curriculum_stage: int) -> list[dict]:
    """Curry-DPO's pairs for one curriculum stage (arXiv 2403.07230, Fig. 1): per prompt of K-response rows
    {prompt, completions, scores}, the best-scored completion is chosen against each lower-scored one; those pairs
    are ordered by score gap, largest (easiest) first, and stage `curriculum_stage` (from 0; K - 2: the smallest
    gap, the hardest) takes each prompt's pair at that position (K = 4: (R1, R4), then (R1, R3), then (R1, R2));
    prompts without that many lower-scored completions drop out. Ties keep the list's order. The row's other
    columns are kept; `score_chosen` / `score_rejected` are the scores."""
    require_columns(rows, ("prompt", "completions", "scores"), where, "curriculum_pairs",
                    " (rows {prompt, completions, scores})")
    pairs = []
    for n, row in enumerate(rows):
        completions, scores = row["completions"], [float(s) for s in row["scores"]]
        if len(completions) != len(scores):
            raise DataError(f"{where}, row {n}: {len(completions)} completions but {len(scores)} scores")
        best = max(range(len(scores)), key=lambda i: scores[i])  # the first of equally best-scored ones
        # by falling gap to the best = by rising score; sorted() is stable, so equal gaps keep the list's order.
        # A tie with the best is no preference.
        others = sorted((i for i in range(len(scores)) if scores[i] < scores[best]), key=lambda i: scores[i])
        if curriculum_stage < len(others):
            worse = others[curriculum_stage]
            rest = {k: v for k, v in row.items() if k not in ("completions", "scores", "ranks")}
            pairs.append({**rest, "chosen": completions[best], "rejected": completions[worse],
                          "score_chosen": scores[best], "score_rejected": scores[worse]})
    return pairs


@TRANSFORMS.register("unpair", rows_per_row=2, columns=("chosen", "rejected"))
def unpair(dataset, where: str):
    """Each (prompt, chosen, rejected) row -> a desirable row (chosen, label true) and an undesirable one
    (rejected, label false), for unpaired losses (KTO, BCO, ...): TRL's unpair_preference_dataset, other columns
    copied to both."""
    from trl.data_utils import unpair_preference_dataset  # slow: trl, only when a source unpairs

    for col in ("chosen", "rejected"):
        if col not in dataset.column_names:
            raise DataError(f"{where}: transform 'unpair' needs column {col!r}; present: "
                            f"{', '.join(dataset.column_names)}")
    # TRL copies every other column to both rows: an existing `completion` (built-in rows carry the SFT target)
    # would overwrite the unpaired completion, and an existing `label` the new labels.
    stale = [c for c in ("completion", "label") if c in dataset.column_names]
    return unpair_preference_dataset(dataset.remove_columns(stale) if stale else dataset)
