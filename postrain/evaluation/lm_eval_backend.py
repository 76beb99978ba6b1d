"""`eval.backend: lm_eval`: EleutherAI's lm-evaluation-harness, used as a library, on the tasks under `lm_eval:`.

postrain loads the model (tiny, packaged, run directory, local folder or hub id, as for every job) and hands the
loaded model and tokenizer to lm-eval (`HFLM(pretrained=<model>, tokenizer=<tokenizer>)`), so lm-eval downloads
no model. Its tasks are lm-eval's own: registered names (which download their datasets from the hub on first use)
or local task YAMLs (`include_path`, or a path in `tasks`). The keys of `lm_eval:` are `simple_evaluate`'s
argument names. results.json has the postrain backend's shape: per task ("set") the metrics lm-eval reports, each
`{"value", "ci", "stderr"}` with the interval value +- z * stderr where lm-eval gives a stderr, the number of
documents scored, and the settings once at the top; samples.jsonl has one line per document (and filter).
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

from postrain.errors import DataError, RecipeError, did_you_mean, origin_of
from postrain.models import loading as model_loading  # load_model through it: tests replace it there

INSTALL_HINT = "pip install 'postrain[lm_eval]' (or pip install 'lm-eval>=0.4.13,<0.5')"
# The layers --smoke adds (postrain.recipes.loader): its `sets:` stand-in is not the user's doing.
SMOKE_ORIGINS = ("--smoke", "--smoke (data)")


@dataclass
class LMEvalSpec:
    """`lm_eval:` of an eval recipe with `eval.backend: lm_eval`. The keys are lm-eval's own (`simple_evaluate`
    and its CLI; `batch_size` and `device` go to `HFLM`). The model is `model:` (or `models:`), loaded by postrain."""

    # lm-eval task, group or tag names (`hellaswag`, `gsm8k`, `mmlu`), or paths of task YAML files (relative to
    # the recipe file). Registered tasks download their datasets from the hub on first use.
    tasks: list[str] = field(default_factory=list)
    # A folder of task YAML files (relative to the recipe file), searched before lm-eval's own tasks.
    include_path: str | None = None
    # None: each task's own default (its YAML's num_fewshot, else 0).
    num_fewshot: int | None = None
    # Documents per task (an integer), or a fraction of each task (< 1); None: all.
    limit: int | float | None = None
    batch_size: int | str = 1
    # None: cuda when available, else cpu.
    device: str | None = None
    # Generation settings over every generate_until task's own (e.g. {max_gen_toks: 256, do_sample: false}).
    gen_kwargs: dict[str, Any] | None = None
    # true: the tokenizer's chat template; a string: the named template of the tokenizer.
    apply_chat_template: bool | str = False
    system_instruction: str | None = None
    # Resamples behind the stderr of metrics that are not means (bleu, f1, ...); 0: no stderr for those.
    bootstrap_iters: int = 100000


def backend(cfg: dict) -> str:
    return (cfg.get("eval") or {}).get("backend") or "postrain"


def recipe_relative(value: str, key: str, origins: dict[str, str]) -> Path:
    """A path from the recipe, relative to the folder of the recipe file that set `key` (a `defaults:` file's own
    folder for a key it sets); relative to the working directory when it came from the command line."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    origin = Path(origin_of(origins, key))
    base = origin.parent if origin.suffix in (".yaml", ".yml") and origin.is_file() else Path.cwd()
    return (base / path).resolve()


def is_task_file(task: str) -> bool:
    return task.endswith((".yaml", ".yml"))


def resolved_settings(cfg: dict, origins: dict[str, str]) -> dict[str, Any]:
    """`lm_eval:` with its paths resolved (include_path, task YAML paths): what the run uses and results.json keeps."""
    section = {**asdict(LMEvalSpec()), **cfg["lm_eval"]}  # an optional section: its defaults are not in cfg
    if section.get("include_path"):
        section["include_path"] = str(recipe_relative(section["include_path"], "lm_eval.include_path", origins))
    section["tasks"] = [str(recipe_relative(t, "lm_eval.tasks", origins)) if is_task_file(t) else t
                        for t in section["tasks"]]
    return section


