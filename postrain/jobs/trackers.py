"""Trackers: `trainer.report_to` (tensorboard, trackio, wandb, mlflow, ...) and what postrain logs to them.

transformers' own integration callbacks (transformers.integrations.integration_utils) do the logging: the trainer
builds one per name in `report_to`, each starts its run in `on_train_begin` and logs every `on_log`. They log the
TrainingArguments as the run's config; this module adds, once per run at train start, what says what the run *is*:
the resolved recipe (as a nested mapping), its hash, the command and command line, the lineage (the models it
starts from; the pipeline, stage and upstream stages when it is a pipeline stage) and the postrain version.

  wandb        run config, under the key `postrain`
  trackio      run config, under the key `postrain`
  mlflow       params `postrain.<flattened key>` (values cut to mlflow's length limit), the recipe and lineage as
               artifacts (postrain/recipe.yaml, postrain/lineage.json), command / hash / command line as tags
  tensorboard  text `postrain/recipe` (the recipe YAML), `postrain/lineage`, `postrain/command`, and the recipe's
               scalar values as hparams; event files in `<output_dir>/tensorboard` (TENSORBOARD_LOGGING_DIR wins)

The logging callback is added after the trainer is built, so it runs after the integrations' `on_train_begin`
(their runs exist by then), and only on the main process (`state.is_world_process_zero`), as theirs do. Other
integrations transformers supports (comet_ml, clearml, ...) still log TRL's metrics; postrain adds nothing to them.

A tracker named in `report_to` whose package is not installed is refused when the recipe loads (`check_report_to`,
one of postrain.jobs.checks), before anything is written; transformers would raise only when the trainer is
built, after the run directory was made and the model loaded.
"""

from __future__ import annotations

import json
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from postrain.errors import RecipeError, did_you_mean
from postrain.recipes.validate import origin_of
from postrain.reports.rundir import read_json, run_lineage

TRAINING_COMMANDS = ("sft", "dpo", "grpo")
# pip packages of transformers' integrations where the name differs from the report_to value
PIP_PACKAGES = {"comet_ml": "comet-ml", "azure_ml": "azureml-core", "flyte": "flytekit flytekitplugins-deck-standard",
                "dagshub": "dagshub mlflow", "kubeflow": "kubeflow"}
# transformers' availability check of each integration where it is not `is_<name>_available`
AVAILABILITY = {"comet_ml": "is_comet_available", "azure_ml": "is_azureml_available",
                "flyte": "is_flytekit_available"}
TENSORBOARD_SUBDIR = "tensorboard"


def report_to_names(value: Any) -> list[str]:
    """`trainer.report_to` as a list of integration names; "none" is [], "all" is left to transformers (every
    installed integration, so nothing can be missing)."""
    if value is None:
        return []
    names = [value] if isinstance(value, str) else list(value)
    return [str(n) for n in names if str(n) not in ("none", "all")]


