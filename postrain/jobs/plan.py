"""`--dry-run`: the batch arithmetic of a recipe, checked before any weights load.

Reads the TRL config's defaults from its dataclass fields (no config object is built, nothing touches a
device), so it is instant and also catches impossible batches: a GRPO generation batch must hold whole groups
of `num_generations` completions.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from postrain.errors import RecipeError
from postrain.recipes import Recipe
from postrain.recipes.schema import TRAINER_CONFIGS


def _trainer_args(recipe: Recipe) -> dict[str, Any]:
    import trl

    cls = getattr(trl, TRAINER_CONFIGS[recipe.command])
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            defaults[f.name] = f.default_factory()  # type: ignore[misc]
    return {**defaults, **(recipe.cfg.get("trainer") or {})}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _train_rows(recipe: Recipe) -> int | None:
    from postrain.data.sources import source_size

    spec = (recipe.cfg.get("data") or {}).get("train")
    if spec is None:
        raise RecipeError(f"`{recipe.command}` needs data.train (a dataset: builtin:<task>, a file, or a hub id)")
    return source_size(spec)


def plan(recipe: Recipe) -> dict[str, Any]:
    """The run's plan as an ordered mapping of label -> value. Raises RecipeError for an impossible batch."""
    cmd, cfg = recipe.command, recipe.cfg
    out: dict[str, Any] = {"command": cmd, "run directory": cfg["output_dir"], "recipe hash": recipe.hash}
    if cmd in ("sft", "dpo", "grpo"):
        out["model"] = cfg["model"]["name_or_path"]
        args = _trainer_args(recipe)
        world = world_size()
        per_device, accum = args["per_device_train_batch_size"], args["gradient_accumulation_steps"]
        global_batch = per_device * accum * world
        rows = _train_rows(recipe)
        out["processes"] = world
        out["train rows"] = rows if rows is not None else "unknown (hub dataset; counted when loaded)"
        if cmd == "grpo":
            out.update(_grpo_plan(args, per_device, accum, world, rows))
        else:
            out["global batch (sequences per optimizer step)"] = f"{per_device} per device x {accum} accumulation x {world} processes = {global_batch}"
            steps_per_epoch = math.ceil(rows / global_batch) if rows else None
            out.update(_total_steps(args, steps_per_epoch))
    elif cmd == "eval":
        from postrain.data.sources import source_size

        out["model"] = cfg["model"]["name_or_path"]
        for name, spec in cfg["sets"].items():
            gen = {**cfg["generation"], **(spec.get("generation") or {})}
            decoding = f"sampled (temperature {gen['temperature']})" if gen["do_sample"] else "greedy"
            out[f"set {name}"] = (f"{source_size(spec) or 'unknown'} prompts x {gen['num_samples']} samples, "
                                  f"{decoding}, <= {gen['max_new_tokens']} new tokens")
    elif cmd == "merge":
        merge = cfg["merge"]
        out["merge method"] = merge.get("merge_method")
        refs = [m.get("model") for m in merge.get("models", [])] + [
            s.get("model") for sl in merge.get("slices", []) for s in sl.get("sources", [])
        ]
        out["models"] = ", ".join(str(r) for r in refs)
    elif cmd == "pipeline":
        from postrain.jobs.pipeline import stage_recipe

        for name, stage in cfg["stages"].items():
            loaded = stage_recipe(recipe, name, stage, smoke=False)  # validates every stage's recipe now
            if loaded.command in ("sft", "dpo", "grpo"):
                plan(loaded)
            out[f"stage {name}"] = f"{stage['command']} {loaded.path.name} -> {loaded.cfg['output_dir']} ({loaded.hash})"
    return out


def _grpo_plan(args: dict, per_device: int, accum: int, world: int, rows: int | None) -> dict[str, Any]:
    """GRPO batch arithmetic, as TRL's GRPOConfig derives it (per_device_train_batch_size counts completions)."""
    num_gen = args["num_generations"]
    gen_batch, steps_per_gen = args.get("generation_batch_size"), args.get("steps_per_generation")
    if gen_batch is not None and steps_per_gen is not None:
        raise RecipeError("set trainer.generation_batch_size or trainer.steps_per_generation, not both")
    if gen_batch is None:
        steps_per_gen = steps_per_gen or accum
        gen_batch = per_device * world * steps_per_gen
    elif gen_batch % (per_device * world):
        raise RecipeError(
            f"impossible GRPO batch: trainer.generation_batch_size ({gen_batch}) must be a multiple of "
            f"per_device_train_batch_size x processes ({per_device} x {world} = {per_device * world})"
        )
    if num_gen is None or num_gen < 2:
        raise RecipeError(f"trainer.num_generations must be at least 2 (GRPO compares completions within a group), got {num_gen}")
    if gen_batch % num_gen:
        ok = [n for n in range(2, gen_batch + 1) if gen_batch % n == 0]
        raise RecipeError(
            f"impossible GRPO batch: the generation batch of {gen_batch} completions "
            f"(per_device_train_batch_size {per_device} x {world} processes x {gen_batch // (per_device * world)} steps per generation) "
            f"is not divisible by trainer.num_generations={num_gen}. Use num_generations in {ok[:8]} "
            f"or change per_device_train_batch_size / gradient_accumulation_steps."
        )
    completions_per_step = per_device * accum * world
    out: dict[str, Any] = {
        "completions per optimizer step": f"{per_device} per device x {accum} accumulation x {world} processes = {completions_per_step}",
        "prompts per optimizer step": f"{completions_per_step / num_gen:g} (groups of {num_gen} completions)",
        "generation batch": f"{gen_batch} completions = {gen_batch // num_gen} prompts x {num_gen}, generated every {gen_batch // (per_device * world)} micro-steps",
        "max completion length": args.get("max_completion_length"),
    }
    iterations = args.get("num_iterations", 1) or 1
    steps_per_epoch = math.ceil(rows * num_gen * iterations / completions_per_step) if rows else None
    out.update(_total_steps(args, steps_per_epoch))
    return out


def _total_steps(args: dict, steps_per_epoch: int | None) -> dict[str, Any]:
    if args.get("max_steps", -1) and args["max_steps"] > 0:
        return {"total optimizer steps": f"{args['max_steps']} (trainer.max_steps)"}
    if steps_per_epoch is None:
        return {"total optimizer steps": f"{args['num_train_epochs']} epochs (steps known once the dataset loads)"}
    total = math.ceil(steps_per_epoch * args["num_train_epochs"])
    return {"total optimizer steps": f"{total} ({steps_per_epoch} per epoch x {args['num_train_epochs']} epochs)"}
