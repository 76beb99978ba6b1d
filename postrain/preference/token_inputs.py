"""Token-level inputs of pairwise losses, as a `loss:` section names them: TGDPO's token reward model, Ra-DPO's risk
setting, BMC's stopwords and GDPO's reference temperature.

Their settings sit on the loss entry, next to its hyperparameters, and are split off before the entry is called
(`split_inputs`, from postrain.preference.section.parse_losses at recipe load time):

    loss: [{name: tgdpo, token_reward_model: {name_or_path: runs/dpo}}]    # TGDPO: r̂_t from a DPO-trained model
    loss: [{name: ra_dpo, confidence_level: 0.95, split_vocab: true}]        # Ra-DPO: CVaR over the vocabulary
    loss: [{name: gdpo, alpha: 0.1, gamma: 0.1}]                             # GDPO: the reference's EOS at gamma

This module is the vocabulary (the data names and the settings, checked when a recipe loads); the DPO trainer
computes the inputs from them (postrain.trainers.token_level, whose docstring says how, with the authors' code).
A token reward model is checked here as a mapping with a `name_or_path`; its keys are checked against the recipe
schema's model spec where the recipe is loaded (postrain.recipes.checks.check_loss_models, called by postrain.jobs.dpo.check), the layer that has it.
"""

from __future__ import annotations

from typing import Any

from postrain.errors import RecipeError
from postrain.preference.registry import PREFERENCE

TOKEN_REWARDS = ("chosen_token_rewards", "rejected_token_rewards")
RISK_RATIOS = ("chosen_token_risk_ratios", "rejected_token_risk_ratios")
DIFF_MASKS = ("chosen_diff_mask", "rejected_diff_mask")
EOS_LOGPS = ("chosen_token_eos_logps", "rejected_token_eos_logps", "ref_chosen_token_eos_logps",
             "ref_rejected_token_eos_logps")
# Registry data the trainer computes from a pair batch; the losses reading it also read the reference's log-probs.
TOKEN_LEVEL_DATA = frozenset({*TOKEN_REWARDS, *RISK_RATIOS, *DIFF_MASKS, *EOS_LOGPS})

def input_keys(name: Any) -> dict[str, Any]:
    """The keys of preference loss `name`'s `loss:` entry that are inputs the trainer computes, not loss
    hyperparameters, with their defaults (None: no default, the recipe sets it): the entry's `trainer_inputs=`."""
    variant = PREFERENCE.entries.get(name) if isinstance(name, str) else None
    return variant.extra.get("trainer_inputs", {}) if variant is not None else {}


def split_inputs(name: Any, params: dict, trainer: dict, where: str) -> tuple[dict, dict]:
    """`params` of a `loss:` entry without the trainer-input keys of its loss, and those inputs (defaults filled in),
    checked. Raises RecipeError naming the key and what would be right."""
    keys = input_keys(name)
    if not keys:
        return params, {}
    inputs = {}
    for key, default in keys.items():
        if key in params:
            inputs[key] = params[key]
        elif default is None:
            raise RecipeError(f"{where}: preference loss {name!r} needs `{key}:`, the already DPO-trained model whose "
                              f"per-token log-ratio to the reference is TGDPO's token reward, e.g. {{name: {name}, "
                              f"{key}: {{name_or_path: runs/dpo}}}} (a DPO run, or a pipeline stage's output)")
        else:
            inputs[key] = default
    rest = {k: v for k, v in params.items() if k not in keys}
    if "token_reward_model" in inputs:
        spec = inputs["token_reward_model"]
        if not isinstance(spec, dict) or not isinstance(spec.get("name_or_path"), str):
            raise RecipeError(f"{where}.token_reward_model must be a model like `ref_model:`, e.g. "
                              f"{{name_or_path: runs/dpo}}, got {spec!r}")
    if "confidence_level" in inputs:
        level = inputs["confidence_level"]
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
            raise RecipeError(f"{where}.confidence_level must be a number in (0, 1) (the CVaR's confidence level; "
                              f"the authors use 0.95 to 0.99), got {level!r}")
        if not isinstance(inputs["split_vocab"], bool):
            raise RecipeError(f"{where}.split_vocab must be true (the authors' default: a VaR per half of the "
                              f"vocabulary) or false (one VaR over the vocabulary), got {inputs['split_vocab']!r}")
        if trainer.get("precompute_ref_log_probs"):
            raise RecipeError(f"{where}: preference loss {name!r} reads per-token risk ratios computed from the "
                              f"reference's full distribution on each batch, which trainer.precompute_ref_log_probs "
                              f"does not keep; set it to false")
    if "stopwords" in inputs:
        stopword_list(inputs["stopwords"], f"{where}.stopwords")  # refused now, not at the first batch
    if "gamma" in inputs:
        gamma = inputs["gamma"]
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma < float("inf"):
            raise RecipeError(f"{where}.gamma must be a positive number (the temperature of the reference's EOS "
                              f"log-prob in GDPO's log-reward; the authors use 0.1), got {gamma!r}")
    return rest, inputs


def stopword_list(value: Any, where: str) -> list[str]:
    """BMC's stopwords: `nltk` (the authors' list: nltk's English stopwords and their capitalised forms) or a list of
    words."""
    if value == "nltk":
        try:
            from nltk.corpus import stopwords  # optional dependency: only BMC's `stopwords: nltk` reads it

            words = list(stopwords.words("english"))
        except (ImportError, LookupError) as error:
            raise RecipeError(f"{where}: `nltk` needs nltk and its stopwords corpus (pip install nltk; python -m "
                              f"nltk.downloader stopwords), which are not installed here ({type(error).__name__}); "
                              f"give a list of words instead ([] for none)") from None
        return sorted(set(words) | {w.capitalize() for w in words if len(w) > 1})
    if not isinstance(value, (list, tuple)) or not all(isinstance(w, str) for w in value):
        raise RecipeError(f"{where} must be `nltk` (the authors' list) or a list of words ([] for none), got {value!r}")
    return list(value)


def check_terms(terms: list) -> None:
    """One token reward model, Ra-DPO setting, stopword list and GDPO temperature per recipe: the trainer computes
    each input once per batch."""
    for key, what in (("token_reward_model", "token reward model"), ("confidence_level", "risk setting"),
                      ("stopwords", "stopword list"), ("gamma", "reference EOS temperature")):
        values = [(t.name, t.inputs) for t in terms if key in t.inputs]
        if len({repr(sorted(i.items())) for _, i in values}) > 1:
            raise RecipeError(f"`loss:` gives {len(values)} {values[0][0]!r} entries different inputs "
                              f"({'; '.join(repr(i) for _, i in values)}): the trainer computes one {what} per batch, "
                              f"so give them the same")
