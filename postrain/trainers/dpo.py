"""DPOTrainer with postrain's preference-loss registry: `loss: [{name: simpo, weight: 1.0, beta: 2.0}]`.

With no registry losses the trainer is TRL's, unchanged (`trainer.loss_type` and every TRL option). With them,
each batch's log-probs are computed once (policy; reference only if some chosen loss reads `ref_*` data), the
registry's data dict is built from them, and the loss is Σ_i weight_i · mean(loss_i).

TRL 1.16 offers no loss hook: the loss chain is inline in `DPOTrainer._compute_loss`. `_compute_loss` is
overridden; its policy forward (about 10 lines) is copied from TRL 1.16, the reference log-probs come from TRL's
own `compute_ref_log_probs` (which takes the model to run as an argument). tests/test_dpo_trainer.py pins the
source of every TRL method used or overridden here, so a TRL change fails a test instead of drifting silently.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from trl import DPOTrainer

from postrain.errors import DataError, RecipeError
from postrain.recipes.validate import origin_of

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
LOG_SUM_SQ_PROBS = ("chosen_token_log_sum_sq_probs", "rejected_token_log_sum_sq_probs")
REF_TOKEN_LOGPS = ("ref_chosen_token_logps", "ref_rejected_token_logps")

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


@dataclass(frozen=True)
class LossTerm:
    """One `loss:` entry: a registry loss, its weight and its hyperparameters."""

    name: str
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def variant(self):
        from postrain.preference import PREFERENCE

        return PREFERENCE.get(self.name)

    @property
    def reads(self) -> set[str]:
        """The data inputs this term reads from what the trainer can give it."""
        return set(self.variant.data) & (BATCH_DATA | set(PAIR_COLUMNS))

    @property
    def beta(self) -> float | None:
        """The β of this term (its setting, else its paper's default), if it has one."""
        return self.params.get("beta", self.variant.params.get("beta"))


def _trl_defaults() -> dict[str, Any]:
    import dataclasses

    from postrain.trainers import config_class

    return {f.name: f.default for f in dataclasses.fields(config_class("dpo")) if f.name in TRL_LOSS_OPTIONS}


def _is_default(option: str, value: Any, default: Any) -> bool:
    if option == "loss_type":  # TRL's __post_init__ turns a string into a one-element list
        value = [value] if isinstance(value, str) else list(value or [])
        return value == ["sigmoid"]
    return value == default


def parse_losses(section: list, trainer: dict | None = None, origins: dict[str, str] | None = None) -> list[LossTerm]:
    """Validate a `loss:` section (names, parameters, data the trainer can give, TRL options that conflict) and
    return its terms. Raises RecipeError naming the entry, key or option and what would be right."""
    from postrain.preference import PREFERENCE

    origins = origins or {}
    trainer = trainer or {}
    defaults = _trl_defaults()
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
        variant = PREFERENCE.check_params(entry["name"], params, where=where)
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise RecipeError(f"{where}.weight must be a number, got {weight!r}")
        required = [p.name for p in variant.signature.parameters.values()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty]
        if missing := [p for p in required if p not in params]:
            raise RecipeError(f"{where}: preference loss {variant.name!r} needs {', '.join(map(repr, missing))} "
                              f"(its paper gives no default), e.g. {{name: {variant.name}, {missing[0]}: ...}}")
        unavailable = [k for k, req in variant.data.items() if req and k not in BATCH_DATA and k not in PAIR_COLUMNS]
        if unavailable:
            raise RecipeError(
                f"{where}: preference loss {variant.name!r} needs {', '.join(unavailable)}, which postrain's DPO "
                f"trainer cannot give it (it computes {', '.join(sorted(BATCH_DATA))} from each pair, and reads "
                f"the dataset columns {', '.join(PAIR_COLUMNS)}); choose a pairwise loss")
        if trainer.get("precompute_ref_log_probs") and set(REF_TOKEN_LOGPS) & set(variant.data):
            raise RecipeError(f"{where}: preference loss {variant.name!r} reads per-token reference log-probs, which "
                              f"trainer.precompute_ref_log_probs does not keep; set it to false")
        terms.append(LossTerm(variant.name, float(weight), params))
    return terms


def check_loss_columns(terms: list[LossTerm], columns: list[str], where: str) -> None:
    """Data-load-time check: the dataset has the per-pair columns the chosen losses read."""
    for i, term in enumerate(terms):
        needed = [k for k, req in term.variant.data.items() if req and k in PAIR_COLUMNS]
        if missing := [k for k in needed if k not in columns]:
            raise DataError(f"{where}: preference loss {term.name!r} (loss[{i}]) reads the column(s) "
                            f"{', '.join(missing)}, which the dataset lacks; columns present: {', '.join(columns)}. "
                            f"Map them with {where}.columns, e.g. columns: {{{missing[0]}: <your column>}}")


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


class PostrainDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer; with `losses` (a `loss:` section), the loss is the weighted sum of registry losses.

    Logged per step, as TRL does: loss, logps/chosen, logps/rejected, and, where a reference is used,
    rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (β·log-ratio, with the β of the first
    reference-based loss that has one); and each term's mean as `loss/<name>` (`loss/<name>_2`, ... for repeats).
    """

    def __init__(self, *args, losses: list | None = None, **kwargs):
        config = kwargs.get("args")
        trainer_options = {k: getattr(config, k) for k in TRL_LOSS_OPTIONS if hasattr(config, k)} if config else {}
        if config is not None:
            trainer_options["precompute_ref_log_probs"] = config.precompute_ref_log_probs
        self.loss_terms = parse_losses(losses, trainer_options) if losses else []
        super().__init__(*args, **kwargs)
        if not self.loss_terms:
            return
        present = list(next(iter(self.train_dataset)).keys())
        check_loss_columns(self.loss_terms, present, "train_dataset")
        columns = tuple(c for c in self._pair_columns_read() if c in present)
        if columns:
            self.data_collator = _WithPairColumns(self.data_collator, columns)
        if any(set(LOG_SUM_SQ_PROBS) & t.reads for t in self.loss_terms):
            # TRL's fused LM head computes log Σπ² only under `use_weighting`; patch the head again to add it
            # (the new head replaces the forward TRL patched; outputs as TRL asks for them, plus log_sum_sq_probs).
            from accelerate.utils import is_peft_model
            from trl.trainer.utils import add_fused_lm_head

            base = self.model.get_base_model() if is_peft_model(self.model) else self.model
            add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))

    def _pair_columns_read(self) -> list[str]:
        return [c for c in PAIR_COLUMNS if any(c in t.reads for t in getattr(self, "loss_terms", []))]

    @property
    def uses_reference(self) -> bool:
        return any(name.startswith("ref_") for t in self.loss_terms for name in t.reads)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # Keep the per-pair columns the losses read: Trainer drops every column not named here.
        extra = [c for c in self._pair_columns_read() if c not in self._signature_columns]
        self._signature_columns = list(self._signature_columns) + extra

    def _compute_loss(self, model, inputs, return_outputs):
        if not self.loss_terms:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        columns = {k: inputs[k] for k in PAIR_COLUMNS if k in inputs}
        inputs = {k: v for k, v in inputs.items() if k not in PAIR_COLUMNS}

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

        loss = 0.0
        seen: dict[str, int] = {}
        from postrain.preference import preference_loss

        for term in self.loss_terms:
            value = preference_loss(term.name, **data, **term.params).mean()
            loss = loss + term.weight * value
            seen[term.name] = seen.get(term.name, 0) + 1
            key = f"loss/{term.name}" + (f"_{seen[term.name]}" if seen[term.name] > 1 else "")
            self._metrics[mode][key].append(self.accelerator.gather(value.detach()).mean().item())
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        self._log_pair_metrics(mode, data)

        if return_outputs:  # as TRL 1.16 does: logits for `compute_metrics`, from an extra forward
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss

    def _reference_data(self, inputs: dict, seq_len: int) -> dict[str, torch.Tensor]:
        """Reference log-probs, summed and per token, from one forward (none when precomputed)."""
        if self.precompute_ref_logps:
            return {"ref_chosen_logps": inputs["ref_chosen_logps"], "ref_rejected_logps": inputs["ref_rejected_logps"]}
        kept = {}

        def forward_and_keep(**kwargs):
            kept["outputs"] = reference(**kwargs)
            return kept["outputs"]

        # TRL's compute_ref_log_probs does the reference forward (no grad, the peft adapter switched off or to
        # "ref", gradient checkpointing off) on the model it is given; keep its per-token output as well.
        reference = self.ref_model or self.model
        ref_chosen, ref_rejected = self.compute_ref_log_probs(forward_and_keep, inputs)
        ref_token_logps = kept["outputs"].log_probs[:, -seq_len:]
        ref_chosen_tokens, ref_rejected_tokens = ref_token_logps.chunk(2, dim=0)
        return {"ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected,
                "ref_chosen_token_logps": ref_chosen_tokens, "ref_rejected_token_logps": ref_rejected_tokens}

    def _log_pair_metrics(self, mode: str, data: dict) -> None:
        metrics = self._metrics[mode]
        gather = self.accelerator.gather
        chosen, rejected = data["chosen_logps"].detach(), data["rejected_logps"].detach()
        metrics["logps/chosen"].append(gather(chosen).mean().item())
        metrics["logps/rejected"].append(gather(rejected).mean().item())
        if "ref_chosen_logps" in data:
            # β of the first loss that reads the reference and has one (TRL: trainer.beta)
            beta = next((t.beta for t in self.loss_terms
                         if t.beta is not None and any(k.startswith("ref_") for k in t.reads)), self.beta)
            chosen_rewards = beta * (chosen - data["ref_chosen_logps"])
            rejected_rewards = beta * (rejected - data["ref_rejected_logps"])
            metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
            metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
            metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
            metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
