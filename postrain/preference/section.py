"""The `loss:` section of a DPO recipe: which registered preference losses the DPO trainer sums, parsed and checked.

    loss: [{name: simpo, weight: 1.0, beta: 2.0}, {name: sft, weight: 0.1}]

Each entry is `name` (a preference loss: `postrain variants --family preference`), an optional `weight` and that
entry's hyperparameters; settings of what the trainer computes for a term sit beside them and are split off
(token-level inputs: postrain.preference.token_inputs; trainer state: `state_settings=` on the entry, kept by
postrain.trainers.dpo_state). Without a `loss:` section the trainer is TRL's, untouched (`trainer.loss_type`).

`parse_losses` is the one parser. A loaded recipe's section is parsed once, by its check (postrain.jobs.dpo), and
kept for it (postrain.recipes.sections.loss_terms): liveness, the dry-run plan and `postrain dpo`, which hands
the terms to the trainer, read that parse. The trainer given a raw section (direct Python use) parses it itself.

Data shapes. A registry loss's data arguments say which rows it trains on (`DataShape`, `shape_of`):
  pairs     {prompt, chosen, rejected}: chosen_logps, rejected_logps, ... (B,)
  lists     {prompt, completions: [K texts], scores | ranks}: list_logps, list_ref_logps, list_scores,
            list_mask (B, K)
  unpaired  {prompt, completion, label}: logps, ref_logps, labels (B,), KTO's kl, BCO's delta
One recipe trains on one shape: `parse_losses` refuses a `loss:` section that mixes them (a list loss next to a
pair loss). The trainer for each shape is the trainers layer's choice (postrain.trainers.preference_trainers.trainer_class_for).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

from postrain.errors import RecipeError, origin_of
from postrain.preference.registry import PREFERENCE
# TGDPO's token rewards, Ra-DPO's risk ratios, BMC's masks, GDPO's EOS log-probs: their inputs sit on the entry
from postrain.preference.token_inputs import TOKEN_LEVEL_DATA, check_terms, split_inputs
# DMPO's and SDPO's per-turn log-probs of multi-turn conversations
from postrain.preference.turn_data import REF_TURN_LOGPS, TURN_DATA
from postrain.preference.turn_data import check_options as check_turn_options

# Data the trainer computes from a plain (prompt, chosen, rejected) batch, by registry data name.
BATCH_DATA = frozenset({
    "chosen_logps", "rejected_logps",  # summed over completion tokens, (B,)
    "chosen_lengths", "rejected_lengths",  # completion tokens scored, (B,)
    "chosen_token_logps", "rejected_token_logps",  # per token, (B, T), zero off the completion
    "chosen_mask", "rejected_mask",  # completion tokens, (B, T)
    "chosen_token_log_sum_sq_probs", "rejected_token_log_sum_sq_probs",  # log Σ_v π(v|·)², (B, T) (WPO)
    "ref_chosen_logps", "ref_rejected_logps",
    "ref_chosen_token_logps", "ref_rejected_token_logps",
})
# Per-pair numbers the trainer takes from dataset columns of the same name (TRL's collator drops extra columns,
# so the trainer adds these to each batch itself).
PAIR_COLUMNS = ("score_chosen", "score_rejected", "chosen_probs", "rejected_probs",
                "prev_chosen_logps", "prev_rejected_logps")
# Further references' summed log-probs (B, K), stacked from the `logp_models:` columns a loss's `references:`
# names (postrain.trainers.logp_models; MRPO).
LOGP_MODEL_DATA = frozenset({"extra_ref_chosen_logps", "extra_ref_rejected_logps"})
# Registry data the trainer computes from the state it keeps across batches (postrain.trainers.dpo_state): β-DPO's
# margin statistics and selection, group robust PO's groups and weights.
STATE_DATA = frozenset({"margin_ema_mean", "margin_ema_std", "selection_mask", "selected_margin_mean",
                        "selected_fraction", "group_ids", "group_weights", "group_fractions", "group_counts"})
LOG_SUM_SQ_PROBS = ("chosen_token_log_sum_sq_probs", "rejected_token_log_sum_sq_probs")
REF_TOKEN_LOGPS = ("ref_chosen_token_logps", "ref_rejected_token_logps")


@dataclass(frozen=True)
class DataShape:
    """The rows a family of registry losses trains on and what the trainer computes from them."""

    name: str
    rows: str  # the rows, as messages name them
    columns: tuple[tuple[str, ...], ...]  # dataset columns needed; a tuple of several: any one of them
    data: frozenset[str]  # registry data the trainer computes from a batch
    reference_data: frozenset[str]  # those of them that need a reference forward
    pass_through: tuple[str, ...] = ()  # per-example dataset columns handed to the losses as they are

    def needs(self, variant) -> list[str]:
        """The required data of `variant` this shape cannot give it."""
        return [k for k, req in variant.data.items() if req and k not in self.data and k not in self.pass_through]


PAIRS = DataShape(
    "pairs", "preference pairs {prompt, chosen, rejected}", (("prompt",), ("chosen",), ("rejected",)),
    BATCH_DATA | LOGP_MODEL_DATA | TOKEN_LEVEL_DATA | STATE_DATA | TURN_DATA,
    frozenset({"ref_chosen_logps", "ref_rejected_logps", *REF_TOKEN_LOGPS, *TOKEN_LEVEL_DATA, *REF_TURN_LOGPS}),
    PAIR_COLUMNS)
LISTS = DataShape(
    "lists", "K-response lists {prompt, completions, scores or ranks}",
    (("prompt",), ("completions",), ("scores", "ranks")),
    frozenset({"list_logps", "list_ref_logps", "list_scores", "list_mask"}), frozenset({"list_ref_logps"}))
UNPAIRED = DataShape(
    "unpaired", "unpaired labelled completions {prompt, completion, label}", (("prompt",), ("completion",), ("label",)),
    frozenset({"logps", "ref_logps", "labels", "kl", "delta"}), frozenset({"ref_logps", "kl", "delta"}))
SHAPES = (PAIRS, LISTS, UNPAIRED)


def shape_of(variant) -> DataShape:
    """The data shape a registry loss trains on, read from its data arguments."""
    names = set(variant.data)
    if any(name.startswith("list_") for name in names):
        return LISTS
    if {"logps", "labels"} <= names:
        return UNPAIRED
    return PAIRS


def section_shape(section: list | None) -> DataShape:
    """The shape a `loss:` section trains on, without validating it (for the smoke layer): the first entry that
    names a known loss decides; no section (TRL's own loss) trains on pairs."""
    for entry in section or []:
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name in PREFERENCE:
            return shape_of(PREFERENCE.get(name))
    return PAIRS


# TRL options that shape TRL's own loss chain, which the registry path replaces: with `loss:` a non-default
# value would be silently ignored, so it is refused, saying what to write instead.
TRL_LOSS_OPTIONS = {
    "loss_type": "keep one of the two: `loss:` (postrain's preference-loss registry) or `trainer.loss_type` "
                 "(TRL's own losses); e.g. TRL's sigmoid is `loss: [{name: dpo}]`",
    "loss_weights": "give each `loss:` entry its `weight:`",
    "beta": "set `beta:` on each `loss:` entry (each defaults to its paper's value)",
    "label_smoothing": "set `label_smoothing:` on the entry that takes it (cdpo, robust, exo_pair, aot, aot_unpaired)",
    "ld_alpha": "use the `ld_dpo` entry with `alpha:`",
    "use_weighting": "use the `wpo` entry",
    "f_divergence_type": "use the entry `fdpo_forward_kl`, `fdpo_js` or `fdpo_alpha`",
    "f_alpha_divergence_coef": "use the `fdpo_alpha` entry with `alpha: 1 - f_alpha_divergence_coef`",
    "discopop_tau": "set `tau:` on the `discopop` entry",
}
# Trainer options besides TRL_LOSS_OPTIONS that parse_losses checks against the losses' data shape.
SHAPE_OPTIONS = ("precompute_ref_log_probs", "truncation_mode", "per_device_train_batch_size")


@dataclass(frozen=True)
class LossTerm:
    """One `loss:` entry: a registry loss, its weight and its hyperparameters."""

    name: str
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    # inputs the trainer computes for this term, set on its entry (postrain.preference.token_inputs: TGDPO's
    # token_reward_model, Ra-DPO's confidence_level / split_vocab); not passed to the loss
    inputs: dict[str, Any] = field(default_factory=dict)
    # settings of the state the trainer keeps for this term (its entry's `state_settings`, kept by
    # postrain.trainers.dpo_state: beta_dpo's rho and momentum, group_robust_po's group_column, step_size,
    # group_fractions); not passed to the loss
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def variant(self):
        return PREFERENCE.get(self.name)

    @property
    def shape(self) -> DataShape:
        return shape_of(self.variant)

    @property
    def reads(self) -> set[str]:
        """The data inputs this term reads from what the trainer can give it."""
        return set(self.variant.data) & (self.shape.data | set(self.shape.pass_through))

    @property
    def beta(self) -> float | None:
        """The β of this term (its setting, else its paper's default), if it has one."""
        return self.params.get("beta", self.variant.params.get("beta"))


def term_keys(terms: list[LossTerm]) -> list[str]:
    """A unique key per term for logs and state: its name, `<name>_2`, ... for repeats."""
    seen: dict[str, int] = {}
    keys = []
    for term in terms:
        seen[term.name] = seen.get(term.name, 0) + 1
        keys.append(term.name + (f"_{seen[term.name]}" if seen[term.name] > 1 else ""))
    return keys


def losses_shape(terms: list[LossTerm]) -> DataShape:
    """The one data shape of parsed terms (parse_losses refuses mixed ones); pairs without terms."""
    return terms[0].shape if terms else PAIRS


def is_parsed(section: Any) -> bool:
    """Whether `section` is parse_losses' result (a list of LossTerm) rather than a raw `loss:` section."""
    return isinstance(section, (list, tuple)) and bool(section) and all(isinstance(t, LossTerm) for t in section)


def trl_defaults() -> dict[str, Any]:
    """TRL's DPOConfig defaults of the options parse_losses checks (the recipe's `trainer:` may leave them out)."""

    from trl import DPOConfig  # slow to import (torch, transformers): only once a section is parsed

    wanted = set(TRL_LOSS_OPTIONS) | set(SHAPE_OPTIONS)
    return {f.name: f.default for f in dataclasses.fields(DPOConfig) if f.name in wanted}


def _is_default(option: str, value: Any, default: Any) -> bool:
    if option == "loss_type":  # TRL's __post_init__ turns a string into a one-element list
        value = [value] if isinstance(value, str) else list(value or [])
        return value == ["sigmoid"]
    return value == default


def parse_losses(section: list, trainer: dict | None = None, origins: dict[str, str] | None = None) -> list[LossTerm]:
    """Validate a `loss:` section (names, parameters, data the trainer can give, one data shape, TRL options that
    conflict) and return its terms. Raises RecipeError naming the entry, key or option and what would be right."""
    origins = origins or {}
    trainer = trainer or {}
    defaults = trl_defaults()
    for option, instead in TRL_LOSS_OPTIONS.items():
        if option in trainer and not _is_default(option, trainer[option], defaults.get(option)):
            origin = origin_of(origins, f"trainer.{option}")
            raise RecipeError(f"the recipe sets both `loss:` and trainer.{option}={trainer[option]!r} (from {origin}): "
                              f"with `loss:`, {instead}")
    if not isinstance(section, list) or not section:
        raise RecipeError("`loss:` must be a non-empty list of entries like {name: simpo, weight: 1.0, beta: 2.0}")
    terms = []
    for i, entry in enumerate(section):
        where = f"loss[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise RecipeError(f"{where} must be a mapping with a `name:` (a preference loss: "
                              f"`postrain variants --family preference`), got {entry!r}")
        params = {k: v for k, v in entry.items() if k not in ("name", "weight")}
        params, inputs = split_inputs(entry["name"], params, trainer, where)
        params, state = split_settings(entry["name"], params, where)
        variant = PREFERENCE.check_params(entry["name"], params, where=where)
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise RecipeError(f"{where}.weight must be a number, got {weight!r}")
        required = [p.name for p in variant.signature.parameters.values()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty]
        if missing := [p for p in required if p not in params]:
            raise RecipeError(f"{where}: preference loss {variant.name!r} needs {', '.join(map(repr, missing))} "
                              f"(its paper gives no default), e.g. {{name: {variant.name}, {missing[0]}: ...}}")
        shape = shape_of(variant)
        if unavailable := shape.needs(variant):
            columns = f", and reads the dataset columns {', '.join(shape.pass_through)}" if shape.pass_through else ""
            raise RecipeError(
                f"{where}: preference loss {variant.name!r} needs {', '.join(unavailable)}, which postrain's DPO "
                f"trainer cannot give it (from {shape.rows} it computes {', '.join(sorted(shape.data))}{columns}); "
                f"choose another loss")
        if trainer.get("precompute_ref_log_probs") and set(REF_TOKEN_LOGPS) & set(variant.data):
            raise RecipeError(f"{where}: preference loss {variant.name!r} reads per-token reference log-probs, which "
                              f"trainer.precompute_ref_log_probs does not keep; set it to false")
        terms.append(LossTerm(variant.name, float(weight), params, inputs, state))
    _check_one_shape(terms)
    check_terms(terms)
    check_turn_options(terms, trainer, defaults)  # dmpo: no precomputed reference, keep_start truncation
    check_state_options(terms, trainer, defaults)
    _check_shape_options(terms, trainer, defaults, origins)
    return terms


def _check_one_shape(terms: list[LossTerm]) -> None:
    if len({t.shape.name for t in terms}) > 1:
        described = "; ".join(f"loss[{i}] {t.name!r} reads {t.shape.rows}" for i, t in enumerate(terms))
        raise RecipeError(f"`loss:` mixes data shapes ({described}): one recipe trains on one shape of data. "
                          f"Keep the losses of one shape, or turn the data into the other shape first "
                          f"(data.train.transform: `unpair` makes unpaired rows of pairs)")


def _check_shape_options(terms: list[LossTerm], trainer: dict, defaults: dict, origins: dict) -> None:
    """Trainer options the list-wise and unpaired trainers cannot honour are refused rather than ignored."""
    shape = losses_shape(terms)
    if shape is PAIRS:
        return

    def option(name: str) -> Any:
        return trainer.get(name, defaults.get(name))

    def refuse(name: str, why: str) -> RecipeError:
        origin = origin_of(origins, f"trainer.{name}")
        return RecipeError(f"trainer.{name}={option(name)!r} (from {origin}) with {terms[0].name!r} ({shape.rows}): "
                           f"{why}")

    if option("precompute_ref_log_probs"):
        raise refuse("precompute_ref_log_probs", "TRL precomputes reference log-probs of pairs only; the "
                     f"{shape.name} trainer runs the reference on each batch. Set it to false")
    if option("truncation_mode") not in (None, "keep_start"):
        raise refuse("truncation_mode", "the sequences of lists and unpaired rows are padded by TRL's unpaired "
                     "collator, which keeps their start. Set truncation_mode: keep_start, or raise max_length")
    kl_terms = [t.name for t in terms if "kl" in t.reads]
    if kl_terms and (option("per_device_train_batch_size") or 0) < 2:
        raise refuse("per_device_train_batch_size", f"{kl_terms[0]!r} estimates its KL reference point from each "
                     "prompt paired with another row's completion in the same batch, so a batch needs at least "
                     "2 rows (KTO paper and TRL use 8 or more)")


# --- settings of the state the trainer keeps for a term (postrain.trainers.dpo_state) -------------------------------

def _number(lo: float, hi: float, what: str):
    def check(settings: dict, key: str, name: str, where: str) -> None:
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value < hi:
            raise RecipeError(f"{where}.{key} must be {what}, got {value!r}")
        settings[key] = float(value)
    return check


def _group_column(settings: dict, key: str, name: str, where: str) -> None:
    column = settings[key]
    if not isinstance(column, str) or not column:
        raise RecipeError(f"{where}: {name!r} needs `group_column:`, the dataset column holding each pair's "
                          f"group (strings or integers), e.g. {{name: {name}, group_column: group}}; got {column!r}")


def _group_fractions(settings: dict, key: str, name: str, where: str) -> None:
    if not isinstance(settings[key], bool):
        raise RecipeError(f"{where}.group_fractions must be true or false (divide each pair's loss by its "
                          f"group's share of the training set, the authors' divide_by_totalcount), got "
                          f"{settings[key]!r}")


# The check of each state setting an entry may declare (`state_settings=` at registration: setting -> default,
# None where required), in the entry's order.
STATE_SETTING_CHECKS = {
    "momentum": _number(0.0, 1.0, "a number in [0, 1) (the EMA momentum of M0 and σ0; the authors' 0.9)"),
    "rho": _number(0.0, 1.0, "a number in [0, 1) (the fraction of each batch's pairs left out; the paper's 0.2, "
                             "0 keeps all)"),
    "group_column": _group_column,
    "step_size": _number(0.0, math.inf, "a number >= 0 (η of the group weights' exponentiated-gradient update; "
                                        "the authors' default 0.01)"),
    "group_fractions": _group_fractions,
}


def state_settings(name: Any) -> dict[str, Any]:
    """The trainer-state settings of the preference loss `name` and their defaults (empty: it keeps no state)."""
    if not isinstance(name, str) or name not in PREFERENCE:
        return {}
    return dict(PREFERENCE.get(name).extra.get("state_settings") or {})


def split_settings(name: str, params: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A loss entry's keys split into the loss's own hyperparameters and its trainer-state settings (with their
    defaults filled in), the latter checked. Entries without state keep every key."""
    declared = state_settings(name)
    if not declared:
        return params, {}
    settings = {k: params.get(k, default) for k, default in declared.items()}
    rest = {k: v for k, v in params.items() if k not in declared}
    for key in declared:
        STATE_SETTING_CHECKS[key](settings, key, name, where)
    return rest, settings


def check_state_options(terms: list, trainer: dict, defaults: dict) -> None:
    """Load-time checks of trainer options against the stateful terms."""
    batch = trainer.get("per_device_train_batch_size", defaults.get("per_device_train_batch_size")) or 0
    for i, term in enumerate(terms):
        if term.name == "beta_dpo" and batch < 2:
            raise RecipeError(f"trainer.per_device_train_batch_size={batch} with 'beta_dpo' (loss[{i}]): σ0 is the "
                              f"running standard deviation of each batch's margins, which needs at least 2 pairs "
                              f"per batch (the authors use 64)")
