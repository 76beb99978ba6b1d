"""Log-probs of further models as loss inputs: a DPO recipe's `logp_models:`.

    logp_models:
      prev: {name_or_path: runs/inpo/dpo_r1}        # INPO: π_t, the model this round starts from
      hermes: {name_or_path: some/other-model}      # MRPO: a further reference, `references: [hermes]`

Once, before training, each model named here scores every chosen and rejected completion of the train (and
eval) dataset; its summed log-probs become the columns `<name>_chosen_logps` and `<name>_rejected_logps`, and
the model is freed. Losses read them by name: `inpo` reads `prev_*` (a per-pair column, as if the data carried
it), `mrpo` the models its `references:` names (stacked into `extra_ref_*_logps`, shape (B, K)).

The log-probs are those the policy's would be: the dataset TRL has already tokenized for the policy (same
tokenizer, chat template, truncation), batched by TRL's own collator (same padding) and sharded as TRL's
`_precompute_ref_logps` shards the reference precompute, scored by postrain's one completion scorer
(postrain.models.generation.token_logps: a no-grad forward, log-softmax in float32, summed over the completion
mask) under the trainer's autocast, as TRL 1.16's `compute_ref_log_probs` runs its reference. So a model identical
to the policy gives the policy's log-probs at step 0 (tests/test_logp_models.py). A model whose tokenizer differs
from the policy's is refused: the policy's token ids mean nothing to it. Pairs only (the list-wise and unpaired
trainers do not read these columns).

Unlike TRL's reference precompute, the columns are not cached on disk (a rerun scores again), and
`trainer.evaluate(eval_dataset=...)` with a dataset other than the recipe's lacks them. Unlike TRL's fused LM head,
the scorer's forward holds one batch's full logits (2 x per-device batch rows x length x vocabulary, in the model's
dtype) while it scores.
"""

from __future__ import annotations

import dataclasses
import gc
import re
from typing import Any

from postrain.errors import RecipeError, origin_of
from postrain.models.generation import token_logps
from postrain.models import loading as model_loading  # load_model through it: tests replace it there
from postrain.preference.section import PAIRS
from postrain.recipes.schema import ModelSpec
from postrain.recipes.sections import loss_terms

NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# What TRL's preference collator adds besides the model's inputs (TRL 1.16 compute_ref_log_probs: _non_model_keys).
COLLATED_NOT_MODEL_INPUTS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
# `ref_*_logps` are TRL's precomputed reference columns and `extra_ref_*_logps` MRPO's stacked input.
RESERVED = {"ref": "TRL's precomputed reference log-probs use the columns ref_chosen_logps / ref_rejected_logps",
            "extra_ref": "MRPO's stacked further references are called extra_ref_*_logps"}


def logp_columns(name: str) -> tuple[str, str]:
    """The dataset columns a logp model named `name` adds: its summed log-probs of the chosen and rejected."""
    return f"{name}_chosen_logps", f"{name}_rejected_logps"


def terms_reading(terms: list, name: str) -> list[str]:
    """The loss terms (by name) that read the log-probs of the logp model `name`."""
    columns = set(logp_columns(name))
    return [t.name for t in terms
            if columns & set(t.variant.data) or name in (t.params.get("references") or [])]


