"""`postrain grpo`: online RL over TRL's GRPOTrainer with rewards from the recipe.

`rewards:` lists built-in verifiers (exact_match, math_verify, format, length) or user functions
(`module:function`, `path/file.py:function`), each with a weight; each one's mean is logged separately as
rewards/<name>/mean. Every reward runs in a worker process with wall-clock limits (`reward_errors.timeout` a batch,
`completion_timeout` a completion); `reward_errors.policy` decides whether a reward that raises, scores NaN or
infinity, or runs out of time stops the run (`fail`) or scores that completion as `reward_errors.score` and counts
it (`score`, logged as rewards/<name>/errors, with rewards/<name>/timeouts and non_finite; postrain.rewards.build).
`rl:` (or `method:`) swaps TRL's advantage and loss for registry parts (postrain.rl.section,
postrain.trainers.grpo), and adds samplers: group / completion filters, DAPO's refill, PF-PPO's resampling;
per-prompt state (dcpo_smooth) and recovered groups are saved beside each checkpoint (rl_state.json,
rl_buffer.pt) and restored by --resume.
"""

from __future__ import annotations

from typing import Any

from postrain.errors import RecipeError
from postrain.jobs import checks, smoke
from postrain.jobs.common import RunOptions, check_models_exist
from postrain.jobs.training import train_with_trl
from postrain.jobs.plan import check_rewards, grpo_batch_plan, training_plan
from postrain.launch.vllm import check_vllm_installed
from postrain.recipes import Recipe
from postrain.recipes.sections import rl_parts
from postrain.rewards import build_rewards, check_reward_columns, policy_options
from postrain.rl.section import check_rl_section, reference_beta
from postrain.trainers import config_class
from postrain.trainers.shared_prefix import check_recipe

# GRPOConfig's fields with a range TRL does not check (beside the ranges of every trainer, checks.TRAINER_RANGES).
TRAINER_RANGES: dict[str, str] = {
    "num_generations": ">= 2", "num_generations_eval": ">= 1", "temperature": "> 0", "top_p": "in (0, 1]",
    "min_p": "in [0, 1]", "repetition_penalty": "> 0", "beta": ">= 0", "epsilon": "> 0", "epsilon_high": "> 0",
    "delta": "> 1", "num_iterations": ">= 1", "steps_per_generation": ">= 1", "generation_batch_size": ">= 1",
    "top_entropy_quantile": "in (0, 1]", "ref_model_mixup_alpha": "in [0, 1]", "ref_model_sync_steps": ">= 1"}

# The trainer settings --smoke adds to every training job's (postrain.jobs.smoke.SMOKE_TRAINER_COMMON); the
# recipe's own generation batch arithmetic stays valid at smoke size (2 generations, derived batches).
SMOKE_TRAINER = {"num_generations": 2, "generation_batch_size": None, "steps_per_generation": None,
                 "max_completion_length": 8, "use_vllm": False, "per_device_eval_batch_size": 2}


def check(cfg: dict, origins: dict[str, str]) -> None:
    """Load-time checks of a grpo recipe, in this order: TRL's loss type, the `rl:` parts, what the job reads, the
    run's sections, the conventions of the entries TRL's options stand for, the shared-prefix layout, health, the
    library configs, the reward error policy."""
    checks.check_loss_types("grpo", cfg, origins)
    check_rl_parts(cfg, origins)
    checks.check_inputs("grpo", cfg, origins)
    checks.check_run_sections("grpo", cfg, origins)
    checks.check_trl_conventions("grpo", cfg, origins)
    check_shared_prefix(cfg, origins)
    checks.check_health("grpo", cfg, origins)
    checks.check_library_configs("grpo", cfg, origins, TRAINER_RANGES)
    checks.check_reward_errors(cfg, origins)


def plan(recipe: Recipe, check_models: bool = True, worker_args: list[str] | None = None) -> dict[str, Any]:
    """The --dry-run lines of a grpo run after the head (postrain.jobs.plan): vLLM is there if the recipe uses it,
    the rewards build and the local train and eval sets have the columns they read, then a training job's lines
    with GRPO's batch arithmetic (completions, prompts, the generation batch). `check_models`: the model and
    reference exist (a pipeline stage's are written by earlier stages)."""
    cfg = recipe.cfg
    if check_models:
        check_models_exist(cfg)
    check_vllm_installed(cfg, recipe.origins)
    check_rewards(recipe, {"data.train": cfg["data"].get("train"), "data.eval": cfg["data"].get("eval")})
    return training_plan(recipe, grpo_batch_plan, worker_args)


