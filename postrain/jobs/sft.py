"""`postrain sft`: supervised fine-tuning over TRL's SFTTrainer.

Data: prompt/completion pairs (loss on the completion only, TRL's default), chat `messages`, or plain `text`.
`trainer.packing: true` packs sequences; a `peft:` section trains LoRA adapters (merged into the saved model).
"""

from __future__ import annotations

from typing import Any

from postrain.jobs import checks, smoke
from postrain.jobs.common import RunOptions, check_models_exist
from postrain.jobs.training import train_with_trl
from postrain.jobs.plan import sequence_batch_plan, training_plan
from postrain.recipes import Recipe

# The trainer settings --smoke adds to every training job's (postrain.jobs.smoke.SMOKE_TRAINER_COMMON).
SMOKE_TRAINER = {"max_length": 64, "packing": False}


def check(cfg: dict, origins: dict[str, str]) -> None:
    """Load-time checks of an sft recipe (postrain.jobs.checks), in this order."""
    checks.check_inputs("sft", cfg, origins)
    checks.check_run_sections("sft", cfg, origins)
    checks.check_health("sft", cfg, origins)
    checks.check_library_configs("sft", cfg, origins)
    checks.check_reward_errors(cfg, origins)


def plan(recipe: Recipe, check_models: bool = True, worker_args: list[str] | None = None) -> dict[str, Any]:
    """The --dry-run lines of an sft run after the head (postrain.jobs.plan): a training job's, one sequence per row
    of the batch. `check_models`: the model exists (a pipeline stage's are written by earlier stages)."""
    if check_models:
        check_models_exist(recipe.cfg)
    return training_plan(recipe, sequence_batch_plan, worker_args)


def run(recipe: Recipe, options: RunOptions) -> dict:
    from trl import SFTConfig, SFTTrainer  # slow: trl, needed only when this runs

    return train_with_trl(recipe, options, job="sft", trainer_cls=SFTTrainer, config_cls=SFTConfig)


def smoke_layer(cfg: dict) -> dict:
    """The `--smoke` layer of an sft recipe (postrain.jobs.smoke): the tiny model, built-in data, a few steps."""
    return smoke.training_layer(cfg, SMOKE_TRAINER)
