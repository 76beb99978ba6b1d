"""Scoring an eval set's completions: every reward on every completion, the set's summary and its sample records.

`postrain eval` (postrain.jobs.evaluate) and evaluation during training (postrain.jobs.train_eval) score with it,
so both report the same numbers: accuracy, rewards, lengths and the papers' metrics (postrain.evaluation.metrics)
with the settings of a recipe's `metrics:` (`EvalMetricsSpec`, part of the recipe schema).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from postrain.evaluation.metrics import group_prompts, per_prompt_metrics, summarize


@dataclass
class EvalMetricsSpec:
    """What `postrain eval` reports per set besides accuracy (postrain.evaluation.metrics), each with a confidence
    interval over prompts. Top-level `metrics:` applies to every set; a set's own `metrics:` overrides it key by key.
    Every k must be at most the set's `generation.num_samples` (checked at load time)."""

    # pass@k, the unbiased estimator of Chen et al. 2021 (arXiv:2107.03374) over each prompt's num_samples samples.
    pass_at: list[int] = field(default_factory=lambda: [1])
    # maj@k: is the majority answer (by the verifier's equivalence) among each prompt's first k samples correct?
    maj_at: list[int] = field(default_factory=list)
    # A column of the set's rows (difficulty, topic, ...): the metrics are also reported per value of it.
    subset_column: str | None = None
    # `bootstrap`: percentile bootstrap over prompts, seeded with the recipe's `seed`; `normal`: mean +- z * s.e.
    interval: Literal["bootstrap", "normal"] = "bootstrap"
    confidence: float = 0.95
    resamples: int = 1000


def score_set(
    rows: list[dict],
    completions: list[list[str]],
    rewards,
    weights,
    tokenizer,
    *,
    metrics: dict | None = None,
    seed: int = 0,
    completion_ids: list[list[list[int]]] | None = None,
) -> tuple[dict, list[dict]]:
    """Score every completion with every reward; return the set's summary and its sample records.

    `completion_ids` (nested as `completions`; `generate_with_ids`) are the generated tokens up to and including
    EOS: they are what rewards get as `completion_ids` and what `mean_length_tokens` counts, as in TRL's GRPO
    training. Without them the decoded texts are tokenized again (special tokens, EOS among them, then go uncounted).

    `metrics` holds the metric settings (the keys of `metrics:` in an eval recipe: pass_at, maj_at,
    subset_column, interval, confidence, resamples; missing keys take the recipe defaults); `seed` seeds the
    bootstrap. The summary's "metrics" maps "mean@n", "pass@k", "maj@k" to {"value", "ci"}."""
    settings = _metric_settings(metrics)
    flat_completions, flat_rows = [], []
    for row, samples in zip(rows, completions):
        for c in samples:
            chat = isinstance(row.get("prompt"), list)
            flat_completions.append([{"role": "assistant", "content": c}] if chat else c)
            flat_rows.append(row)
    texts = [c[0]["content"] if isinstance(c, list) else c for c in flat_completions]
    if completion_ids is not None:
        completion_ids = [ids for samples in completion_ids for ids in samples]
    else:
        completion_ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    # The keyword arguments TRL's GRPOTrainer passes (trl 1.16, `_calculate_rewards`), so that a reward written
    # for training runs here unchanged: dataset columns, prompts, completion_ids, trainer_state (no trainer: None),
    # log_extra (extra per-sample columns, kept in samples.jsonl) and log_metric (kept in results.json).
    extra_columns: dict[str, list] = {}
    logged: dict[str, list[float]] = {}
    columns = {k: [r.get(k) for r in flat_rows] for k in rows[0] if k not in ("prompt", "completion")} if rows else {}
    columns.update(
        prompts=[r.get("prompt") for r in flat_rows], completion_ids=completion_ids, trainer_state=None,
        log_extra=lambda column, values: extra_columns.setdefault(column, []).extend(values),
        log_metric=lambda name, value: logged.setdefault(name, []).append(float(value)),
    )
    per_reward = {fn.name: fn(flat_completions, **columns) for fn in rewards}
    verifier = rewards[0] if rewards else None
    parsed = [verifier.parse(t) if hasattr(verifier, "parse") else None for t in texts]
    subset_column = settings["subset_column"]
    samples = []
    for i, (row, text) in enumerate(zip(flat_rows, texts)):
        scores = {name: vals[i] for name, vals in per_reward.items()}
        total = sum(w * (s if s is not None else 0.0) for w, s in zip(weights, scores.values()))
        samples.append({
            "prompt": row.get("prompt"), "completion": text, "answer": row.get("answer"),
            "score": total, "rewards": scores, "parsed": parsed[i],
            **({"subset": row.get(subset_column)} if subset_column else {}),
            **{column: values[i] for column, values in extra_columns.items() if len(values) == len(texts)},
        })
    n = max(len(samples), 1)
    lengths = [len(ids) for ids in completion_ids]
    summary = {
        "prompts": len(rows),
        "samples": len(samples),
        "accuracy": sum((s["rewards"][verifier.name] or 0.0) for s in samples) / n if verifier else None,
        "mean_reward": sum(s["score"] for s in samples) / n,
        "rewards": {name: sum(v or 0.0 for v in vals) / n for name, vals in per_reward.items()},
        "unparsable": (sum(p is None for p in parsed) / n) if hasattr(verifier, "parse") else None,
        "mean_length_tokens": sum(lengths) / n,
        **_reward_counts(rewards),
        **({"reward_metrics": {k: sum(v) / len(v) for k, v in logged.items()}} if logged else {}),
    }
    if verifier is not None and rows:
        summary.update(_paper_metrics(rows, completions, per_reward[verifier.name], parsed, texts, verifier,
                                      settings, seed))
    return summary, samples