def check_lm_eval_section(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """Load-time checks of `eval.backend` and `lm_eval:` (unknown keys and types are the schema's)."""
    if command != "eval":
        return
    section = cfg.get("lm_eval")
    if backend(cfg) != "lm_eval":
        if section is not None:
            raise RecipeError(f"'lm_eval' (from {origin_of(origins, 'lm_eval')}) is set, but eval.backend is "
                              f"{backend(cfg)!r}: set eval.backend: lm_eval to run lm-eval's tasks, or remove lm_eval:")
        return
    where = f"eval.backend is lm_eval (from {origin_of(origins, 'eval.backend')})"
    if not section or not section.get("tasks"):
        raise RecipeError(f"{where}, but lm_eval.tasks is empty: list lm-eval task names (e.g. "
                          f"lm_eval: {{tasks: [hellaswag, gsm8k]}}) or paths of task YAML files")
    if cfg.get("sets") and origin_of(origins, "sets") not in SMOKE_ORIGINS:
        raise RecipeError(f"'sets' (from {origin_of(origins, 'sets')}) are the postrain backend's eval sets, but "
                          f"{where}, which evaluates lm_eval.tasks: move the sets into a task YAML (include_path), "
                          f"or drop eval.backend")
    if importlib.util.find_spec("lm_eval") is None:
        raise RecipeError(f"{where}, but lm-eval is not installed: {INSTALL_HINT}")
    if section.get("include_path"):
        path = recipe_relative(section["include_path"], "lm_eval.include_path", origins)
        if not path.is_dir():
            raise RecipeError(f"lm_eval.include_path (from {origin_of(origins, 'lm_eval.include_path')}) is "
                              f"{section['include_path']!r}, which is not a folder ({path}); it is read relative "
                              f"to the recipe file")
    for task in section["tasks"]:
        if is_task_file(task) and not recipe_relative(task, "lm_eval.tasks", origins).is_file():
            raise RecipeError(f"lm_eval.tasks (from {origin_of(origins, 'lm_eval.tasks')}): task file {task!r} "
                              f"does not exist ({recipe_relative(task, 'lm_eval.tasks', origins)}); a task ending in "
                              f".yaml is a path, read relative to the recipe file")
    batch = section.get("batch_size")
    if isinstance(batch, int) and batch < 1 or isinstance(batch, str) and not batch.startswith("auto"):
        raise RecipeError(f"lm_eval.batch_size (from {origin_of(origins, 'lm_eval.batch_size')}) is {batch!r}: "
                          f"give a positive integer, 'auto' or 'auto:N'")
    limit = section.get("limit")
    if limit is not None and limit <= 0:
        raise RecipeError(f"lm_eval.limit (from {origin_of(origins, 'lm_eval.limit')}) is {limit}: give a number of "
                          f"documents per task (an integer), a fraction of each task (0 < limit < 1), or null for all")
    if (section.get("num_fewshot") or 0) < 0:
        raise RecipeError(f"lm_eval.num_fewshot (from {origin_of(origins, 'lm_eval.num_fewshot')}) must be >= 0")


def task_manager_for(settings: dict):
    """An lm-eval TaskManager that knows the recipe's tasks. Indexing lm-eval's own task catalogue takes several
    seconds (thousands of YAML files), so when every task is a file or a task of `include_path`, only those are
    indexed; a local task that refers to lm-eval's own tasks then fails to load and the full catalogue is used."""
    # optional: lm_eval
    from lm_eval.tasks import TaskManager

    include = settings.get("include_path")
    local = TaskManager(include_path=include, include_defaults=False) if include else None
    if all(is_task_file(t) or (local is not None and t in local.all_tasks) for t in settings["tasks"]):
        manager = local if local is not None else TaskManager(include_defaults=False)
        try:
            return manager, manager.load(list(settings["tasks"]))
        except KeyError:
            pass
    manager = TaskManager(include_path=include)
    unknown = [t for t in settings["tasks"] if not is_task_file(t) and t not in manager.all_tasks]
    if unknown:
        hint = did_you_mean(unknown[0], manager.all_tasks) or "`lm-eval ls tasks` lists them"
        where = f" or in {include}" if include else ""
        raise RecipeError(f"lm_eval.tasks: {unknown[0]!r} is not one of lm-eval's tasks{where}: {hint}")
    return manager, manager.load(list(settings["tasks"]))


def load_tasks(settings: dict):
    """Load every task once before the run directory is made, so that a missing dataset (a hub task without
    network, a data file that is not there) stops the run before anything is written."""
    try:
        return task_manager_for(settings)
    except RecipeError:
        raise
    except Exception as e:  # datasets' and lm-eval's own errors: say which tasks, and the offline caveat
        raise DataError(
            f"lm_eval.tasks {settings['tasks']}: lm-eval could not load the tasks: {type(e).__name__}: {e}. lm-eval's "
            f"registered tasks download their datasets from the Hugging Face hub on first use: they need network or "
            f"a prefilled HF cache (with HF_DATASETS_OFFLINE=1); a local task's data_files are read relative to the "
            f"working directory"
        ) from None


def _plain(value: Any) -> Any:
    """JSON-ready: numpy scalars as Python numbers, tuples as lists."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _number(value: Any) -> float | None:
    value = _plain(value)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def task_metrics(reported: dict, higher_is_better: dict, confidence: float,
                 unit: set[tuple[str, str]] = frozenset()) -> dict[str, dict]:
    """lm-eval's "metric,filter" / "metric_stderr,filter" entries of one task as postrain's metrics: name (the
    metric, with "/filter" unless the filter is lm-eval's "none") -> {"value", "ci", "stderr", "higher_is_better"}.
    The interval is value +- z * stderr (normal); none where lm-eval gives no stderr ("N/A"). As the postrain
    backend's normal interval, it is clipped to [0, 1] for the (metric, filter) pairs in `unit`: those whose every
    per-document value lies there (acc, exact_match; not bleu or perplexity)."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    out = {}
    for key, value in reported.items():
        metric, comma, filter_name = key.partition(",")
        if not comma or metric.endswith("_stderr") or _number(value) is None:
            continue
        value = _number(value)
        stderr = _number(reported.get(f"{metric}_stderr,{filter_name}"))
        name = metric if filter_name == "none" else f"{metric}/{filter_name}"
        ci = [value - z * stderr, value + z * stderr] if stderr is not None else None
        if ci is not None and (metric, filter_name) in unit:
            ci = [max(ci[0], 0.0), min(ci[1], 1.0)]
        out[name] = {"value": value, "ci": ci, "stderr": stderr, "higher_is_better": higher_is_better.get(metric)}
    return out


def _leaf_tasks(name: str, evaluated: dict) -> list[str]:
    members = evaluated.get("group_subtasks", {}).get(name)
    return [leaf for member in members for leaf in _leaf_tasks(member, evaluated)] if members else [name]


def _unit_metrics(name: str, evaluated: dict) -> set[tuple[str, str]]:
    """The (metric, filter) pairs of a task (or group: its tasks) whose logged per-document values all lie in
    [0, 1]."""
    values: dict[tuple[str, str], list[float | None]] = {}
    for task in _leaf_tasks(name, evaluated):
        for sample in (evaluated.get("samples") or {}).get(task) or []:
            for metric in sample.get("metrics") or []:
                values.setdefault((metric, sample.get("filter")), []).append(_number(sample.get(metric)))
    return {key for key, vals in values.items() if all(v is not None and 0.0 <= v <= 1.0 for v in vals)}


def _documents(name: str, evaluated: dict) -> int | None:
    """Documents scored for a task, or (a group) the sum over its tasks."""
    counts = evaluated.get("n-samples", {})
    sizes = [counts[task]["effective"] if task in counts else None for task in _leaf_tasks(name, evaluated)]
    return sum(sizes) if None not in sizes else None


def _accuracy(metrics: dict[str, dict]) -> float | None:
    """The first accuracy-like metric lm-eval reports (acc, acc_norm, exact_match, ...), as the postrain backend's
    `accuracy` (the pipeline summary reads it); None for a task with none (perplexity, bleu, ...)."""
    for name, metric in metrics.items():
        if name.startswith(("acc", "exact_match")):
            return metric["value"]
    return None


def summarize_tasks(evaluated: dict, confidence: float) -> dict[str, dict]:
    """Task (or group) -> its summary in results.json, from simple_evaluate's output."""
    sets = {}
    for name, reported in evaluated["results"].items():
        metrics = task_metrics(reported, evaluated.get("higher_is_better", {}).get(name, {}), confidence,
                               _unit_metrics(name, evaluated))
        config = evaluated.get("configs", {}).get(name, {})
        summary: dict[str, Any] = {
            "prompts": _documents(name, evaluated),
            "task_documents": (evaluated.get("n-samples", {}).get(name) or {}).get("original"),
            "output_type": config.get("output_type") or ("group" if name in evaluated.get("group_subtasks", {})
                                                         else None),
            "num_fewshot": _plain(evaluated.get("n-shot", {}).get(name)),
            "version": _plain(evaluated.get("versions", {}).get(name)),
            "accuracy": _accuracy(metrics),
            "unparsable": None,  # lm-eval's filters decide what an answer is; it counts no unparsable answers
            "mean_length_tokens": None,
            "metrics": metrics,
        }
        if config.get("output_type") == "generate_until":
            summary["generation"] = _plain(config.get("generation_kwargs") or {})
        sets[name] = summary
    return sets


def sample_records(task: str, samples: list[dict]) -> list[dict]:
    """lm-eval's logged samples of one task as samples.jsonl lines: prompt (the full context, few-shot examples
    included), completion (the generated text; for a multiple-choice task the choice with the highest
    log-likelihood), answer (the target), score (the task's first metric) and every metric of the document."""
    records = []
    for sample in samples:
        arguments = sample.get("arguments") or []
        responses = sample.get("filtered_resps") or []
        completion: Any = None
        loglikelihoods = None
        if responses and isinstance(responses[0], str):
            completion = responses[0]
        elif responses and all(isinstance(r, (list, tuple)) and r for r in responses):
            loglikelihoods = [_number(r[0]) for r in responses]
            if len(arguments) == len(responses) and None not in loglikelihoods:
                completion = arguments[max(range(len(responses)), key=lambda i: loglikelihoods[i])][1]
        answer = sample.get("target")
        if loglikelihoods is not None and isinstance(answer, int) and 0 <= answer < len(arguments):
            answer = arguments[answer][1]  # a multiple-choice target is the index of the right choice
        metrics = {m: _plain(sample.get(m)) for m in sample.get("metrics") or []}
        first = next(iter(metrics.values()), None)
        records.append(_plain({
            "set": task, "doc_id": sample.get("doc_id"), "filter": sample.get("filter"),
            "prompt": arguments[0][0] if arguments and arguments[0] else None, "completion": completion,
            "answer": answer, "score": first if _number(first) is not None else None,
            "metrics": metrics, **({"loglikelihoods": loglikelihoods} if loglikelihoods is not None else {}),
            "doc": sample.get("doc"),
        }))
    return records


def lm_eval_call(settings: dict) -> dict[str, Any]:
    """simple_evaluate's keyword arguments from `lm_eval:` (the model and tasks aside)."""
    return {key: settings[key] for key in ("num_fewshot", "limit", "gen_kwargs", "apply_chat_template",
                                           "system_instruction", "bootstrap_iters")}


def evaluate_model(spec: dict, settings: dict, tasks, task_manager, confidence: float, write_sample) -> dict:
    """One model on every task: {"model", "model_path", "sets": {task: summary}}."""
    # optional: lm_eval (torch is slow, and needed only then)
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    model, tokenizer, path = model_loading.load_model(spec)
    device = settings.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings["batch_size"])
    started = time.monotonic()
    evaluated = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, log_samples=True,
                                        **lm_eval_call(settings))
    sets = summarize_tasks(evaluated, confidence)
    documents = sum(summary["prompts"] or 0 for name, summary in sets.items() if name in evaluated.get("n-samples", {}))
    print(f"  lm-eval: {len(sets)} task(s), {documents} documents in {time.monotonic() - started:.1f}s", flush=True)
    for task, samples in (evaluated.get("samples") or {}).items():
        for record in sample_records(task, samples):
            write_sample(record)
    del lm, model  # one model in memory at a time
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"model": spec["name_or_path"], "model_path": path, "sets": sets}


