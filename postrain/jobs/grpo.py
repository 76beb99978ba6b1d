"""`postrain grpo`: online RL over TRL's GRPOTrainer with rewards from the recipe.

`rewards:` lists built-in verifiers (exact_match, math_verify, format, length) or user functions
(`module:function`, `path/file.py:function`), each with a weight; each one's mean is logged separately as
rewards/<name>/mean. `reward_errors.policy` decides whether a reward that raises stops the run (`fail`) or
scores that completion as `reward_errors.score` and counts it (`score`, logged as rewards/<name>/errors).
"""

from __future__ import annotations

from postrain.errors import RecipeError
from postrain.jobs.common import (
    RunOptions,
    metrics_callback,
    peft_config,
    prepare_run_dir,
    resume_checkpoint,
    running,
    save_final_model,
    trainer_config,
)
from postrain.recipes import Recipe


def run(recipe: Recipe, options: RunOptions) -> dict:
    from trl import GRPOConfig

    from postrain.data.sources import load_source
    from postrain.jobs.plan import plan
    from postrain.models.loading import load_model
    from postrain.rewards import build_rewards
    from postrain.trainers.grpo import PostrainGRPOTrainer

    cfg = recipe.cfg
    plan(recipe)  # the batch arithmetic check, before anything loads
    if not cfg["rewards"]:
        raise RecipeError("`grpo` needs at least one entry under rewards: (e.g. - name: exact_match)")
    if (cfg.get("trainer") or {}).get("reward_weights") is not None:
        raise RecipeError("set reward weights with rewards[i].weight, not trainer.reward_weights")
    policy = cfg["reward_errors"]
    base_dir = recipe.path.parent if recipe.path else None
    rewards, weights = build_rewards(cfg["rewards"], on_error=policy["policy"], error_score=policy["score"], base_dir=base_dir)
    train = load_source(cfg["data"]["train"], "grpo", where="data.train")
    eval_ds = load_source(cfg["data"]["eval"], "grpo", where="data.eval") if cfg["data"].get("eval") else None
    run_dir = prepare_run_dir(recipe, options)
    with running(run_dir):
        model, tokenizer, _ = load_model(cfg["model"])
        args = trainer_config(recipe, run_dir, GRPOConfig, reward_weights=weights)
        trainer = PostrainGRPOTrainer(
            model=model,
            reward_funcs=rewards,
            args=args,
            train_dataset=train,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=peft_config(recipe),
            callbacks=[metrics_callback(run_dir)],
        )
        trainer.train(resume_from_checkpoint=resume_checkpoint(run_dir, options))
        save_final_model(trainer, tokenizer, run_dir)
    return {"run_dir": str(run_dir)}
