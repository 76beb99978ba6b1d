"""`postrain dpo`: preference optimization over TRL's DPOTrainer; every TRL `loss_type` is reachable.

The reference model, as users of TRL expect:
  - `ref_model: null` (default): TRL's implicit reference, a frozen copy of the starting policy (under peft, the
    base model with adapters disabled, so no second copy is held);
  - `ref_model: {name_or_path: ...}`: an explicit reference model;
  - `trainer.precompute_ref_log_probs: true`: reference log-probs computed once before training, after which
    the reference model is not kept in memory.

`loss: [{name: simpo, weight: 1.0, beta: 2.0}]` replaces TRL's loss by postrain's preference-loss registry
(postrain.trainers.dpo), parsed once when the recipe loads (postrain.recipes.sections) and handed to the trainer;
losses that read no reference make no reference forward. The losses' data shape picks the trainer: pairs
(PostrainDPOTrainer), K-response lists (trainers.listwise) or unpaired labelled completions (trainers.unpaired);
the data is checked for that shape's columns and rows before anything is written.

`logp_models: {prev: {name_or_path: ...}}` scores every pair with further models once before training and adds
their log-probs as columns `<name>_chosen_logps` / `<name>_rejected_logps` (postrain.trainers.logp_models): INPO's
previous iterate (`prev`), MRPO's further references.

Token-level inputs are set on their loss entry (postrain.preference.token_inputs): TGDPO's
`{name: tgdpo, token_reward_model: {name_or_path: ...}}` (run with the reference on every batch), Ra-DPO's
`{name: ra_dpo, confidence_level: 0.95}` and GDPO's `{name: gdpo, gamma: 0.1}` (full-vocabulary forwards of policy
and reference).

`trainer.shared_prefix: true` encodes each prompt once for all its answers (postrain.trainers.shared_prefix_dpo);
the losses and gradients stay those of the standard batch.
"""

from __future__ import annotations

from typing import Any

from postrain.errors import RecipeError, origin_of
from postrain.jobs import checks, smoke
from postrain.jobs.common import RunOptions, check_models_exist
from postrain.jobs.training import train_with_trl
from postrain.jobs.plan import batch_unit, sequence_batch_plan, training_plan
from postrain.models import loading as model_loading  # load_model through it: tests replace it there
from postrain.preference import PREFERENCE
from postrain.preference.section import losses_shape, section_shape, state_settings
from postrain.preference.turn_data import reads_turns_section
from postrain.recipes import Recipe
from postrain.recipes.checks import check_loss_models
from postrain.recipes.sections import loss_terms
from postrain.trainers import config_class
from postrain.trainers.logp_models import check_logp_models as check_section, provided_columns
from postrain.trainers.shared_prefix_dpo import check_options
from postrain.trainers.token_level import check_model_references

# DPOConfig's fields with a range TRL does not check (beside the ranges of every trainer, checks.TRAINER_RANGES).
TRAINER_RANGES: dict[str, str] = {
    "beta": "> 0", "label_smoothing": "in [0, 0.5]", "ld_alpha": "in [0, 1]", "rpo_alpha": ">= 0",
    "ref_model_mixup_alpha": "in [0, 1]", "ref_model_sync_steps": ">= 1", "precompute_ref_batch_size": ">= 1"}

# The trainer settings --smoke adds to every training job's (postrain.jobs.smoke.SMOKE_TRAINER_COMMON).
SMOKE_TRAINER = {"max_length": 64, "precompute_ref_batch_size": 4}


def check(cfg: dict, origins: dict[str, str]) -> None:
    """Load-time checks of a dpo recipe, in this order: TRL's loss type, the `loss:` entries and the shared-prefix
    layout, what the job reads, `logp_models:`, the run's sections, the entries' conventions, health, the library
    configs, the reward error policy."""
    checks.check_loss_types("dpo", cfg, origins)
    check_losses(cfg, origins)
    check_shared_prefix(cfg, origins)
    checks.check_inputs("dpo", cfg, origins)
    check_logp_models(cfg, origins)
    checks.check_run_sections("dpo", cfg, origins)
    check_conventions(cfg, origins)
    checks.check_health("dpo", cfg, origins)
    checks.check_library_configs("dpo", cfg, origins, TRAINER_RANGES)
    checks.check_reward_errors(cfg, origins)


