"""`--dry-run`: everything about a recipe that can be checked without loading weights, and the run's plan.

The trainer's config is built exactly as the job builds it (TRL's own `__post_init__` checks and derives the
batch arithmetic: GRPO's generation batch, its divisibility by `num_generations`, the eval batch, DPO's
`loss_weights`), the datasets are counted, reward columns checked and model references resolved. "Valid" then
means the job will not stop on any of these once it starts. Nothing touches a device and nothing is written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from postrain.errors import RecipeError
from postrain.recipes import Recipe


def _trainer_args(recipe: Recipe):
    from postrain.jobs.common import trainer_config
    from postrain.trainers import config_class

    return trainer_config(recipe, Path(recipe.cfg["output_dir"]), config_class(recipe.command))


def _train_rows(recipe: Recipe) -> int | None:
    from postrain.data.sources import source_size

    spec = (recipe.cfg.get("data") or {}).get("train")
    if spec is None:
        raise RecipeError(f"`{recipe.command}` needs data.train (a dataset: builtin:<task>, a file, or a hub id)")
    return source_size(spec)


def _check_rewards(recipe: Recipe, sets: dict[str, dict]) -> None:
    """Build the rewards (a bad entry fails here) and check the columns they read in every local dataset."""
    from postrain.data.sources import is_local, load_source
    from postrain.rewards import build_rewards, check_reward_columns

    base_dir = recipe.path.parent if recipe.path else None
    rewards, _ = build_rewards(recipe.cfg["rewards"], base_dir=base_dir)
    for where, spec in sets.items():
        if spec and is_local(spec):
            check_reward_columns(rewards, load_source(spec, recipe.command, where=where).column_names, where)


def plan(recipe: Recipe, check_models: bool = True) -> dict[str, Any]:
    """The run's plan as an ordered mapping of label -> value. Raises a PostrainError for what would stop the
    run: an impossible batch, a config TRL rejects, a reward column the data lacks, a model path that does not
    exist (`check_models=False` for pipeline stages, whose inputs earlier stages write)."""
    from postrain.models.loading import check_model_reference

    cmd, cfg = recipe.command, recipe.cfg
    out: dict[str, Any] = {"command": cmd, "run directory": cfg["output_dir"], "recipe hash": recipe.hash}
    if check_models and cmd in ("sft", "dpo", "grpo", "eval"):
        check_model_reference(cfg["model"], "model")
        check_model_reference(cfg.get("ref_model"), "ref_model")
    if cmd == "grpo":
        _check_rewards(recipe, {"data.train": cfg["data"].get("train"), "data.eval": cfg["data"].get("eval")})
    if cmd == "eval":
        _check_rewards(recipe, {f"sets.{name}": spec for name, spec in cfg["sets"].items()})
    if cmd in ("sft", "dpo", "grpo"):
        out["model"] = cfg["model"]["name_or_path"]
        args = _trainer_args(recipe)
        rows = _train_rows(recipe)
        out["processes"] = args.world_size
        out["train rows"] = rows if rows is not None else "unknown (hub dataset; counted when loaded)"
        per_device, accum, world = args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size
        if cmd == "grpo":
            out.update(_grpo_plan(args, rows))
        else:
            global_batch = per_device * accum * world
            out["global batch (sequences per optimizer step)"] = f"{per_device} per device x {accum} accumulation x {world} processes = {global_batch}"
            steps_per_epoch = math.ceil(rows / global_batch) if rows else None
            out.update(_total_steps(args, steps_per_epoch))
        from postrain.jobs.train_eval import plan_lines

        out.update(plan_lines(recipe))  # eval_during_training: rewards built, local sets' reward columns checked
    elif cmd == "eval":
        from postrain.data.sources import source_size

        out["model"] = cfg["model"]["name_or_path"]
        if cfg.get("models"):  # comparison mode: every model must exist
            from postrain.evaluation.settings import model_entries

            entries = model_entries(cfg)
            for label, spec in entries.items():
                if check_models:
                    check_model_reference(spec, f"models ({label})")
            out["model"] = ", ".join(f"{label} ({spec['name_or_path']})" for label, spec in entries.items())
        for name, spec in cfg["sets"].items():
            gen = {**cfg["generation"], **(spec.get("generation") or {})}
            decoding = f"sampled (temperature {gen['temperature']})" if gen["do_sample"] else "greedy"
            out[f"set {name}"] = (f"{source_size(spec) or 'unknown'} prompts x {gen['num_samples']} samples, "
                                  f"{decoding}, <= {gen['max_new_tokens']} new tokens")
    elif cmd == "merge":
        from postrain.merging import model_references, validate_merge_config
        from postrain.models.loading import resolve_model_path

        out["merge method"] = cfg["merge"].get("merge_method")
        out["models"] = ", ".join(model_references(cfg["merge"]))
        if check_models:  # every input exists (a pipeline's are written by earlier stages)
            validate_merge_config(cfg["merge"], resolve_model=resolve_model_path)
    elif cmd == "pipeline":
        from postrain.jobs.pipeline import stage_recipe

        for name, stage in cfg["stages"].items():
            loaded = stage_recipe(recipe, name, stage, smoke=False)  # validates every stage's recipe now
            plan(loaded, check_models=False)
            out[f"stage {name}"] = f"{stage['command']} {loaded.path.name} -> {loaded.cfg['output_dir']} ({loaded.hash})"
    return out


def _grpo_plan(args, rows: int | None) -> dict[str, Any]:
    """GRPO's batch arithmetic as GRPOConfig derived it (per_device_train_batch_size counts completions)."""
    per_device, accum, world = args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size
    num_gen, gen_batch = args.num_generations, args.generation_batch_size
    completions_per_step = per_device * accum * world
    out: dict[str, Any] = {
        "completions per optimizer step": f"{per_device} per device x {accum} accumulation x {world} processes = {completions_per_step}",
        "prompts per optimizer step": f"{completions_per_step / num_gen:g} (groups of {num_gen} completions)",
        "generation batch": f"{gen_batch} completions = {gen_batch // num_gen} prompts x {num_gen}, generated every {args.steps_per_generation} micro-steps",
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
