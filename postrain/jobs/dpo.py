"""`postrain dpo`: preference optimization over TRL's DPOTrainer; every TRL `loss_type` is reachable.

The reference model, as users of TRL expect:
  - `ref_model: null` (default): TRL's implicit reference, a frozen copy of the starting policy (under peft, the
    base model with adapters disabled, so no second copy is held);
  - `ref_model: {name_or_path: ...}`: an explicit reference model;
  - `trainer.precompute_ref_log_probs: true`: reference log-probs computed once before training, after which
    the reference model is not kept in memory.

`loss: [{name: simpo, weight: 1.0, beta: 2.0}]` replaces TRL's loss by postrain's preference-loss registry
(postrain.trainers.dpo), parsed once here (postrain.preference.section) and handed to the trainer; losses that
read no reference make no reference forward. The losses' data shape picks the trainer: pairs (PostrainDPOTrainer),
K-response lists (trainers.listwise) or unpaired labelled completions (trainers.unpaired); the data is checked for
that shape's columns and rows before anything is written.

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

from postrain.jobs.common import RunOptions, train_with_trl
from postrain.recipes import Recipe


def run(recipe: Recipe, options: RunOptions) -> dict:
    from postrain.models.loading import load_model
    from postrain.preference.section import parse_losses
    from postrain.trainers import config_class
    from postrain.trainers.dpo import check_loss_data, trainer_class_for
    from postrain.trainers.logp_models import provided_columns
    from postrain.trainers.token_level import check_model_references

    ref_spec = recipe.cfg.get("ref_model")
    losses = recipe.cfg.get("loss") or []
    # parsed once: the trainer takes these terms as they are (the recipe's `trainer:` is what its config is built of)
    terms = parse_losses(losses, recipe.cfg.get("trainer")) if losses else []
    check_model_references(terms)  # TGDPO's token_reward_model exists, before anything is written
    logp_models = recipe.cfg.get("logp_models") or {}  # loaded one at a time by the trainer, then freed
    provided = tuple(provided_columns(logp_models))
    return train_with_trl(
        # TRAINERS["dpo"] (PostrainDPOTrainer) for pairs, its list-wise or unpaired subclass for those losses
        recipe, options, job="dpo", trainer_cls=trainer_class_for(terms), config_cls=config_class("dpo"),
        trainer_kwargs=lambda: {"ref_model": load_model(ref_spec)[0] if ref_spec else None, "losses": terms,
                                **({"logp_models": dict(logp_models)} if logp_models else {}),
                                # one sequence per prompt with its answers (postrain.trainers.shared_prefix_dpo)
                                "shared_prefix": bool((recipe.cfg.get("trainer") or {}).get("shared_prefix"))},
        # data of the wrong shape, or lacking a column a loss reads (score_chosen, ...), fails here, before the
        # model loads
        check_data=lambda dataset, where: check_loss_data(terms, dataset, where, provided),
    )
