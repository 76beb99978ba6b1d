"""`--dry-run`: everything about a recipe that can be checked without loading weights, and the run's plan.

The plan is the head every command shares (`plan_head`) and the lines of the command's own job (`plan` of its job
module, reached through postrain.jobs.table); this module holds the pieces those jobs share: the training jobs'
lines (`training_plan`: the launch, TRL's batch arithmetic, the memory plan, the trackers, the hub target), the
model and reward checks.

The trainer's config is built exactly as the job builds it (TRL's own `__post_init__` checks and derives the
batch arithmetic: GRPO's generation batch, its divisibility by `num_generations`, the eval batch, DPO's
`loss_weights`), the datasets are counted, reward columns checked and model references resolved. "Valid" then
means the job will not stop on any of these once it starts. Nothing touches a device and nothing is written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable
from unittest import mock

from postrain.data.sources import is_local, load_source, source_size
from postrain.errors import PostrainError, RecipeError
from postrain.jobs.common import peft_config, trainer_config
from postrain.jobs.hub import describe_target
from postrain.jobs.table import job_module
from postrain.jobs.trackers import report_to_names
from postrain.jobs.train_eval import plan_lines
from postrain.launch.launcher import command_line, launch_section, needs_launch, sharding_strategy, world_size
from postrain.launch.memory import memory_plan
from postrain.recipes import Recipe
from postrain.preference.section import losses_shape
from postrain.recipes.sections import loss_terms
from postrain.rewards import build_rewards, check_reward_columns
from postrain.trainers import config_class


def _trainer_args(recipe: Recipe, processes: int = 1):
    """The TRL config as the job builds it, on `processes` processes: TrainingArguments reads its world size from
    the running process group, which a dry run has not, so the launch's is put in its place while the config's own
    checks and derivations run (GRPO's generation batch and its divisibility by num_generations depend on it)."""
    from transformers import TrainingArguments  # slow: transformers, needed only when this runs

    with mock.patch.object(TrainingArguments, "world_size", property(lambda self: processes)):
        return trainer_config(recipe, Path(recipe.cfg["output_dir"]), config_class(recipe.command))


# TrainingArguments options it checks against the machine it runs on (a bf16 GPU, TF32, ...): a recipe loads
# the same on a laptop as on the GPU node it is written for, so the load-time build leaves them at their CPU
# values; the job builds the config with them, on its own machine, before the run directory is made.
MACHINE_OPTIONS = {"bf16": False, "fp16": False, "tf32": None, "bf16_full_eval": False, "fp16_full_eval": False}


def trainer_args_for_check(command: str, cfg: dict) -> None:
    """Build the job's TRL config and peft config from a resolved recipe, as the job will (at the launch's
    process count, without the options that depend on the machine: MACHINE_OPTIONS), for their own checks at
    load time (postrain.jobs.checks): a PostrainError if either library refuses a value."""
    trainer = dict(cfg.get("trainer") or {})
    for key, value in MACHINE_OPTIONS.items():
        if key in trainer:
            trainer[key] = value
    recipe = Recipe(command=command, cfg={**cfg, "trainer": trainer})
    _trainer_args(recipe, world_size(launch_section(cfg)))
    peft_config(recipe)


def plan(recipe: Recipe, check_models: bool = True, worker_args: list[str] | None = None) -> dict[str, Any]:
    """The run's plan as an ordered mapping of label -> value: the head every command shares, then the lines of its
    job's own `plan` (reached through the per-command table). Raises a PostrainError for what would stop the run:
    an impossible batch, a config TRL rejects, a reward column the data lacks, a model path that does not exist
    (`check_models=False` for pipeline stages, whose inputs earlier stages write). `worker_args`: the command line
    a launch would give its workers (shown in the launch command)."""
    out = plan_head(recipe)
    out.update(job_module(recipe.command).plan(recipe, check_models=check_models, worker_args=worker_args))
    return out


def plan_head(recipe: Recipe) -> dict[str, Any]:
    """The lines every plan opens with: the command, where the run writes, the resolved recipe's hash."""
    return {"command": recipe.command, "run directory": recipe.cfg["output_dir"], "recipe hash": recipe.hash}


def check_rewards(recipe: Recipe, sets: dict[str, dict]) -> None:
    """Build the rewards (a bad entry fails here) and check the columns they read in every local dataset."""
    base_dir = recipe.path.parent if recipe.path else None
    rewards, _ = build_rewards(recipe.cfg["rewards"], base_dir=base_dir)
    for where, spec in sets.items():
        if spec and is_local(spec):
            check_reward_columns(rewards, load_source(spec, recipe.command, where=where), where)


# What a training job's batch lines are: (TRL config as built, training rows or None, processes) -> label -> value.
BatchPlan = Callable[[Any, int | None, int], dict[str, Any]]


def training_plan(recipe: Recipe, batch_plan: BatchPlan, worker_args: list[str] | None = None) -> dict[str, Any]:
    """The plan of a training job (sft, dpo, grpo) after the head: the model, the launch, the training rows, the
    job's own batch arithmetic (`batch_plan`, given the TRL config as the job builds it at the launch's process
    count, so TRL's own batch checks run at that size), the memory plan, evaluation during training (its rewards
    built, the local sets' reward columns checked), the trackers and the hub target."""
    cfg = recipe.cfg
    out: dict[str, Any] = {"model": cfg["model"]["name_or_path"]}
    out.update(launch_plan(recipe, worker_args))
    args = _trainer_args(recipe, world_size(launch_section(cfg)))  # TRL's own batch checks at that size
    rows = _train_rows(recipe)
    out["train rows"] = rows if rows is not None else "unknown (hub dataset; counted when loaded)"
    world = world_size(launch_section(cfg))
    out.update(batch_plan(args, rows, world))
    strategy = sharding_strategy(launch_section(cfg), recipe.origins)
    out.update(memory_plan(cfg, recipe.command, strategy, world, bool(args.bf16 or args.fp16)))
    out.update(plan_lines(recipe))  # eval_during_training: rewards built, local sets' reward columns checked
    out.update(trackers_plan(args))
    out.update(hub_plan(cfg))
    return out


def trackers_plan(args) -> dict[str, Any]:
    """The trackers the run reports to, as TrainingArguments resolved `report_to` ("all": the installed ones)."""
    trackers = report_to_names(args.report_to)
    return {"trackers (trainer.report_to)": ", ".join(trackers) if trackers else "none"}


def hub_plan(cfg: dict) -> dict[str, Any]:
    """Where the finished model is pushed, if anywhere."""
    target = describe_target(cfg)
    return {"push to hub (hub.repo_id)": target if target else "no (hub.repo_id is null)"}


def _train_rows(recipe: Recipe) -> int | None:
    spec = (recipe.cfg.get("data") or {}).get("train")
    if spec is None:
        raise RecipeError(f"`{recipe.command}` needs data.train (a dataset: builtin:<task>, a file, or a hub id)")
    return source_size(spec)


def launch_plan(recipe: Recipe, worker_args: list[str] | None) -> dict[str, Any]:
    """How many processes run the job and the exact command that starts them."""
    section = launch_section(recipe.cfg)
    processes = world_size(section)
    machines = section["num_machines"]
    out: dict[str, Any] = {"processes": f"{processes}" + (f" ({section['num_processes']} per machine x {machines} "
                                                         f"machines)" if machines > 1 else "")}
    if needs_launch(section):
        args = worker_args or [recipe.command, str(recipe.path)]
        out["launch"] = command_line(section, args, recipe.origins)
        if machines > 1:
            out["launch"] += (f"  (machine {section['machine_rank']}; run it on every machine with its own "
                              f"launch.machine_rank)")
    else:
        out["launch"] = "this process (launch.num_processes: 1, no launch.config)"
    return out


def batch_unit(recipe: Recipe) -> str:
    """What one row of a DPO batch is, as the recipe's `loss:` entries read it: a preference pair, a list of K
    completions (K read from local data) or one unpaired, labelled completion."""
    shape = losses_shape(loss_terms(recipe.cfg, recipe.origins)).name  # the terms parsed when the recipe loaded
    if shape == "unpaired":
        return "unpaired completions"
    if shape == "pairs":
        return "preference pairs"
    return f"lists of {_list_sizes(recipe.cfg['data'].get('train'))} completions"


def _list_sizes(spec: dict | None) -> str:
    """K of K-response lists: the number (or range) of completions per row of a local source; "K" where the data
    is not at hand (a hub dataset, a file not written yet)."""
    if spec is None or not is_local(spec):
        return "K"
    try:
        sizes = {len(c) for c in load_source(spec, "dpo", where="data.train")["completions"]}
    except (PostrainError, KeyError, TypeError):  # no completions column: the job's own check names it
        return "K"
    return str(min(sizes)) if len(sizes) == 1 else f"{min(sizes)} to {max(sizes)}" if sizes else "K"


def sequence_batch_plan(args, rows: int | None, world: int, unit: str = "sequences") -> dict[str, Any]:
    """The batch arithmetic of a job whose rows are trained on as they are (sft, dpo): one row, one `unit` of the
    global batch."""
    per_device, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    global_batch = per_device * accum * world
    out: dict[str, Any] = {f"global batch ({unit} per optimizer step)":
                           f"{per_device} per device x {accum} accumulation x {world} processes = {global_batch}"}
    steps_per_epoch = math.ceil(rows / global_batch) if rows else None
    out.update(_total_steps(args, steps_per_epoch))
    return out


def grpo_batch_plan(args, rows: int | None, world: int) -> dict[str, Any]:
    """GRPO's batch arithmetic as GRPOConfig derived it on `world` processes (per_device_train_batch_size counts
    completions)."""
    per_device, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    num_gen, gen_batch = args.num_generations, args.generation_batch_size
    completions_per_step = per_device * accum * world
    out: dict[str, Any] = {
        "completions per optimizer step": f"{per_device} per device x {accum} accumulation x {world} processes = {completions_per_step}",
        "prompts per optimizer step": f"{completions_per_step / num_gen:g} (groups of {num_gen} completions)",
        # TRL regenerates every steps_per_generation x num_iterations micro-steps (GRPOTrainer._prepare_inputs)
        "generation batch": (f"{gen_batch} completions = {gen_batch // num_gen} prompts x {num_gen}, generated every "
                             f"{args.steps_per_generation * args.num_iterations} micro-steps (steps_per_generation "
                             f"{args.steps_per_generation} x num_iterations {args.num_iterations})"),
        "max completion length": args.max_completion_length,
    }
    steps_per_epoch = math.ceil(rows * num_gen * args.num_iterations / completions_per_step) if rows else None
    out.update(_total_steps(args, steps_per_epoch))
    return out


def _total_steps(args, steps_per_epoch: int | None) -> dict[str, Any]:
    if args.max_steps and args.max_steps > 0:
        return {"total optimizer steps": f"{args.max_steps} (trainer.max_steps)"}
    if steps_per_epoch is None:
        return {"total optimizer steps": f"{args.num_train_epochs} epochs (steps known once the dataset loads)"}
    total = math.ceil(steps_per_epoch * args.num_train_epochs)
    return {"total optimizer steps": f"{total} ({steps_per_epoch} per epoch x {args.num_train_epochs} epochs)"}
