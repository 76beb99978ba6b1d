"""Checks of recipe vocabulary that a section's parser, below the recipe schema, cannot make itself.

The commands' load-time checks are their jobs' (`check` in postrain.jobs.sft, dpo, grpo, evaluate, merge,
pipeline; postrain.jobs.checks has those several jobs share).
"""

from __future__ import annotations

from postrain.recipes.schema import ModelSpec
from postrain.recipes.validate import validate_section


def check_loss_models(terms: list, origins: dict[str, str]) -> None:
    """The models a `loss:` entry names (TGDPO's `token_reward_model`), checked as `ref_model:` is: their keys and
    types against the recipe's model spec (the section's parser, below the recipe schema, checks their form)."""
    for i, term in enumerate(terms):
        if "token_reward_model" in term.inputs:
            validate_section(term.inputs["token_reward_model"], ModelSpec, f"loss[{i}].token_reward_model", origins)
