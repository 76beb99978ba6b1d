"""`postrain sft`: supervised fine-tuning over TRL's SFTTrainer.

Data: prompt/completion pairs (loss on the completion only, TRL's default), chat `messages`, or plain `text`.
`trainer.packing: true` packs sequences; a `peft:` section trains LoRA adapters (merged into the saved model).
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
    from trl import SFTConfig, SFTTrainer

    from postrain.data.sources import load_source
    from postrain.models.loading import load_model

    cfg = recipe.cfg
    train = load_source(cfg["data"]["train"], "sft", where="data.train")
    eval_ds = load_source(cfg["data"]["eval"], "sft", where="data.eval") if cfg["data"].get("eval") else None
    run_dir = prepare_run_dir(recipe, options)
    with running(run_dir):
        model, tokenizer, _ = load_model(cfg["model"])
        args = trainer_config(recipe, run_dir, SFTConfig)
        trainer = SFTTrainer(
            model=model,
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
