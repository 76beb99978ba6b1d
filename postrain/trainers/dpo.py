"""DPOTrainer with postrain's preference-loss registry: `loss: [{name: simpo, weight: 1.0, beta: 2.0}]`.

With no registry losses the trainer is TRL's, unchanged (`trainer.loss_type` and every TRL option). With them,
each batch's log-probs are computed once (policy; reference only if some chosen loss reads reference data), the
registry's data dict is built from them, and the loss is Σ_i weight_i · mean(loss_i).

The `loss:` section is parsed by postrain.preference.section (`parse_losses`: the terms, their data shape, the
load-time checks); the trainer takes the parsed terms, or a raw section which it parses with the same function.
Each data shape has its trainer (postrain.trainers.preference_trainers.trainer_class_for):
  pairs     {prompt, chosen, rejected}                        -> PostrainDPOTrainer (this module)
  lists     {prompt, completions: [K texts], scores | ranks}  -> trainers.listwise.ListwiseDPOTrainer
  unpaired  {prompt, completion, label}                       -> trainers.unpaired.UnpairedDPOTrainer
so `postrain dpo` needs no other setting. The data is checked for its shape here (`check_loss_data`).

TRL 1.16 offers no loss hook: the loss chain is inline in `DPOTrainer._compute_loss`. `_compute_loss` is
overridden; its policy forward (about 10 lines, `_policy_forward`) is copied from TRL 1.16, the reference
log-probs come from TRL's own `compute_ref_log_probs` (which takes the model to run as an argument).
tests/test_dpo_trainer.py pins the source of every TRL method used or overridden here, so a TRL change fails a
test instead of drifting silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import datasets
import torch
from accelerate.utils import is_peft_model
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import add_fused_lm_head

from postrain.errors import DataError, RecipeError
# the parsed `loss:` section: terms, data shapes and the data names the trainer computes for them
from postrain.preference.section import (LISTS, LOG_SUM_SQ_PROBS, PAIR_COLUMNS, PAIRS, SHAPE_OPTIONS, SHAPES,
                                         TRL_LOSS_OPTIONS, UNPAIRED, DataShape, LossTerm, is_parsed, losses_shape,
                                         parse_losses, term_keys)
from postrain.preference.turn_data import reads_turns
from postrain.recipes.checks import check_loss_models
# TGDPO's token rewards, Ra-DPO's risk ratios: computed per batch from the inputs on the loss entry
from postrain.trainers.token_level import TokenLevelInputs
# DMPO's per-turn log-probs of multi-turn conversations: spans from the chat template, sums per agent turn
from postrain.preference import preference_loss
from postrain.trainers import shared_prefix_dpo as sp
from postrain.trainers import turns
from postrain.trainers.logp_models import add_logp_columns, logp_columns
from postrain.trainers.shared_prefix_dpo import pair_leaders
# β-DPO's margin statistics, group robust PO's group weights: state the trainer keeps across batches
from postrain.trainers.dpo_state import BATCH_KEYS as STATE_BATCH_KEYS
from postrain.trainers.dpo_state import DPOLossState, check_group_column, checkpoint_folder


# The trainer of each data shape, by its dotted path: the pair trainer names the right one when it is given losses of
# another shape, and cannot import the list-wise and unpaired trainers (they subclass it).
# postrain.trainers.preference_trainers.trainer_class_for imports them and picks by shape; a test checks both agree.
SHAPE_TRAINERS = {
    PAIRS.name: "postrain.trainers.dpo.PostrainDPOTrainer",
    LISTS.name: "postrain.trainers.listwise.ListwiseDPOTrainer",
    UNPAIRED.name: "postrain.trainers.unpaired.UnpairedDPOTrainer",
}


def check_loss_columns(terms: list[LossTerm], columns: list[str], where: str, provided: tuple = ()) -> None:
    """Data-load-time check: the dataset has the columns of the losses' data shape (pairs, lists or unpaired rows)
    and the per-pair columns the chosen losses read (or `provided` will add: `logp_models:` columns). The message
    names the column and the loss that needs it."""
    shape = losses_shape(terms)
    who = f"preference loss {terms[0].name!r} (loss[0])" if terms else "TRL's DPO loss (`trainer.loss_type`)"
    for options in shape.columns:
        if not any(c in columns for c in options):
            wanted = " or ".join(repr(c) for c in options)
            raise DataError(
                f"{where}: {who} trains on {shape.rows} and needs the column {wanted}, which the dataset lacks; "
                f"columns present: {', '.join(columns)}. Map it with {where}.columns, e.g. columns: "
                f"{{{options[0]}: <your column>}}" + _shape_hint(columns))
    check_pass_through_columns(terms, [*columns, *provided], where)


def check_pass_through_columns(terms: list[LossTerm], columns: list[str], where: str) -> None:
    """The dataset has the per-pair columns (score_chosen, ...) the chosen losses read."""
    for i, term in enumerate(terms):
        needed = [k for k, req in term.variant.data.items() if req and k in term.shape.pass_through]
        if missing := [k for k in needed if k not in columns]:
            raise DataError(f"{where}: preference loss {term.name!r} (loss[{i}]) reads the column(s) "
                            f"{', '.join(missing)}, which the dataset lacks; columns present: {', '.join(columns)}. "
                            f"Map them with {where}.columns, e.g. columns: {{{missing[0]}: <your column>}}")


def _shape_hint(columns: list[str]) -> str:
    """When the data has another shape's columns: say which losses would read it."""
    for shape in SHAPES:
        if all(any(c in columns for c in options) for options in shape.columns):
            return f". (The dataset holds {shape.rows}: losses of that shape read it.)"
    return ""