def check_logp_models(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """Load-time check of `logp_models:` (its entries' model keys are checked by the schema, ModelSpec): names
    that make valid, unreserved column names; a `loss:` entry that reads each; MRPO's `references:` naming them."""
    if command != "dpo":
        return
    section = cfg.get("logp_models") or {}
    terms = loss_terms(cfg, origins)  # as the job's check parsed them (postrain.recipes.sections)
    for term_index, term in enumerate(terms):
        if "references" not in term.params:
            continue
        references = term.params["references"]
        where = f"loss[{term_index}].references (from {origin_of(origins, f'loss[{term_index}]')})"
        if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
            raise RecipeError(f"{where} must be a list of `logp_models` names, e.g. references: [hermes], got "
                              f"{references!r}")
        if len(references) != 1:
            raise RecipeError(f"{where} names {len(references)} models: {term.name!r} combines the main reference "
                              f"(ref_model) with exactly one further reference (the authors' closed form is for two "
                              f"references), e.g. references: [hermes]")
        if missing := [r for r in references if r not in section]:
            known = ", ".join(section) or "none"
            raise RecipeError(f"{where} names {', '.join(map(repr, missing))}, which `logp_models:` does not define "
                              f"(defined: {known}); add e.g. logp_models: {{{missing[0]}: {{name_or_path: ...}}}}")
    for name in section:
        where = f"logp_models.{name} (from {origin_of(origins, f'logp_models.{name}')})"
        if not NAME.match(str(name)):
            raise RecipeError(f"{where}: a logp model's name becomes the column prefix <name>_chosen_logps, so it must "
                              f"be lower-case letters, digits and _ starting with a letter, e.g. prev or ref2")
        if name in RESERVED:
            raise RecipeError(f"{where}: the name {name!r} is taken ({RESERVED[name]}); choose another, e.g. ref2")
        if not terms:
            raise RecipeError(f"{where}: only postrain's preference losses (`loss:`) read further models' "
                              f"log-probs, and the recipe has none; e.g. loss: [{{name: inpo}}] reads `prev`, "
                              f"loss: [{{name: mrpo, references: [{name}]}}] reads {name!r}")
        if terms[0].shape is not PAIRS:
            raise RecipeError(f"{where}: further models' log-probs are computed for preference pairs; the losses "
                              f"of this recipe read {terms[0].shape.rows}")
        if not terms_reading(terms, name):
            chosen, rejected = logp_columns(name)
            raise RecipeError(f"{where}: no `loss:` entry reads this model's log-probs ({chosen}, {rejected}), so it "
                              f"would be run for nothing. `inpo` reads a model named prev; `mrpo` reads those its "
                              f"`references:` names. Remove the entry or add the loss that reads it")


def provided_columns(section: dict | None) -> list[str]:
    """The columns the `logp_models:` section will add to the data (for the data-load-time column checks)."""
    return [c for name in (section or {}) for c in logp_columns(name)]


def add_logp_columns(trainer, models: dict[str, Any]) -> None:
    """Score the trainer's (tokenized) train and eval datasets with each further model, add its columns, free it.

    `models`: name -> a ModelSpec dict (loaded here, one at a time) or a loaded model (freed by the caller).
    Runs after TRL's __init__ (datasets tokenized, collator built), before training."""

    for name, model in models.items():
        if isinstance(model, dict):  # a recipe's entry: ModelSpec's defaults for the keys it leaves out

            model, tokenizer, _ = model_loading.load_model({**dataclasses.asdict(ModelSpec()), **model})
            _check_same_tokenizer(trainer, name, tokenizer)
        model = prepare_scoring_model(trainer, model)
        trainer.train_dataset = _with_columns(trainer, model, name, trainer.train_dataset, "train",
                                              trainer.args.per_device_train_batch_size)
        if isinstance(trainer.eval_dataset, dict):
            trainer.eval_dataset = {key: _with_columns(trainer, model, name, ds, key,
                                                       trainer.args.per_device_eval_batch_size)
                                    for key, ds in trainer.eval_dataset.items()}
        elif trainer.eval_dataset is not None:
            trainer.eval_dataset = _with_columns(trainer, model, name, trainer.eval_dataset, "eval",
                                                 trainer.args.per_device_eval_batch_size)
        del model
        gc.collect()
        _empty_device_cache()


def _check_same_tokenizer(trainer, name: str, tokenizer) -> None:
    policy = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    if tokenizer.get_vocab() != policy.get_vocab():
        raise RecipeError(f"logp_models.{name}: its tokenizer differs from the policy's ({len(tokenizer)} vs "
                          f"{len(policy)} tokens, or the same size with other ids). Its log-probs are computed on the "
                          f"policy's token ids, which would mean other text to it; use a model that shares the "
                          f"policy's tokenizer")


def prepare_scoring_model(trainer, model):
    """As TRL 1.16's DPOTrainer prepares its reference model: dropout off (if the config says so), the fused LM
    head that returns per-token log-probs, placed by accelerate for inference."""
    # slow: trl; recipe checks read this module
    from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

    model.eval()
    if trainer.args.disable_dropout:
        disable_dropout_in_model(model)
    add_fused_lm_head(model)
    return trainer.accelerator.prepare_model(model, evaluation_mode=True)


def _with_columns(trainer, model, name: str, dataset, split: str, batch_size: int):
    """`dataset` with the columns `<name>_chosen_logps`, `<name>_rejected_logps`: the summed log-probs of each
    completion under `model`, computed as TRL's reference precompute computes `ref_chosen_logps`."""
    # slow: torch and datasets; recipe checks read this module
    import torch
    from datasets import IterableDataset
    from torch.utils.data import DataLoader

    if isinstance(dataset, IterableDataset):
        raise RecipeError(f"logp_models.{name}: log-probs are precomputed into the dataset, which needs a map-style "
                          f"dataset, not a streamed one ({split})")
    chosen_column, rejected_column = logp_columns(name)
    if chosen_column in dataset.column_names or rejected_column in dataset.column_names:
        raise RecipeError(f"logp_models.{name}: the {split} data has a column {chosen_column} or {rejected_column} "
                          f"already; rename the logp model or the column")
    # The batching of TRL's _precompute_ref_logps (in order, the trainer's collator, sharded across processes).
    loader = trainer.accelerator.prepare(DataLoader(
        dataset, batch_size=batch_size or 1, collate_fn=trainer.data_collator, shuffle=False,
        num_workers=trainer.args.dataloader_num_workers, pin_memory=trainer.args.dataloader_pin_memory))
    chosen, rejected = [], []
    for batch in loader:
        chosen_logps, rejected_logps = pair_logps(trainer, model, batch)
        chosen_logps, rejected_logps = trainer.accelerator.gather_for_metrics((chosen_logps, rejected_logps))
        chosen.append(chosen_logps.float().cpu())
        rejected.append(rejected_logps.float().cpu())
    chosen_values, rejected_values = torch.cat(chosen).tolist(), torch.cat(rejected).tolist()
    return dataset.add_column(chosen_column, chosen_values).add_column(rejected_column, rejected_values)


def pair_logps(trainer, model, batch: dict):
    """Summed completion log-probs (chosen, rejected) of one batch of TRL's preference collator (the chosen rows,
    then the rejected ones) under `model`, in the trainer's autocast as TRL runs its reference forward."""

    inputs = {key: value for key, value in batch.items() if key not in COLLATED_NOT_MODEL_INPUTS}
    with trainer.accelerator.autocast():
        logps = token_logps(model, inputs.pop("input_ids"), inputs.pop("attention_mask"), batch["completion_mask"],
                            **inputs)
    return logps.sum(dim=1).chunk(2, dim=0)


def _empty_device_cache() -> None:
    # slow: torch and datasets; recipe checks read this module
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