def plan(recipe: Recipe, check_models: bool = True, worker_args: list[str] | None = None) -> dict[str, Any]:
    """The --dry-run lines of a dpo run after the head (postrain.jobs.plan): a training job's, one row of the batch
    being what the `loss:` entries read (a preference pair, a list of K completions, one unpaired completion).
    `check_models`: the model and reference exist (a pipeline stage's are written by earlier stages)."""
    if check_models:
        check_models_exist(recipe.cfg)

    def batch_plan(args, rows: int | None, world: int) -> dict[str, Any]:
        # the unit is read once TRL has accepted the config (its error, if any, is the one reported)
        return sequence_batch_plan(args, rows, world, unit=batch_unit(recipe))

    return training_plan(recipe, batch_plan, worker_args)


def check_losses(cfg: dict, origins: dict[str, str]) -> None:
    """The `loss:` entries: names, parameters, data the trainer can give, conflicting TRL options, and the models an
    entry names (checked as `model:` is)."""
    if not cfg.get("loss"):
        return
    # the one parse of the recipe's `loss:` (postrain.recipes.sections); everything after it reads the kept terms
    check_loss_models(loss_terms(cfg, origins), origins)


def check_shared_prefix(cfg: dict, origins: dict[str, str]) -> None:
    """`trainer.shared_prefix`: TRL options, data shapes and attention implementations the shared layout cannot
    reproduce (postrain.trainers.shared_prefix_dpo). The model itself is checked once loaded."""
    if not (cfg.get("trainer") or {}).get("shared_prefix"):
        return
    models = {"model": cfg.get("model"), "ref_model": cfg.get("ref_model")}
    for i, entry in enumerate(cfg.get("loss") or []):
        if isinstance(entry, dict) and isinstance(entry.get("token_reward_model"), dict):
            models[f"loss[{i}].token_reward_model"] = entry["token_reward_model"]
    check_options(cfg.get("trainer") or {}, losses_shape(loss_terms(cfg, origins)).name, origins, models)


def check_logp_models(cfg: dict, origins: dict[str, str]) -> None:
    """`logp_models:`: names, a `loss:` entry reading each, MRPO's `references:` naming them."""
    if not cfg.get("logp_models") and not any(isinstance(e, dict) and "references" in e for e in cfg.get("loss") or []):
        return
    check_section("dpo", cfg, origins)


def check_conventions(cfg: dict, origins: dict[str, str]) -> None:
    """Hyperparameter values of the `loss:` entries that are almost certainly a convention mix-up (each entry's
    `conventions`); without `loss:`, those of the entries TRL's own options stand for (checks.check_trl_conventions)."""
    if not cfg.get("loss"):
        checks.check_trl_conventions("dpo", cfg, origins)
        return
    for i, entry in enumerate(cfg["loss"]):
        if isinstance(entry, dict) and entry.get("name") in PREFERENCE:
            params = {k: v for k, v in entry.items() if k in PREFERENCE.entries[entry["name"]].params}
            errors = PREFERENCE.entries[entry["name"]].convention_errors(params)
            if errors:
                raise RecipeError(f"preference loss {entry['name']!r} (loss[{i}], from "
                                  f"{origin_of(origins, 'loss')}): {errors[0]}")