def check_report_to(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """Every tracker in `trainer.report_to` is one transformers knows and its package is installed."""
    if command not in TRAINING_COMMANDS:
        return
    names = report_to_names((cfg.get("trainer") or {}).get("report_to"))
    if not names:
        return
    # transformers' own table and availability checks, so this refuses exactly what the trainer would
    from transformers.integrations import integration_utils  # slow: transformers, needed only when this runs

    known = list(integration_utils.INTEGRATION_TO_CALLBACK)
    origin = origin_of(origins, "trainer.report_to")
    for name in names:
        if name not in known:
            hint = did_you_mean(name, known)
            raise RecipeError(f"unknown tracker {name!r} in trainer.report_to (from {origin}): {hint + ' ' if hint else ''}"
                              f"transformers logs to: {', '.join(known)} (or none)")
        available = getattr(integration_utils, AVAILABILITY.get(name, f"is_{name}_available"), None)
        if available is not None and not available():
            package = PIP_PACKAGES.get(name, name)
            raise RecipeError(
                f"trainer.report_to (from {origin}) names {name!r}, but {name} is not installed (or not usable: "
                f"transformers' {available.__name__}() is false). Install it with `pip install {package}`, or "
                f"leave {name!r} out of trainer.report_to (none: no tracker)")


def run_config(recipe, run_dir: Path, command_line: str) -> dict[str, Any]:
    """What the trackers log as the run's config (and the model card repeats)."""

    try:
        postrain_version = version("postrain")
    except PackageNotFoundError:
        postrain_version = None
    return {
        "command": recipe.command,
        "recipe_hash": recipe.hash,
        "command_line": command_line,
        "postrain_version": postrain_version,
        "lineage": run_lineage(run_dir, recipe.cfg),
        "recipe": recipe.cfg,
    }


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as `a.b.0.c -> value` (list items by index; empty mappings and lists kept as values)."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(node, list) and node:
        out = {}
        for i, v in enumerate(node):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
        return out
    return {prefix: node}


def attach(trainer, recipe, run_dir: Path) -> None:
    """Called once the trainer is built: point TensorBoard at `<run_dir>/tensorboard` and add the callback that
    logs the run config to every active tracker at train start (the command line as env.json recorded it)."""
    from transformers.integrations import TensorBoardCallback  # slow: transformers, needed only when this runs

    trackers = [cb for cb in trainer.callback_handler.callbacks if _logger_for(cb) is not None]
    if not trackers:
        return
    for cb in trackers:
        # transformers' default is <output_dir>/runs/<date>_<host>, i.e. inside checkpoints/; a user's
        # TENSORBOARD_LOGGING_DIR (already in cb.logging_dir) is kept
        if isinstance(cb, TensorBoardCallback) and cb.logging_dir is None and cb.tb_writer is None:
            cb.logging_dir = str(Path(run_dir) / TENSORBOARD_SUBDIR)
    command_line = (read_json(Path(run_dir) / "env.json") or {}).get("command_line") or ""
    trainer.add_callback(run_config_callback(run_config(recipe, run_dir, command_line), trainer.callback_handler))


def run_config_callback(config: dict[str, Any], handler):
    """A TrainerCallback logging `config` to the integration callbacks of `handler` (the trainer's
    CallbackHandler) at train start, on the main process."""
    from transformers import TrainerCallback  # slow: transformers, needed only when this runs

    class RunConfigLogger(TrainerCallback):
        def __init__(self):
            self.config = config
            self.logged: list[str] = []  # the integrations logged to (tests read it)

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            for cb in handler.callbacks:
                log = _logger_for(cb)
                if log is not None and log(cb, self.config):
                    self.logged.append(type(cb).__name__)

    return RunConfigLogger()


def _logger_for(cb):
    # slow: transformers, needed only when this runs
    from transformers.integrations import MLflowCallback, TensorBoardCallback, TrackioCallback, WandbCallback

    for cls, log in ((TensorBoardCallback, _tensorboard), (WandbCallback, _wandb), (MLflowCallback, _mlflow),
                     (TrackioCallback, _trackio)):
        if isinstance(cb, cls):
            return log
    return None


# Each logger reads the library object the integration callback holds (its module or writer) and returns whether
# it logged: an integration whose run did not start (disabled, or set up on another process) is left alone.

def _wandb(cb, config: dict) -> bool:
    wandb = getattr(cb, "_wandb", None)
    if wandb is None or getattr(wandb, "run", None) is None:
        return False
    wandb.config.update({"postrain": config}, allow_val_change=True)
    return True


def _trackio(cb, config: dict) -> bool:
    trackio = getattr(cb, "_trackio", None)
    if trackio is None or not getattr(cb, "_initialized", False):
        return False
    trackio.config.update({"postrain": config}, allow_val_change=True)
    return True


# mlflow's parameter names: alphanumerics, underscores, periods, dashes, spaces, colons and slashes
MLFLOW_KEY = re.compile(r"[^0-9A-Za-z_\-. :/]")


def _mlflow(cb, config: dict) -> bool:
    mlflow = getattr(cb, "_ml_flow", None)
    if mlflow is None or mlflow.active_run() is None:
        return False
    limit = cb._MAX_PARAM_VAL_LENGTH  # mlflow's own limits, as the integration read them
    batch = cb._MAX_PARAMS_TAGS_PER_BATCH
    # The command line is a tag, not a param: params cannot change, and a --resume run's command line differs.
    params = {MLFLOW_KEY.sub("_", f"postrain.{k}"): str(v)[:limit]
              for k, v in flatten({k: v for k, v in config.items() if k != "command_line"}).items()}
    items = list(params.items())
    for i in range(0, len(items), batch):
        mlflow.log_params(dict(items[i:i + batch]))
    mlflow.log_dict(config["recipe"], "postrain/recipe.yaml")
    mlflow.log_dict(config["lineage"], "postrain/lineage.json")
    mlflow.set_tags({"postrain.command": config["command"], "postrain.recipe_hash": config["recipe_hash"],
                     "postrain.command_line": str(config["command_line"])[:limit]})
    return True


def _tensorboard(cb, config: dict) -> bool:
    writer = getattr(cb, "tb_writer", None)
    if writer is None:
        return False
    recipe_yaml = yaml.safe_dump(config["recipe"], sort_keys=False, allow_unicode=True)
    # TensorBoard renders text as Markdown: the YAML and JSON go in fenced code blocks to be shown as written
    writer.add_text("postrain/recipe", f"recipe hash `{config['recipe_hash']}`\n\n```yaml\n{recipe_yaml}```")
    writer.add_text("postrain/lineage", f"```json\n{json.dumps(config['lineage'], indent=2)}\n```")
    writer.add_text("postrain/command", f"`{config['command_line']}`")
    from torch.utils.tensorboard.summary import hparams  # optional: tensorboard

    # hparams take numbers, strings and booleans; lists, mappings and nulls of the recipe stay in the text above
    simple = {f"recipe.{k}": v for k, v in flatten(config["recipe"]).items()
              if isinstance(v, (bool, int, float, str))}
    experiment, session_start, _ = hparams(simple, {})
    file_writer = writer._get_file_writer()  # the integration's own event file, not a new run directory
    file_writer.add_summary(experiment)
    file_writer.add_summary(session_start)
    writer.flush()
    return True
