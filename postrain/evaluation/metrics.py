"""An eval set's metrics as papers report them: pass@k, maj@k and mean@n, each with a confidence interval.

Pure functions over per-prompt lists (no I/O, no model; answer equivalence comes in as a callable), so the eval
job, in-training eval and report tools compute the same numbers. A prompt's samples are in generation order.

- ``pass@k`` (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv:2107.03374): for a
  prompt with n samples of which c are correct, the unbiased estimator 1 - C(n-c, k) / C(n, k) of the chance that
  at least one of k samples is correct; averaged over prompts.
- ``maj@k`` (majority vote, "self-consistency"): the prompt's first k samples vote with their parsed answers;
  equivalent answers (as the verifier judges, e.g. "1/2", "0.5", "\\frac{1}{2}") share one bucket; a sample with
  no parsable answer does not vote. The largest bucket wins; a tie goes to the bucket whose answer appeared
  first. The prompt scores 1 when the winning bucket's first sample is correct; a prompt where nothing parses
  scores 0.
- ``mean@n``: the mean over prompts of the mean verifier score of the prompt's n samples (= accuracy when every
  prompt has n samples).

A sample is *correct* (for pass@k and maj@k) when the verifier scores it at least 1.0 (`is_correct`): the
built-in verifiers score 1.0 or 0.0.

Intervals are over prompts (the prompts are the sample of a population; a prompt's samples are not independent
draws of the metric): a percentile bootstrap (`resamples` resamples of the prompts with replacement, seeded) or a
normal interval (mean +- z * sample standard deviation / sqrt(prompts)). Fewer than 2 prompts give no interval.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from statistics import NormalDist
from typing import Any

INTERVAL_METHODS = ("bootstrap", "normal")
# The most prompt indices one bootstrap chunk draws at once (resamples x prompts), to bound memory on big sets.
_BOOTSTRAP_CHUNK = 2_000_000


def is_correct(score: float | None) -> bool:
    """Whether a verifier score counts as a correct sample for pass@k and maj@k (None: the verifier gave none)."""
    return score is not None and score >= 1.0


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """The unbiased pass@k estimate for one prompt: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) (the Codex paper's form), which never forms the binomial
    coefficients: they overflow a float for n in the hundreds."""
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 1 <= k <= n samples, got k={k}, n={num_samples}")
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"the number of correct samples must be in [0, {num_samples}], got {num_correct}")
    if num_samples - num_correct < k:  # every k-subset holds a correct sample
        return 1.0
    all_wrong = 1.0
    for i in range(num_samples - num_correct + 1, num_samples + 1):
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


def vote_buckets(answers: Sequence[Any], equivalent: Callable[[Any, Any], bool] | None = None) -> list[list[int]]:
    """The indices of the answers that are not None, grouped into buckets of equivalent answers.

    Buckets are in order of first appearance; each answer joins the first bucket whose first answer is equivalent
    to it (`equivalent(first, answer)`; default `==`). Comparing with the first answer only keeps the grouping
    deterministic when the equivalence is not transitive (a verifier's tolerance: 50% ~ 0.5 and 50% ~ 50)."""
    same = equivalent or operator.eq
    buckets: list[list[int]] = []
    for index, answer in enumerate(answers):
        if answer is None:
            continue
        for bucket in buckets:
            if same(answers[bucket[0]], answer):
                bucket.append(index)
                break
        else:
            buckets.append([index])
    return buckets


def majority_vote_correct(
    answers: Sequence[Any], correct: Sequence[bool], k: int, equivalent: Callable[[Any, Any], bool] | None = None
) -> bool:
    """maj@k for one prompt: whether the majority answer among the first k samples is correct.

    `answers[i]` is sample i's parsed answer (None: unparsable, no vote), `correct[i]` whether the verifier scored
    it correct. The largest bucket of equivalent answers wins; among equally large buckets, the one whose answer
    appeared first. Its first sample's correctness is the prompt's; no parsable answer at all is wrong."""
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj@k needs 1 <= k <= n samples, got k={k}, n={len(answers)}")
    if len(correct) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    buckets = vote_buckets(answers[:k], equivalent)
    if not buckets:
        return False
    winner = max(buckets, key=len)  # max keeps the first of equal maxima: the earliest answer wins a tie
    return bool(correct[winner[0]])


def per_prompt_metrics(
    scores: Sequence[Sequence[float | None]],
    answers: Sequence[Sequence[Any]] | None = None,
    *,
    pass_at: Sequence[int] = (1,),
    maj_at: Sequence[int] = (),
    equivalent: Callable[[Any, Any], bool] | None = None,
) -> dict[str, list[float]]:
    """Each metric's value on every prompt: {"mean@n": [...], "pass@k": [...], "maj@k": [...]}.

    `scores[p]` are the verifier's scores of prompt p's samples (None counts as 0 and as not correct),
    `answers[p]` their parsed answers (needed for maj@k only). The metric of a set or subset is the mean of these
    values over its prompts (`summarize`)."""
    if maj_at and answers is None:
        raise ValueError("maj@k needs the samples' parsed answers")
    sizes = {len(s) for s in scores}
    n_label = str(sizes.pop()) if len(sizes) == 1 else "n"
    values: dict[str, list[float]] = {f"mean@{n_label}": [_mean([s or 0.0 for s in row]) for row in scores]}
    correct = [[is_correct(s) for s in row] for row in scores]
    for k in sorted(set(pass_at)):
        values[f"pass@{k}"] = [pass_at_k(len(row), sum(row), k) for row in correct]
    for k in sorted(set(maj_at)):
        values[f"maj@{k}"] = [
            float(majority_vote_correct(prompt_answers, row, k, equivalent))
            for prompt_answers, row in zip(answers, correct)
        ]
    return values


def confidence_interval(
    values: Sequence[float],
    *,
    method: str = "bootstrap",
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """A `confidence` interval for the mean of `values` (one value per prompt); None for fewer than 2 values.

    `bootstrap`: the (1-confidence)/2 and (1+confidence)/2 quantiles of the means of `resamples` resamples with
    replacement, drawn by numpy's default generator seeded with `seed` (same inputs, same interval). `normal`:
    mean +- z * s / sqrt(m), with s the sample standard deviation; clipped to [0, 1] when every value lies there
    (rates cannot leave it)."""
    if method not in INTERVAL_METHODS:
        raise ValueError(f"unknown interval method {method!r}; use one of {', '.join(INTERVAL_METHODS)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    m = len(values)
    if m < 2:
        return None
    if method == "normal":
        mean = _mean(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (m - 1))
        half = NormalDist().inv_cdf(0.5 + confidence / 2) * sd / math.sqrt(m)
        low, high = mean - half, mean + half
        if all(0.0 <= v <= 1.0 for v in values):
            low, high = max(low, 0.0), min(high, 1.0)
        return low, high
    # slow: numpy, only for the bootstrap
    import numpy as np

    if resamples < 1:
        raise ValueError(f"the bootstrap needs resamples >= 1, got {resamples}")
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK // m)
    means = np.concatenate([
        data[rng.integers(0, m, size=(min(chunk, resamples - start), m))].mean(axis=1)
        for start in range(0, resamples, chunk)
    ])
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def summarize(
    values: dict[str, Sequence[float]],
    prompts: Sequence[int] | None = None,
    *,
    interval: str = "bootstrap",
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """{metric: {"value": mean over prompts, "ci": [low, high] or None}} over the prompts `prompts` (default: all)
    of `per_prompt_metrics`' output. Every metric of one call is resampled with the same seed, so their
    intervals come from the same bootstrap resamples of the prompts."""
    out: dict[str, dict[str, Any]] = {}
    for name, per_prompt in values.items():
        chosen = list(per_prompt) if prompts is None else [per_prompt[i] for i in prompts]
        ci = confidence_interval(chosen, method=interval, confidence=confidence, resamples=resamples, seed=seed)
        out[name] = {"value": _mean(chosen) if chosen else None, "ci": list(ci) if ci is not None else None}
    return out


def group_prompts(labels: Sequence[Any]) -> dict[str, list[int]]:
    """Prompt indices by subset label (its string form), labels in natural order: numbers by value ("2" before
    "10"), then text; a missing label (None) is the subset "None"."""
    groups: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(str(label), []).append(index)
    return {label: groups[label] for label in sorted(groups, key=_natural_key)}


def _natural_key(label: str) -> tuple:
    try:
        number = float(label)
    except ValueError:
        number = math.nan
    return (0, number, label) if math.isfinite(number) else (1, 0.0, label)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