def run(recipe: Recipe, options: RunOptions) -> dict:
    # slow: trl (through postrain.trainers.dpo and .preference_trainers), needed only when this runs
    from postrain.trainers.dpo import check_loss_data
    from postrain.trainers.preference_trainers import trainer_class_for

    ref_spec = recipe.cfg.get("ref_model")
    # parsed once, when the recipe loaded (postrain.recipes.sections): the trainer takes these terms as they are (the
    # recipe's `trainer:` is what its config is built of)
    terms = loss_terms(recipe.cfg, recipe.origins)
    check_model_references(terms)  # TGDPO's token_reward_model exists, before anything is written
    logp_models = recipe.cfg.get("logp_models") or {}  # loaded one at a time by the trainer, then freed
    provided = tuple(provided_columns(logp_models))
    return train_with_trl(
        # TRAINERS["dpo"] (PostrainDPOTrainer) for pairs, its list-wise or unpaired subclass for those losses
        recipe, options, job="dpo", trainer_cls=trainer_class_for(terms), config_cls=config_class("dpo"),
        trainer_kwargs=lambda: {"ref_model": model_loading.load_model(ref_spec)[0] if ref_spec else None,
                                "losses": terms,
                                **({"logp_models": dict(logp_models)} if logp_models else {}),
                                # one sequence per prompt with its answers (postrain.trainers.shared_prefix_dpo)
                                "shared_prefix": bool((recipe.cfg.get("trainer") or {}).get("shared_prefix"))},
        # data of the wrong shape, or lacking a column a loss reads (score_chosen, ...), fails here, before the
        # model loads
        check_data=lambda dataset, where: check_loss_data(terms, dataset, where, provided),
    )


def smoke_layer(cfg: dict) -> dict:
    """The `--smoke` layer of a dpo recipe (postrain.jobs.smoke): a training job's, with built-in rows of the shape
    its losses read, and tiny models for its reference, `logp_models:` and TGDPO's token reward model too."""
    trainer = dict(SMOKE_TRAINER)
    if not (cfg.get("trainer") or {}).get("precompute_ref_log_probs"):
        trainer.pop("precompute_ref_batch_size")
    layer = smoke.training_layer(cfg, trainer, shape=smoke_data_shape(cfg))
    # group_robust_po reads a group column the built-in rows lack (trainers.dpo_state)
    layer["data"] = smoke_group_column_data(cfg, layer["data"])
    if cfg.get("ref_model"):
        layer["ref_model"] = smoke.smoke_model(seed=1)
    if cfg.get("logp_models"):  # further models scoring the pairs (trainers.logp_models)
        layer["logp_models"] = {name: smoke.smoke_model(seed=2 + i) for i, name in enumerate(cfg["logp_models"])}
    if any(isinstance(e, dict) and e.get("token_reward_model") for e in cfg.get("loss") or []):
        # TGDPO's token reward model (trainers.token_level) sits on its loss entry; a list is replaced whole
        layer["loss"] = [{**e, "token_reward_model": smoke.smoke_model(seed=9)}
                         if isinstance(e, dict) and e.get("token_reward_model") else e for e in cfg["loss"]]
    return layer


def smoke_data_shape(cfg: dict) -> str:
    """pairs, lists or unpaired: what the recipe's `loss:` entries read (postrain.preference.section); `turns` (the
    built-in tasks' multi-turn conversational pairs) for per-turn losses (dmpo, postrain.preference.turn_data)."""
    if reads_turns_section(cfg.get("loss")):
        return "turns"
    return section_shape(cfg.get("loss")).name


# Under --smoke the built-in pairs carry no group column: the answer (a handful of distinct numbers) stands in.
SMOKE_GROUP_SOURCE = "answer"


def smoke_group_column_data(cfg: dict, data: dict) -> dict:
    """The smoke layer's `data` for a DPO recipe whose losses read groups (group_robust_po): the group column mapped
    from the built-in rows' answer, and no eval set (its answers are groups the training rows may lack)."""
    columns = {entry["group_column"]: SMOKE_GROUP_SOURCE for entry in cfg.get("loss") or []
               if isinstance(entry, dict) and "group_column" in state_settings(entry.get("name"))
               and entry.get("group_column")}
    if not columns or not data.get("train"):
        return data
    return {**data, "train": {**data["train"], "columns": {**(data["train"].get("columns") or {}), **columns}},
            "eval": None}
