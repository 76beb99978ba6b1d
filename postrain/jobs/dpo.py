"""`postrain dpo`: preference optimization over TRL's DPOTrainer; every TRL `loss_type` is reachable.

The reference model, as users of TRL expect:
  - `ref_model: null` (default): TRL's implicit reference, a frozen copy of the starting policy (under peft, the
    base model with adapters disabled, so no second copy is held);
  - `ref_model: {name_or_path: ...}`: an explicit reference model;
  - `trainer.precompute_ref_log_probs: true`: reference log-probs computed once before training, after which
    the reference model is not kept in memory.
"""

from __future__ import annotations

from postrain.jobs.common import RunOptions, train_with_trl
from postrain.recipes import Recipe


def run(recipe: Recipe, options: RunOptions) -> dict:
    from trl import DPOConfig, DPOTrainer

    from postrain.models.loading import load_model

    ref_spec = recipe.cfg.get("ref_model")
    return train_with_trl(
        recipe, options, job="dpo", trainer_cls=DPOTrainer, config_cls=DPOConfig,
        trainer_kwargs=lambda: {"ref_model": load_model(ref_spec)[0] if ref_spec else None},
    )
