"""`postrain eval`: generate on one or more eval sets and score with the same reward functions as GRPO.

Per set: accuracy (mean of the first reward, the verifier), the weighted mean reward, each reward's mean, the
fraction of completions the verifier could not parse, and mean completion length. Every sample goes to
`samples.jsonl`, the summary to `results.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from postrain.jobs.common import RunOptions, prepare_run_dir, running, write_json
from postrain.recipes import Recipe


def render_prompts(prompts: list[Any], tokenizer) -> list[str]:
    """Chat prompts go through the chat template (with the generation prompt); plain text is used as is."""
    return [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list) else p
        for p in prompts
    ]


def generate(model, tokenizer, prompts: list[Any], gen: dict) -> list[list[str]]:
    """Batched generation with a KV cache; returns `num_samples` completions per prompt."""
    import torch

    texts = render_prompts(prompts, tokenizer)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only batching: pad on the left so generation continues the prompt
    model.eval()
    out: list[list[str]] = []
    n = gen["num_samples"]
    kwargs: dict[str, Any] = {
        "max_new_tokens": gen["max_new_tokens"],
        "do_sample": gen["do_sample"],
        "num_return_sequences": n,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "use_cache": True,
    }
    if gen["do_sample"]:
        kwargs.update(temperature=gen["temperature"], top_p=gen["top_p"], top_k=gen["top_k"] or None)
    try:
        for start in range(0, len(texts), gen["batch_size"]):
            batch = tokenizer(texts[start : start + gen["batch_size"]], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            with torch.no_grad():
                ids = model.generate(**batch, **kwargs)
            new = ids[:, batch["input_ids"].shape[1] :]
            decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
            out += [decoded[i : i + n] for i in range(0, len(decoded), n)]
    finally:
        tokenizer.padding_side = side
    return out


def score_set(rows: list[dict], completions: list[list[str]], rewards, weights, tokenizer) -> tuple[dict, list[dict]]:
    """Score every completion with every reward; return the set's summary and its sample records."""
    flat_completions, flat_rows = [], []
    for row, samples in zip(rows, completions):
        for c in samples:
            chat = isinstance(row.get("prompt"), list)
            flat_completions.append([{"role": "assistant", "content": c}] if chat else c)
            flat_rows.append(row)
    texts = [c[0]["content"] if isinstance(c, list) else c for c in flat_completions]
    completion_ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    # The keyword arguments TRL's GRPOTrainer passes (trl 1.16, `_calculate_rewards`), so that a reward written
    # for training runs here unchanged: dataset columns, prompts, completion_ids, trainer_state (no trainer: None),
    # log_extra (extra per-sample columns, kept in samples.jsonl) and log_metric (kept in results.json).
    extra_columns: dict[str, list] = {}
    metrics: dict[str, list[float]] = {}
    columns = {k: [r.get(k) for r in flat_rows] for k in rows[0] if k not in ("prompt", "completion")} if rows else {}
    columns.update(
        prompts=[r.get("prompt") for r in flat_rows], completion_ids=completion_ids, trainer_state=None,
        log_extra=lambda column, values: extra_columns.setdefault(column, []).extend(values),
        log_metric=lambda name, value: metrics.setdefault(name, []).append(float(value)),
    )
    per_reward = {fn.name: fn(flat_completions, **columns) for fn in rewards}
    verifier = rewards[0] if rewards else None
    parsed = [verifier.parse(t) if hasattr(verifier, "parse") else None for t in texts]
    samples = []
    for i, (row, text) in enumerate(zip(flat_rows, texts)):
        scores = {name: vals[i] for name, vals in per_reward.items()}
        total = sum(w * (s if s is not None else 0.0) for w, s in zip(weights, scores.values()))
        samples.append({
            "prompt": row.get("prompt"), "completion": text, "answer": row.get("answer"),
            "score": total, "rewards": scores, "parsed": parsed[i],
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
        "reward_errors": {fn.name: fn.pop_error_count() for fn in rewards},
        **({"reward_metrics": {k: sum(v) / len(v) for k, v in metrics.items()}} if metrics else {}),
    }
    return summary, samples


def run(recipe: Recipe, options: RunOptions) -> dict:
    from postrain.data.sources import load_source
    from postrain.errors import RecipeError
    from postrain.models.loading import load_model
    from postrain.models.loading import check_model_reference
    from postrain.rewards import build_rewards, check_reward_columns

    cfg = recipe.cfg
    if not cfg["sets"]:
        raise RecipeError("`eval` needs at least one entry under sets: (name: {source: ...})")
    if not cfg["rewards"]:
        raise RecipeError("`eval` needs at least one entry under rewards: (the first is the verifier behind accuracy)")
    policy = cfg["reward_errors"]
    base_dir = recipe.path.parent if recipe.path else None
    rewards, weights = build_rewards(cfg["rewards"], on_error=policy["policy"], error_score=policy["score"], base_dir=base_dir)
    sets, generation = {}, {}
    for name, spec in cfg["sets"].items():
        spec = dict(spec)
        overrides = spec.pop("generation", None) or {}
        bad = [k for k in overrides if k not in cfg["generation"]]
        if bad:
            raise RecipeError(f"sets.{name}.generation.{bad[0]} is not a generation setting; valid: {', '.join(cfg['generation'])}")
        generation[name] = {**cfg["generation"], **overrides}
        dataset = load_source(spec, "eval", where=f"sets.{name}")
        check_reward_columns(rewards, dataset.column_names, f"sets.{name}")
        sets[name] = dataset.to_list()
    check_model_reference(cfg["model"], "model")
    run_dir = prepare_run_dir(recipe, options)
    with running(run_dir):
        import torch

        torch.manual_seed(cfg["seed"])
        model, tokenizer, path = load_model(cfg["model"])
        results: dict[str, Any] = {"model": cfg["model"]["name_or_path"], "model_path": path,
                                   "generation": cfg["generation"], "sets": {}}
        with (Path(run_dir) / "samples.jsonl").open("w") as f:
            for name, rows in sets.items():
                completions = generate(model, tokenizer, [r["prompt"] for r in rows], generation[name])
                summary, samples = score_set(rows, completions, rewards, weights, tokenizer)
                results["sets"][name] = {**summary, "generation": generation[name]}
                for s in samples:
                    f.write(json.dumps({"set": name, **s}, default=str) + "\n")
        write_json(Path(run_dir) / "results.json", results)
    return {"run_dir": str(run_dir), "results": results}
