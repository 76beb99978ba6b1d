"""`postrain eval`: generate on one or more eval sets and score with the same reward functions as GRPO.

Per set: accuracy (mean of the first reward, the verifier), the weighted mean reward, each reward's mean, the
fraction of completions the verifier could not parse, mean completion length, and the metrics papers report
(mean@n, pass@k, maj@k, each with a confidence interval over prompts: postrain.evaluation.metrics), also per
subset when `metrics.subset_column` names a column. Every sample goes to `samples.jsonl`, the summary to
`results.json`: the shared generation and metric settings once, and per set only what the set changes. With
`models:` several models are evaluated on the same sets, each under its own name
(postrain.evaluation.results.model_results reads both shapes), and one table compares them at the end.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from postrain.data.sources import load_source, source_size
from postrain.errors import DataError, RecipeError, did_you_mean
from postrain.evaluation import lm_eval_backend  # imports lm-eval (optional) only where it runs
from postrain.evaluation.results import results_table
from postrain.evaluation.settings import check_eval_recipe, differences, model_entries
from postrain.evaluation.scoring import score_set
from postrain.evaluation.settings import set_generation, set_metric_settings
from postrain.jobs import checks, smoke
from postrain.jobs.common import RunOptions, check_models_exist, prepare_run_dir, running, write_json
from postrain.jobs.plan import check_rewards
from postrain.models.generation import generate_with_ids
from postrain.models import loading as model_loading  # load_model through it: tests replace it there
from postrain.models.loading import check_model_reference
from postrain.recipes import Recipe
from postrain.rewards import build_rewards, check_reward_columns, policy_options


def check(cfg: dict, origins: dict[str, str]) -> None:
    """Load-time checks of an eval recipe, in this order: the per-set generation and metric settings (k <=
    num_samples, ...) and `models:` (postrain.evaluation.settings), what the job reads, `eval.backend: lm_eval` and
    its `lm_eval:` section (lm-eval itself is imported only when the backend runs), the run's sections, health, the
    reward error policy."""
    check_eval_recipe(cfg, origins)
    checks.check_inputs("eval", cfg, origins)
    lm_eval_backend.check_lm_eval_section("eval", cfg, origins)
    checks.check_run_sections("eval", cfg, origins)
    checks.check_health("eval", cfg, origins)
    checks.check_reward_errors(cfg, origins)


def plan(recipe: Recipe, check_models: bool = True, worker_args: list[str] | None = None) -> dict[str, Any]:
    """The --dry-run lines of an eval run after the head (postrain.jobs.plan): the model, or each of `models:`, then
    lm-eval's tasks and settings (`eval.backend: lm_eval`) or, per set, its prompts, samples and decoding; the
    rewards are built and the local sets checked for the columns they read. `check_models`: every model exists (a
    pipeline stage's are written by earlier stages). `worker_args` is not read: eval runs in the calling process."""
    cfg = recipe.cfg
    if check_models:
        check_models_exist(cfg)
    lm_eval = (cfg.get("eval") or {}).get("backend") == "lm_eval"
    if not lm_eval:  # lm-eval scores with its tasks' own metrics: no rewards, no sets
        check_rewards(recipe, {f"sets.{name}": spec for name, spec in cfg["sets"].items()})
    out: dict[str, Any] = {"model": cfg["model"]["name_or_path"]}
    if cfg.get("models"):  # comparison mode: every model must exist
        entries = model_entries(cfg)
        for label, spec in entries.items():
            if check_models:
                check_model_reference(spec, f"models ({label})")
        out["model"] = ", ".join(f"{label} ({spec['name_or_path']})" for label, spec in entries.items())
    if lm_eval:
        out.update(lm_eval_plan(recipe))
    for name, spec in ({} if lm_eval else cfg["sets"]).items():
        gen = {**cfg["generation"], **(spec.get("generation") or {})}
        decoding = f"sampled (temperature {gen['temperature']})" if gen["do_sample"] else "greedy"
        out[f"set {name}"] = (f"{source_size(spec) or 'unknown'} prompts x {gen['num_samples']} samples, "
                              f"{decoding}, <= {gen['max_new_tokens']} new tokens")
    return out


def lm_eval_plan(recipe: Recipe) -> dict[str, Any]:
    """`eval.backend: lm_eval`'s tasks and settings. Local tasks (task files, `include_path`) are checked by name:
    indexing only the include_path takes milliseconds; lm-eval's own catalogue (thousands of YAML files, seconds) is
    not indexed, so a registered name is checked when the run starts, before its directory is made. No dataset is
    loaded (that needs the hub for registered tasks)."""
    settings = lm_eval_backend.resolved_settings(recipe.cfg, recipe.origins)
    include = settings.get("include_path")
    local: list[str] = []
    if include:
        from lm_eval.tasks import TaskManager  # optional: lm_eval, the lm-evaluation-harness backend

        local = list(TaskManager(include_path=include, include_defaults=False).all_tasks)
    out: dict[str, Any] = {}
    for task in settings["tasks"]:
        if lm_eval_backend.is_task_file(task):
            kind = "task file"
        elif task in local:
            kind = f"task in {include}"
        else:
            kind = "lm-eval task or group (name checked when the run starts; its dataset may need the hub)"
            near = did_you_mean(task, local) if local else ""
            if near:  # not an error: a registered task may share a local one's spelling; a typo is worth a word
                kind += f"; not in include_path: {near}"
        out[f"task {task}"] = kind
    if include:
        out["include_path"] = include
    limit = settings["limit"]
    out["num_fewshot"] = "each task's default" if settings["num_fewshot"] is None else settings["num_fewshot"]
    out["limit"] = ("all documents" if limit is None else f"{limit:g} of each task's documents" if limit < 1
                    else f"{int(limit)} documents per task")
    out["lm-eval batch size"] = settings["batch_size"]
    if settings.get("gen_kwargs"):
        out["gen_kwargs"] = settings["gen_kwargs"]
    if settings.get("apply_chat_template"):
        out["apply_chat_template"] = settings["apply_chat_template"]
    return out


def smoke_layer(cfg: dict) -> dict:
    """The `--smoke` layer of an eval recipe (postrain.jobs.smoke): the tiny model alone, its sets on built-in data,
    short generations with as many samples as its pass@k / maj@k need, lm-eval shrunk."""
    layer: dict = {"model": smoke.smoke_model()}
    rewards = smoke.smoke_rewards(cfg)
    if rewards is not None:
        layer["rewards"] = rewards
    if (cfg.get("eval") or {}).get("backend") == "lm_eval":
        layer["lm_eval"] = smoke.smoke_lm_eval(cfg.get("lm_eval") or {})
    sets = cfg.get("sets") or {"smoke": {}}  # a base recipe names no set: smoke one anyway
    layer["sets"] = {name: smoke.builtin_source(spec, "test", n=8) for name, spec in sets.items()}
    layer["generation"] = {"max_new_tokens": 8, "batch_size": 8, "num_samples": smoke.smoke_samples(cfg, sets)}
    if (cfg.get("metrics") or {}).get("subset_column") or any(
        ((spec or {}).get("metrics") or {}).get("subset_column") for spec in sets.values()
    ):  # built-in rows have no difficulty / topic column to break the metrics down by
        layer["metrics"] = {"subset_column": None}
        for name in layer["sets"]:
            layer["sets"][name]["metrics"] = {"subset_column": None}
    if cfg.get("models"):  # comparison mode: the tiny model alone stands in for all of them
        layer["models"] = None
    if smoke.scores_code(cfg):
        smoke.use_code_task(layer["sets"].values())
    return layer

def progress_printer(label: str, every_s: float = 5.0) -> Callable[[int, int], None]:
    """`on_batch` for `generate`: one plain line (label, batch i/n, elapsed, ETA) for the first and last batch and
    at most every `every_s` seconds between, so a long eval shows it is moving without flooding the console."""
    start = time.monotonic()
    last_print = -every_s

    def report(done: int, total: int) -> None:
        nonlocal last_print
        now = time.monotonic()
        if done not in (1, total) and now - last_print < every_s:
            return
        last_print = now
        elapsed = now - start
        eta = elapsed / done * (total - done)
        print(f"  {label}: batch {done}/{total}, {_duration(elapsed)} elapsed, ETA {_duration(eta)}", flush=True)

    return report


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass
class EvalSet:
    """One set of an eval recipe, loaded: its rows and its own generation and metric settings."""

    rows: list[dict]
    generation: dict[str, Any]
    metrics: dict[str, Any]


def load_sets(cfg: dict, rewards) -> dict[str, EvalSet]:
    """Every set's rows and settings, checked against what scoring needs (reward columns, the subset column, a
    verifier that parses when maj@k votes) before any model loads."""
    sets = {}
    for name, spec in cfg["sets"].items():
        metrics = set_metric_settings(cfg, name)
        if metrics["maj_at"] and not hasattr(rewards[0], "parse"):
            raise RecipeError(f"sets.{name}: maj@k votes with the answers the verifier parses, but the first reward, "
                              f"{rewards[0].name!r}, has no parse method; put exact_match or math_verify first")
        dataset = load_source(spec, "eval", where=f"sets.{name}")
        check_reward_columns(rewards, dataset, f"sets.{name}")
        column = metrics["subset_column"]
        if column and column not in dataset.column_names:
            raise DataError(f"sets.{name}: metrics.subset_column is {column!r}, but the set has no such column; "
                            f"columns present: {', '.join(dataset.column_names)}")
        sets[name] = EvalSet(dataset.to_list(), set_generation(cfg, name), metrics)
    return sets


def evaluate_model(spec: dict, sets: dict[str, EvalSet], rewards, weights, cfg: dict, write_sample) -> dict:
    """Generate on every set with one model and score: {"model", "model_path", "sets": {name: summary}}, each
    set's summary with only the settings it changes from the shared ones."""
    import torch  # slow: torch, needed only when this runs

    torch.manual_seed(cfg["seed"])  # every model of a comparison draws from the same random stream
    model, tokenizer, path = model_loading.load_model(spec)
    out: dict[str, Any] = {"model": spec["name_or_path"], "model_path": path, "sets": {}}
    for name, eval_set in sets.items():
        completions, ids = generate_with_ids(model, tokenizer, [r["prompt"] for r in eval_set.rows],
                                             eval_set.generation, on_batch=progress_printer(f"set {name}"))
        started = time.monotonic()
        summary, samples = score_set(eval_set.rows, completions, rewards, weights, tokenizer,
                                     metrics=eval_set.metrics, seed=cfg["seed"], completion_ids=ids)
        print(f"  set {name}: scored {len(samples)} completions in {_duration(time.monotonic() - started)}",
              flush=True)
        own = {"generation": differences(cfg["generation"], eval_set.generation),
               "metric_settings": differences(cfg["metrics"], eval_set.metrics)}
        out["sets"][name] = {**summary, **{key: value for key, value in own.items() if value}}
        for sample in samples:
            write_sample(name, sample)
    del model  # one model in memory at a time
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def run(recipe: Recipe, options: RunOptions) -> dict:
    cfg = recipe.cfg
    if (cfg.get("eval") or {}).get("backend") == "lm_eval":  # lm-eval's tasks instead of sets: (same results shape)
        return run_lm_eval(recipe, options)
    if not cfg["sets"]:
        raise RecipeError("`eval` needs at least one entry under sets: (name: {source: ...})")
    if not cfg["rewards"]:
        raise RecipeError("`eval` needs at least one entry under rewards: (the first is the verifier behind accuracy)")
    policy = cfg["reward_errors"]
    base_dir = recipe.path.parent if recipe.path else None
    rewards, weights = build_rewards(cfg["rewards"], base_dir=base_dir, **policy_options(policy))
    sets = load_sets(cfg, rewards)
    models = model_entries(cfg)
    comparing = len(models) > 1
    for label, spec in models.items():
        check_model_reference(spec, f"models ({label})" if cfg.get("models") else "model")
    run_dir = prepare_run_dir(recipe, options)
    with running(run_dir, options.started), (Path(run_dir) / "samples.jsonl").open("w") as samples_file:
        per_model = {}
        for number, (label, spec) in enumerate(models.items(), 1):
            if comparing:
                print(f"model {label} ({number}/{len(models)})", flush=True)
            tag = {"model": label} if comparing else {}

            def write_sample(set_name: str, sample: dict, tag=tag) -> None:
                samples_file.write(json.dumps({**tag, "set": set_name, **sample}, default=str) + "\n")

            per_model[label] = evaluate_model(spec, sets, rewards, weights, cfg, write_sample)
        shared = {"generation": cfg["generation"], "metric_settings": {**cfg["metrics"], "seed": cfg["seed"]}}
        results = {"models": per_model, **shared} if comparing else {**per_model[next(iter(per_model))], **shared}
        write_json(Path(run_dir) / "results.json", results)
    print_results_table(results)
    return {"run_dir": recipe.cfg["output_dir"], "results": results}  # where the run is now


def run_lm_eval(recipe: Recipe, options: RunOptions) -> dict:
    """`postrain eval` with eval.backend: lm_eval: the tasks and models checked and loaded before the run directory
    is made, then postrain.evaluation.lm_eval_backend evaluates into it."""
    cfg = recipe.cfg
    settings = lm_eval_backend.resolved_settings(cfg, recipe.origins)
    models = model_entries(cfg)
    for label, spec in models.items():
        check_model_reference(spec, f"models ({label})" if cfg.get("models") else "model")
    task_manager, loaded = lm_eval_backend.load_tasks(settings)
    run_dir = prepare_run_dir(recipe, options)
    with running(run_dir, options.started), (Path(run_dir) / "samples.jsonl").open("w") as samples_file:

        def write_sample(record: dict) -> None:
            samples_file.write(json.dumps(record, default=str) + "\n")

        results = lm_eval_backend.evaluate_models(models, settings, task_manager, loaded,
                                                  cfg["metrics"]["confidence"], write_sample)
        write_json(Path(run_dir) / "results.json", results)
    print_results_table(results)
    return {"run_dir": recipe.cfg["output_dir"], "results": results}  # where the run is now


def print_results_table(results: dict) -> None:
    header, sections = results_table(results)
    settings = results.get("metric_settings", {})
    table = Table(title=f"eval results ({100 * settings.get('confidence', 0.95):g}% {settings.get('interval', '')} "
                        f"intervals over prompts)")
    for title in header:
        table.add_column(title, no_wrap=True)
    for rows in sections:
        for row in rows:
            table.add_row(*row)
        table.add_section()
    Console(width=max(Console().width, 120)).print(table)
