"""`postrain dpo`: preference optimization over TRL's DPOTrainer; every TRL `loss_type` is reachable.

The reference model, as users of TRL expect:
  - `ref_model: null` (default): TRL's implicit reference, a frozen copy of the starting policy (under peft, the
    base model with adapters disabled, so no second copy is held);
  - `ref_model: {name_or_path: ...}`: an explicit reference model;
  - `trainer.precompute_ref_log_probs: true`: reference log-probs computed once before training, after which
    the reference model is not kept in memory.
"""

from __future__ import annotations

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
    from trl import DPOConfig, DPOTrainer

    from postrain.data.sources import load_source
    from postrain.models.loading import load_model

    cfg = recipe.cfg
    train = load_source(cfg["data"]["train"], "dpo", where="data.train")
    eval_ds = load_source(cfg["data"]["eval"], "dpo", where="data.eval") if cfg["data"].get("eval") else None
    run_dir = prepare_run_dir(recipe, options)
    with running(run_dir):
        model, tokenizer, _ = load_model(cfg["model"])
        ref_model = load_model(cfg["ref_model"])[0] if cfg.get("ref_model") else None
        args = trainer_config(recipe, run_dir, DPOConfig)
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
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
