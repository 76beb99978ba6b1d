"""`postrain sft`: supervised fine-tuning over TRL's SFTTrainer.

Data: prompt/completion pairs (loss on the completion only, TRL's default), chat `messages`, or plain `text`.
`trainer.packing: true` packs sequences; a `peft:` section trains LoRA adapters (merged into the saved model).
"""

from __future__ import annotations

from postrain.jobs.common import RunOptions, train_with_trl
from postrain.recipes import Recipe


def run(recipe: Recipe, options: RunOptions) -> dict:
    from trl import SFTConfig, SFTTrainer

    return train_with_trl(recipe, options, job="sft", trainer_cls=SFTTrainer, config_cls=SFTConfig)