def check_rl_parts(cfg: dict, origins: dict[str, str]) -> None:
    """The `rl:` parts: names, parameters, data a GRPO batch can supply, conflicting TRL options."""
    if cfg.get("rl") is None:
        return
    # the one parse of the recipe's `rl:` (postrain.recipes.sections); everything after it reads the kept parts
    check_rl_section("grpo", cfg, origins, rl_parts(cfg, origins))


def check_shared_prefix(cfg: dict, origins: dict[str, str]) -> None:
    """`trainer.shared_prefix: true`: a model and attention implementation that honour the block mask
    (postrain.trainers.shared_prefix)."""
    if not (cfg.get("trainer") or {}).get("shared_prefix"):
        return
    check_recipe("grpo", cfg, origins)


def run(recipe: Recipe, options: RunOptions) -> dict:
    # torch, TRL and the reward workers are slow to import: only when the job runs, not when the CLI starts
    # slow: trl (through postrain.trainers.grpo), needed only when this runs
    from postrain.trainers.grpo import PostrainGRPOTrainer

    cfg = recipe.cfg
    check_vllm_installed(cfg, recipe.origins)  # trainer.use_vllm: stop here, not once the run directory exists
    if not cfg["rewards"]:
        raise RecipeError("`grpo` needs at least one entry under rewards: (e.g. - name: exact_match)")
    if (cfg.get("trainer") or {}).get("reward_weights") is not None:
        raise RecipeError("set reward weights with rewards[i].weight, not trainer.reward_weights")
    policy = cfg["reward_errors"]
    base_dir = recipe.path.parent if recipe.path else None
    rewards, weights = build_rewards(cfg["rewards"], base_dir=base_dir, **policy_options(policy))
    for reward in rewards:  # each worker starts while the model and data load
        reward.start()
    overrides: dict = {"reward_weights": weights}
    extra: dict = {"reward_funcs": rewards}
    if cfg.get("rl") is not None:  # registry RL parts (`rl:` / `method:`) replace TRL's advantage and loss path
        parts = rl_parts(cfg, recipe.origins)  # parsed once, when the recipe loaded: the trainer takes the parts
        extra["rl"] = parts
        beta = reference_beta(parts)
        if beta is not None:  # TRL builds the reference model and its log-probs only where beta != 0
            overrides["beta"] = beta
    return train_with_trl(
        recipe, options, job="grpo", trainer_cls=PostrainGRPOTrainer, config_cls=config_class("grpo"),
        config_overrides=overrides, trainer_kwargs=lambda: extra,
        check_data=lambda ds, where: check_reward_columns(rewards, ds, where),
    )


def smoke_layer(cfg: dict) -> dict:
    """The `--smoke` layer of a grpo recipe (postrain.jobs.smoke): a training job's, with length-based shaping sized
    for the smoke run's completions, a judge model on the smoke model, and the code task for a code_exec reward."""
    layer = smoke.training_layer(cfg, SMOKE_TRAINER)
    shaping = ((cfg.get("rl") or {}).get("shaping")) or []
    if any(_length_part(part) for part in shaping):
        # Length-based shaping sized for the paper's lengths must fit the smoke run's completions.
        layer["rl"] = {"shaping": [_smoke_length_part(part) for part in shaping]}
    rewards = smoke.smoke_rewards(cfg)
    if rewards is not None:
        layer["rewards"] = rewards
    if smoke.scores_code(cfg):
        smoke.use_code_task(layer["data"].values())
    return layer


def _length_part(part) -> bool:
    return isinstance(part, dict) and any(k in part for k in ("overlong_buffer_len", "max_completion_length"))


def _smoke_length_part(part):
    if not _length_part(part):
        return part
    max_len = SMOKE_TRAINER["max_completion_length"]
    out = dict(part)
    if "max_completion_length" in out:
        out["max_completion_length"] = max_len
    if "overlong_buffer_len" in out:
        out["overlong_buffer_len"] = max_len // 2
    return out
