"""Thin TRL subclasses: they override documented hook points only.

`TRAINERS` names, per training command, the config and trainer classes its job builds. Recipe validation,
`--dry-run` and the load-time checks all take the config class from here, so a postrain subclass of a TRL
config (new fields for registry losses or RL parts) is validated exactly as the job will build it.
"""

from __future__ import annotations

import importlib

# command -> (config class, trainer class), as "module:attribute" (imported lazily: importing trl is slow)
TRAINERS: dict[str, tuple[str, str]] = {
    "sft": ("trl:SFTConfig", "trl:SFTTrainer"),
    "dpo": ("postrain.trainers.dpo:PostrainDPOConfig", "postrain.trainers.dpo:PostrainDPOTrainer"),
    "grpo": ("postrain.trainers.grpo:PostrainGRPOConfig", "postrain.trainers.grpo:PostrainGRPOTrainer"),
}


def _load(reference: str) -> type:
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def config_class(command: str) -> type:
    """The TRL config class (or postrain subclass) the `command` job builds from the recipe's `trainer:`."""
    return _load(TRAINERS[command][0])


def trainer_class(command: str) -> type:
    return _load(TRAINERS[command][1])