def check_loss_data(terms: list[LossTerm], dataset, where: str, provided: tuple = ()) -> None:
    """Data-load-time check of a whole dataset: its columns (check_loss_columns), then, for lists and unpaired
    rows, every row's values (K completions with K scores or ranks; labels in [0, 1]), naming the bad row."""

    check_loss_columns(terms, list(dataset.column_names), where, provided)
    check_group_column(terms, dataset, where)  # group_robust_po's group_column: present, strings or integers
    turns.check_turn_rows(terms, dataset, where)  # dmpo: conversations whose trajectories start with agent turns
    shape = losses_shape(terms)
    if not isinstance(dataset, datasets.Dataset) or shape is PAIRS:
        return
    if shape is LISTS:
        _check_list_rows(dataset, where)
    else:
        _check_labels(dataset["label"], where)


def _check_list_rows(dataset, where: str) -> None:
    key = "scores" if "scores" in dataset.column_names else "ranks"
    for i, (completions, values) in enumerate(zip(dataset["completions"], dataset[key])):
        row = f"{where}, row {i}"
        if not isinstance(completions, list) or len(completions) < 2:
            raise DataError(f"{row}: `completions` must be a list of at least 2 completions to rank, got "
                            f"{completions!r:.200}")
        if not isinstance(values, list) or len(values) != len(completions):
            raise DataError(f"{row}: `{key}` must give one number per completion ({len(completions)}), got "
                            f"{values!r:.200}")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
            raise DataError(f"{row}: `{key}` must be finite numbers, got {values!r:.200}")
        if key == "ranks" and any(not 1 <= v <= len(values) for v in values):
            raise DataError(f"{row}: `ranks` run from 1 (best) to the number of completions ({len(values)}), "
                            f"got {values!r}")


def _check_labels(labels: list, where: str) -> None:
    for i, label in enumerate(labels):
        if not isinstance(label, (bool, int, float)) or not 0 <= label <= 1:
            raise DataError(f"{where}, row {i}: `label` must be true / false (desirable or not), or a number in "
                            f"[0, 1] for losses with soft labels, got {label!r}")


def list_scores(example: dict) -> list[float]:
    """A list row's scores, higher is better: its `scores`, else from its `ranks` (1 = best) as ψ = K − rank,
    the number of completions ranked below (best K − 1, worst 0; ties share a value), LiPO's graded label."""
    if example.get("scores") is not None:
        return [float(s) for s in example["scores"]]
    ranks = example["ranks"]
    return [float(len(ranks) - r) for r in ranks]


@dataclass
class _WithPairColumns:
    """TRL's preference collator, plus the per-pair columns the losses read, as float tensors."""

    collator: Callable
    columns: tuple[str, ...]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        for name in self.columns:
            batch[name] = torch.tensor([float(example[name]) for example in examples])
        return batch