def evaluate_models(models: dict[str, dict], settings: dict, task_manager, loaded, confidence: float,
                    write_sample) -> dict:
    """Every model (label -> model section) on every task: results.json's content. `task_manager` and `loaded` are
    `load_tasks(settings)`'s; `write_sample(record)` gets each samples.jsonl record (with "model": label when
    several models are compared). The eval job (postrain.jobs.evaluate) owns the run directory around this."""
    # optional: lm_eval (torch is slow, and needed only then)
    import lm_eval

    comparing = len(models) > 1
    per_model = {}
    for number, (label, spec) in enumerate(models.items(), 1):
        print(f"model {label} ({number}/{len(models)}): lm-eval on {', '.join(settings['tasks'])}"
              if comparing else f"lm-eval on {', '.join(settings['tasks'])}", flush=True)
        tag = {"model": label} if comparing else {}

        def write_tagged(record: dict, tag=tag) -> None:
            write_sample({**tag, **record})

        # the tasks loaded for the checks serve the first model; later models load them afresh, as lm-eval
        # changes a task's settings (few-shot, generation) when it evaluates it
        # (groups are passed by name: lm-eval builds a group's aggregation from its own loading)
        tasks = list(loaded["tasks"].values()) if number == 1 and not loaded["groups"] else list(settings["tasks"])
        per_model[label] = evaluate_model(spec, settings, tasks, task_manager, confidence, write_tagged)
    shared = {
        "backend": "lm_eval",
        "lm_eval": {**settings, "version": getattr(lm_eval, "__version__", None)},
        "generation": settings.get("gen_kwargs") or {},
        "metric_settings": {"interval": "normal (lm-eval stderr)", "confidence": confidence},
    }
    return {"models": per_model, **shared} if comparing else {**per_model[next(iter(per_model))], **shared}