def _reward_counts(rewards: list) -> dict:
    """Each reward's failed completions (`reward_errors`) and its other counts (`reward_counts`: timeouts, NaN or
    infinite scores, a code reward's outcomes), since the last set."""
    counts = {fn.name: fn.pop_counts() if hasattr(fn, "pop_counts") else {"errors": fn.pop_error_count()}
              for fn in rewards}
    return {"reward_errors": {name: c.get("errors", 0) for name, c in counts.items()},
            "reward_counts": {name: {k: v for k, v in c.items() if k != "errors"} for name, c in counts.items()}}


def _metric_settings(metrics: dict | None) -> dict:

    defaults = asdict(EvalMetricsSpec())
    unknown = [key for key in metrics or {} if key not in defaults]
    if unknown:
        raise ValueError(f"unknown metric setting {unknown[0]!r}; valid: {', '.join(defaults)}")
    return {**defaults, **(metrics or {})}


def _paper_metrics(rows, completions, verifier_scores, parsed, texts, verifier, settings: dict, seed: int) -> dict:
    """The set's mean@n / pass@k / maj@k with intervals, and the same per subset when a subset column is set."""
    if settings["maj_at"] and not hasattr(verifier, "parse"):
        raise ValueError(f"maj@k votes with parsed answers, but the verifier {verifier.name!r} has no parse method")
    equivalent = getattr(verifier, "equivalent", None)
    # The vote compares what `equivalent` reads (the completions) or, without it, the parsed answers as strings;
    # None (no parsable answer) does not vote either way.
    votes = [(text if equivalent else answer) if answer is not None else None for answer, text in zip(parsed, texts)]
    scores, answers, start = [], [], 0
    for samples in completions:
        scores.append(verifier_scores[start : start + len(samples)])
        answers.append(votes[start : start + len(samples)])
        start += len(samples)
    values = per_prompt_metrics(scores, answers, pass_at=settings["pass_at"], maj_at=settings["maj_at"],
                                equivalent=equivalent)
    interval = {key: settings[key] for key in ("interval", "confidence", "resamples")}
    out: dict[str, Any] = {"metrics": summarize(values, seed=seed, **interval)}
    column = settings["subset_column"]
    if column:
        subsets = {}
        for label, indices in group_prompts([row.get(column) for row in rows]).items():
            subset_scores = [s or 0.0 for i in indices for s in scores[i]]
            subsets[label] = {"prompts": len(indices), "samples": len(subset_scores),
                              "accuracy": sum(subset_scores) / max(len(subset_scores), 1),
                              "metrics": summarize(values, indices, seed=seed, **interval)}
        out["subsets"] = {"column": column, "values": subsets}
    return out