@dataclass
class PostrainDPOConfig(DPOConfig):
    """TRL's DPOConfig and postrain's switch for computing the same training faster: `shared_prefix` is a field of
    the trainer config (a recipe's `trainer.shared_prefix`), as for GRPO (postrain.trainers.grpo.PostrainGRPOConfig):
    a setting of how the trainer computes, beside TRL's `padding_free` or `use_liger_kernel`, validated, shown by
    `postrain config`, checked by --dry-run and saved with checkpoints as TRL's fields are
    (postrain.trainers.TRAINERS names this class for `dpo`)."""

    shared_prefix: bool = field(default=False, metadata={"help": (
        "Encode each prompt once for all its answers: prompt, chosen and rejected (or a list's K answers) in one "
        "sequence whose answers see the prompt and themselves only (arXiv 2410.20305); losses and gradients are "
        "unchanged. Qwen2 / Llama models with sdpa or eager attention (postrain.trainers.shared_prefix_dpo).")})


class PostrainDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer; with `losses` (a `loss:` section), the loss is the weighted sum of registry losses.

    Logged per step, as TRL does: loss, logps/chosen, logps/rejected, and, where a reference is used,
    rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (β·log-ratio, with the β of the first
    reference-based loss that has one); and each term's mean as `loss/<name>` (`loss/<name>_2`, ... for repeats).
    Subclasses train the other data shapes (`shape`); they reuse the loss sum, the forwards and the logging here.
    """

    shape: DataShape = PAIRS
    token_inputs: TokenLevelInputs | None = None  # per-batch token-level inputs (postrain.trainers.token_level)

    def __init__(self, *args, losses: list | None = None, logp_models: dict | None = None,
                 shared_prefix: bool = False, **kwargs):
        """`losses`: the terms postrain.preference.section.parse_losses returned (`postrain dpo` passes those parsed
        when the recipe loaded: postrain.recipes.sections), or a raw `loss:` section, parsed here against the
        config's options."""
        config = kwargs.get("args")
        if is_parsed(losses):
            self.loss_terms = list(losses)
        else:
            trainer_options = {k: getattr(config, k) for k in (*TRL_LOSS_OPTIONS, *SHAPE_OPTIONS)
                               if hasattr(config, k)} if config else {}
            self.loss_terms = parse_losses(losses, trainer_options) if losses else []
            check_loss_models(self.loss_terms, {})  # TGDPO's token_reward_model: a model spec
        shape = losses_shape(self.loss_terms)
        if shape is not self.shape:
            what = f"these losses read {shape.rows}" if self.loss_terms else "it needs registry losses (`losses`)"
            raise RecipeError(f"{type(self).__name__} trains on {self.shape.rows}, but {what}: use "
                              f"{SHAPE_TRAINERS[shape.name]} (postrain dpo picks it from the `loss:` section)")
        self.shared_prefix = bool(shared_prefix)  # trainer.shared_prefix (postrain.trainers.shared_prefix_dpo)
        self._shared_prefix_verified = False
        if self.shared_prefix:

            options = {k: getattr(config, k) for k in sp.REFUSED_OPTIONS if hasattr(config, k)} if config else {}
            sp.check_options(options, self.shape.name)
        self._check_raw_data(kwargs.get("train_dataset"), kwargs.get("eval_dataset"))
        self.loss_state = DPOLossState(self.loss_terms, term_keys(self.loss_terms), kwargs.get("train_dataset"),
                                       kwargs.get("eval_dataset"), seed=config.seed if config else 0)
        super().__init__(*args, **kwargs)
        if logp_models:  # further models' log-probs as dataset columns, before the collator learns its columns

            if not self.loss_terms:
                raise RecipeError("logp_models: only postrain's preference losses (`losses`) read further models' "
                                  "log-probs")
            add_logp_columns(self, logp_models)
        if self.loss_terms:
            self._setup_batches()
            # TGDPO's token reward model loaded, Ra-DPO's full-distribution forwards switched on (None: neither)
            self.token_inputs = TokenLevelInputs.for_trainer(self)
        if self.shared_prefix:
            self._enable_shared_prefix()

    def _prefix_models(self) -> list[tuple[str, Any]]:
        """The models a batch runs through: the policy, the reference (when separate), TGDPO's token reward model."""
        models = [("policy", self.model)]
        if self.ref_model is not None:
            models.append(("reference model", self.ref_model))
        if self.token_inputs is not None and self.token_inputs.reward_model is not None:
            models.append(("token reward model", self.token_inputs.reward_model))
        return models

    def _enable_shared_prefix(self) -> None:
        """Refuse models that cannot take the shared layout, then patch each model's forward to run it."""

        if self.aux_loss_enabled:
            raise sp.SharedPrefixError("trainer.shared_prefix: the policy adds a MoE load-balancing loss, which reads "
                                       "the 2D padding mask the shared rows replace. Set trainer.shared_prefix: false")
        for what, model in self._prefix_models():
            sp.check_model(model, what)
        for _, model in self._prefix_models():
            sp.enable(model, self.args.pad_to_multiple_of)

    def _prefix_leaders(self, inputs: dict) -> torch.Tensor:
        """For each row of the batch, the first row of the group sharing its prompt: TRL's pair batch is
        [chosen..., rejected...], so row i and row B + i."""

        return pair_leaders(inputs["input_ids"].size(0))

    def _with_shared_prefix(self, model, inputs: dict) -> dict:
        """The batch with `shared_prefix_rows` added (trainer.shared_prefix), which every model call made from it
        passes on to the patched forwards; on the first batch, each model's shared log-probs are checked against
        the standard ones."""
        if not self.shared_prefix:
            return inputs

        rows = sp.prefix_rows(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"],
                              self._prefix_leaders(inputs))
        inputs = {**inputs, sp.ROWS_KEY: rows}
        if not self._shared_prefix_verified:
            for what, checked in self._prefix_models():
                sp.verify(model if checked is self.model else checked, inputs, what)
            self._shared_prefix_verified = True
        return inputs

    def _check_raw_data(self, train_dataset, eval_dataset) -> None:
        """Before TRL tokenizes: for pairs, only per-turn losses' rows (conversations; the first row here, every row
        as the spans are computed); score columns are checked once tokenized."""
        if reads_turns(self.loss_terms):
            for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
                for key, part in (dataset.items() if isinstance(dataset, dict) else [(name, dataset)]):
                    if part is not None:
                        turns.check_turn_row(next(iter(part)), f"{key}, row 0")

    def _setup_batches(self) -> None:
        """Once TRL built its collator: add the per-pair columns the losses read, and WPO's log Σπ² head."""
        present = list(next(iter(self.train_dataset)).keys())
        check_pass_through_columns(self.loss_terms, present, "train_dataset")
        columns = tuple(c for c in self._pair_columns_read() if c in present)
        if columns:
            self.data_collator = _WithPairColumns(self.data_collator, columns)
        self.data_collator = self.loss_state.wrap_collator(self.data_collator)  # group ids (group_robust_po)
        if reads_turns(self.loss_terms):  # dmpo: agent-turn spans per row, a turn id per position per batch
            turns.add_turn_spans(self)
            self.data_collator = turns.WithTurnIds(self.data_collator, self.args.max_length)
        if any(set(LOG_SUM_SQ_PROBS) & t.reads for t in self.loss_terms):
            # TRL's fused LM head computes log Σπ² only under `use_weighting`; patch the head again to add it
            # (the new head replaces the forward TRL patched; outputs as TRL asks for them, plus log_sum_sq_probs).

            base = self.model.get_base_model() if is_peft_model(self.model) else self.model
            add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))

    def _pair_columns_read(self) -> list[str]:
        terms = getattr(self, "loss_terms", [])
        return [c for c in PAIR_COLUMNS if any(c in t.reads for t in terms)] + self._reference_columns_read()

    def _reference_columns_read(self) -> list[str]:
        """The `logp_models:` columns of the further references the terms' `references:` name (MRPO)."""

        names = dict.fromkeys(r for t in getattr(self, "loss_terms", []) for r in t.params.get("references") or [])
        return [c for name in names for c in logp_columns(name)]

    @property
    def uses_reference(self) -> bool:
        return any(t.reads & self.shape.reference_data for t in self.loss_terms)

    def _reward_beta(self) -> float:
        """β for logged implicit rewards: that of the first loss that reads the reference and has one (TRL:
        trainer.beta)."""
        return next((t.beta for t in self.loss_terms if t.beta is not None and t.reads & self.shape.reference_data),
                    self.beta)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # Keep the per-pair columns the losses read: Trainer drops every column not named here.
        state_columns = self.loss_state.columns() if getattr(self, "loss_state", None) else []
        if reads_turns(getattr(self, "loss_terms", [])):
            state_columns = [*state_columns, *turns.SPAN_COLUMNS]
        extra = [c for c in self._pair_columns_read() + state_columns if c not in self._signature_columns]
        self._signature_columns = list(self._signature_columns) + extra

    def _policy_forward(self, model, inputs: dict):
        """The policy forward of TRL 1.16's DPOTrainer._compute_loss on a batch of sequences (`input_ids`,
        `attention_mask`, `completion_mask`): its outputs, per-token completion log-probs (N, T), the shifted
        completion mask and the model's keyword arguments."""
        if self.token_inputs is not None and self.token_inputs.full_vocab:  # Ra-DPO: an unfused forward, logits
            return self.token_inputs.policy_forward(model, inputs)
        # Copied from TRL 1.16 DPOTrainer._compute_loss (the policy forward, its first ~17 lines), unchanged.
        _non_model_keys = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        model_kwargs = {k: v for k, v in inputs.items() if k not in _non_model_keys}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        shift_completion_mask = completion_mask[..., 1:]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = shift_completion_mask.size(1)
        per_token_logps = outputs.log_probs[:, -seq_len:]
        # (end of the copy)
        return outputs, per_token_logps, shift_completion_mask, model_kwargs

    def _reference_token_logps(self, inputs: dict, seq_len: int) -> torch.Tensor:
        """Per-token reference log-probs (N, T) of a batch of sequences, from one forward."""
        if self.token_inputs is not None and self.token_inputs.full_vocab:  # Ra-DPO: an unfused forward, logits
            return self.token_inputs.reference_token_logps(inputs, seq_len)
        kept = {}

        def forward_and_keep(**kwargs):
            kept["outputs"] = reference(**kwargs)
            return kept["outputs"]

        # TRL's compute_ref_log_probs does the reference forward (no grad, the peft adapter switched off or to
        # "ref", gradient checkpointing off) on the model it is given; keep its per-token output.
        reference = self.ref_model or self.model
        self.compute_ref_log_probs(forward_and_keep, inputs)
        return kept["outputs"].log_probs[:, -seq_len:]

    def _compute_loss(self, model, inputs, return_outputs):
        inputs = self._with_shared_prefix(model, inputs)
        if not self.loss_terms:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        references = self._reference_columns_read()
        # further references' columns reach the losses through _term_data (only the terms naming them read them)
        self._batch_reference_columns = {k: inputs[k] for k in references if k in inputs}
        columns = {k: inputs[k] for k in PAIR_COLUMNS if k in inputs}
        self._batch_state_inputs = {k: inputs[k] for k in STATE_BATCH_KEYS if k in inputs}  # group ids
        inputs = {k: v for k, v in inputs.items()
                  if k not in PAIR_COLUMNS and k not in references and k not in STATE_BATCH_KEYS}
        turn_ids = inputs.pop(turns.TURN_IDS, None)  # dmpo's turn id per position, not a model input
        outputs, per_token_logps, shift_completion_mask, model_kwargs = self._policy_forward(model, inputs)
        seq_len = shift_completion_mask.size(1)

        chosen_mask, rejected_mask = shift_completion_mask.chunk(2, dim=0)  # batch is [chosen, rejected]
        data: dict[str, Any] = dict(columns)
        data["chosen_token_logps"], data["rejected_token_logps"] = per_token_logps.chunk(2, dim=0)
        data["chosen_logps"], data["rejected_logps"] = per_token_logps.sum(dim=1).chunk(2, dim=0)
        data["chosen_mask"], data["rejected_mask"] = chosen_mask, rejected_mask
        data["chosen_lengths"], data["rejected_lengths"] = (m.sum(dim=1) for m in (chosen_mask, rejected_mask))
        if outputs.log_sum_sq_probs is not None:
            log_sum_sq = outputs.log_sum_sq_probs[:, -seq_len:]
            data["chosen_token_log_sum_sq_probs"], data["rejected_token_log_sum_sq_probs"] = log_sum_sq.chunk(2)
        if self.uses_reference:
            data.update(self._reference_data(inputs, seq_len))
        if turn_ids is not None:  # dmpo: per agent turn sums (B, J) of policy and reference, turn masks
            data.update(turns.turn_data(turn_ids, per_token_logps, data))
        if self.token_inputs is not None:  # TGDPO's token rewards, Ra-DPO's risk ratios
            data.update(self.token_inputs.data(inputs, seq_len, data))

        loss = self._registry_loss(mode, data, outputs)
        self._log_pair_metrics(mode, data)
        return self._with_outputs(loss, model, model_kwargs, return_outputs)

    def _registry_loss(self, mode: str, data: dict, outputs) -> torch.Tensor:
        """Σ weight · mean(loss) over the terms (each logged as loss/<key>), plus a MoE router's aux loss."""

        loss = 0.0
        for key, term in zip(term_keys(self.loss_terms), self.loss_terms):
            value = preference_loss(term.name, **self._term_data(mode, key, term, data), **term.params).mean()
            loss = loss + term.weight * value
            self._metrics[mode][f"loss/{key}"].append(self.accelerator.gather(value.detach()).mean().item())
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        return loss

    def _term_data(self, mode: str, key: str, term: LossTerm, data: dict) -> dict:
        """The data one term is called with; a hook for per-term data (BCO's reward shift). A term naming further
        references (`references:`, MRPO) gets their log-probs stacked as extra_ref_*_logps (B, K)."""
        if key in self.loss_state:  # β-DPO's M0, σ0 and selection, group robust PO's α: updated, then read
            data = self.loss_state.term_data(self, mode, key, term, data, self._batch_state_inputs)
        references = term.params.get("references")
        if not references:
            return data

        batch = self._batch_reference_columns
        columns = [logp_columns(name) for name in references]
        return {**data, "extra_ref_chosen_logps": torch.stack([batch[c] for c, _ in columns], dim=-1),
                "extra_ref_rejected_logps": torch.stack([batch[r] for _, r in columns], dim=-1)}

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.loss_state and self.args.should_save:  # beside the checkpoint, as the GRPO trainer's rl_state
            self.loss_state.save(checkpoint_folder(self, trial))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.loss_state and checkpoint is not None:  # --resume: the state the checkpoint was written with
            self.loss_state.load(checkpoint)

    def _with_outputs(self, loss, model, model_kwargs: dict, return_outputs: bool):
        if return_outputs:  # as TRL 1.16 does: logits for `compute_metrics`, from an extra forward
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _reference_data(self, inputs: dict, seq_len: int) -> dict[str, torch.Tensor]:
        """Reference log-probs of the pairs, summed and per token, from one forward (none when precomputed)."""
        if self.precompute_ref_logps:
            return {"ref_chosen_logps": inputs["ref_chosen_logps"], "ref_rejected_logps": inputs["ref_rejected_logps"]}
        ref_chosen_tokens, ref_rejected_tokens = self._reference_token_logps(inputs, seq_len).chunk(2, dim=0)
        return {"ref_chosen_logps": ref_chosen_tokens.sum(dim=1), "ref_rejected_logps": ref_rejected_tokens.sum(dim=1),
                "ref_chosen_token_logps": ref_chosen_tokens, "ref_rejected_token_logps": ref_rejected_tokens}

    def _log_pair_metrics(self, mode: str, data: dict) -> None:
        metrics = self._metrics[mode]
        gather = self.accelerator.gather
        chosen, rejected = data["chosen_logps"].detach(), data["rejected_logps"].detach()
        metrics["logps/chosen"].append(gather(chosen).mean().item())
        metrics["logps/rejected"].append(gather(rejected).mean().item())
        if "ref_chosen_logps" in data:
            beta = self._reward_beta()
            chosen_rewards = beta * (chosen - data["ref_chosen_logps"])
            rejected_rewards = beta * (rejected - data["ref_rejected_logps"])
            metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
            metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
            metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
            metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
