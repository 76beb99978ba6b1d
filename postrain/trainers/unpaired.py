"""Unpaired labelled completions in `postrain dpo`: KTO, APO-zero (unpaired), BCO, Implicit PRM's CE loss.

A row is `{prompt, completion, label}`: label true (1) for a desirable completion, false (0) for an undesirable
one (numbers in [0, 1] for losses with soft labels, `implicit_prm_ce`). A pair dataset becomes such rows with
`data.train.transform: unpair` (each pair: chosen desirable, rejected undesirable). The registry data:
`logps`, `ref_logps` (summed completion log-probs, (B,)), `labels`, and

- `kl` (KTO's reference point z0), estimated as in the KTO paper (Ethayarajh et al. 2024, arXiv 2402.01306,
  Sec. 4.1) and TRL 1.16's KTOTrainer: each prompt x_i of the batch is paired with another row's completion,
  y_{i−1} (cyclically, TRL's rotation), and z0 = mean_i [log π(y_{i−1}|x_i) − log π_ref(y_{i−1}|x_i)] over the
  batch (averaged over processes), without gradient; the entry clamps it at 0 (max(0, ·), as the paper and TRL).
  TRL fixes the mismatched completion when it prepares the dataset and so must sample sequentially; here the
  collator rotates the batch the loader drew, so shuffling stays on and the mismatched completions are exactly
  the batch's own, as the paper asks.
- `delta` (BCO's reward shift): the running mean of the implicit rewards β·h over every completion trained on
  so far (TRL's BCOTrainer: its `RunningMoments`, updated with each training batch before the loss), one per
  term reading it, β that term's. It is trainer state: `RewardShift`, a callback whose state transformers saves
  in every checkpoint's trainer_state.json and which restores it when training resumes from one.

Logged besides `loss` and `loss/<name>`: logps/chosen and logps/rejected (desirable / undesirable means),
rewards/chosen, rewards/rejected and rewards/margins (β·h, the β of the first loss reading the reference), `kl`
(clamped at 0, as TRL logs it) and `reward_shift/<name>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

from postrain.preference.section import UNPAIRED
from postrain.trainers.completions import CompletionsDPOTrainer, tokenize_completions


def tokenize_unpaired_row(example: dict, processing_class, eos_token: str) -> dict:
    prompt_ids, (completion_ids,) = tokenize_completions(example, processing_class, [example["completion"]], eos_token)
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids}


@dataclass
class WithMismatchedCompletions:
    """TRL's unpaired collator, given for each row i the completion of row i−1 of the same batch (cyclically) as
    `KL_completion_ids`, the mismatched pairs of KTO's KL estimate (TRL 1.16's rotation)."""

    collator: Callable

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        previous = examples[-1:] + examples[:-1]
        return self.collator([{**example, "KL_completion_ids": other["completion_ids"]}
                              for example, other in zip(examples, previous)])


class RewardShift(TrainerCallback, ExportableState):
    """BCO's δ per loss term: the running mean of β·h over every completion trained on, and how many.

    As an ExportableState callback its `state()` is written into each checkpoint's trainer_state.json; when
    training starts, the state the trainer holds (restored from the checkpoint on a resume) is read back."""

    def __init__(self):
        self.means: dict[str, list[float]] = {}  # term key -> [mean, count]

    def update(self, key: str, total: float, count: float) -> None:
        mean, seen = self.means.get(key, [0.0, 0.0])
        seen_now = seen + count
        self.means[key] = [mean + (total - count * mean) / seen_now, seen_now] if seen_now else [mean, seen]

    def mean(self, key: str) -> float:
        return self.means.get(key, [0.0, 0.0])[0]

    def state(self) -> dict:
        return {"args": {}, "attributes": {"means": {k: list(v) for k, v in self.means.items()}}}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict):
            self.means = {k: list(v) for k, v in saved["attributes"]["means"].items()}


class UnpairedDPOTrainer(CompletionsDPOTrainer):
    """PostrainDPOTrainer for unpaired labelled completions: `losses` are unpaired registry losses (kto,
    apo_zero_unpaired, bco, implicit_prm_ce). See the module docstring for the data, KTO's KL and BCO's δ."""

    shape = UNPAIRED
    signature_columns = ("prompt_ids", "completion_ids", "label")
    tokenize_row = staticmethod(tokenize_unpaired_row)

    def _setup_batches(self) -> None:
        collator = DataCollatorForUnpairedPreference(self._tokenizer.pad_token_id, self.args.max_length,
                                                     self.args.pad_to_multiple_of)
        self.data_collator = WithMismatchedCompletions(collator) if self._reads("kl") else collator
        if self._reads("delta"):
            self.add_callback(RewardShift())

    def _reads(self, name: str) -> bool:
        return any(name in term.reads for term in self.loss_terms)

    @property
    def reward_shift(self) -> RewardShift:
        # Looked up each time: with `restore_callback_states_from_checkpoint`, transformers replaces the instance.
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, RewardShift))

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        outputs, logps, model_kwargs = self._sequence_logps(model, inputs)
        data = {"logps": logps, "labels": inputs["label"].float()}
        if self.uses_reference:
            data["ref_logps"] = self._reference_logps(inputs)
        if self._reads("kl"):
            data["kl"] = self._kl_estimate(model, inputs)
        loss = self._registry_loss(mode, data, outputs)
        self._log_unpaired_metrics(mode, data)
        return self._with_outputs(loss, model, model_kwargs, return_outputs)

    def _kl_estimate(self, model, inputs) -> torch.Tensor:
        """KTO's z0 before clamping: the batch mean of log π − log π_ref on the mismatched sequences, averaged
        over processes, without gradient."""
        with torch.no_grad():
            _, policy_logps, _ = self._sequence_logps(model, inputs, prefix="KL_")
        log_ratio = (policy_logps - self._reference_logps(inputs, prefix="KL_")).mean()
        return self.accelerator.gather(log_ratio.detach().reshape(1)).mean()

    def _term_data(self, mode: str, key: str, term, data: dict) -> dict:
        if "delta" not in term.reads:
            return data
        shift = self.reward_shift
        if mode == "train":  # as TRL's BCO: the batch's rewards join the running mean before its loss
            rewards = term.beta * (data["logps"] - data["ref_logps"]).detach()
            gather = self.accelerator.gather
            shift.update(key, gather(rewards.sum().reshape(1)).sum().item(),
                         gather(torch.tensor([rewards.numel()], device=rewards.device)).sum().item())
        self._metrics[mode][f"reward_shift/{key}"].append(shift.mean(key))
        return {**data, "delta": torch.tensor(shift.mean(key), device=data["logps"].device)}

    def _log_unpaired_metrics(self, mode: str, data: dict) -> None:
        metrics = self._metrics[mode]
        desirable = data["labels"] > 0.5
        logps = data["logps"].detach()
        rewards = self._reward_beta() * (logps - data["ref_logps"]) if "ref_logps" in data else None
        means = {}
        for side, rows in (("chosen", desirable), ("rejected", ~desirable)):
            for name, values in (("logps", logps), ("rewards", rewards)):
                if values is not None and (mean := self._gathered_mean(values[rows].sum(), rows.sum())) is not None:
                    metrics[f"{name}/{side}"].append(mean)
                    means[f"{name}/{side}"] = mean
        if "rewards/chosen" in means and "rewards/rejected" in means:
            metrics["rewards/margins"].append(means["rewards/chosen"] - means["rewards/rejected"])
        if "kl" in data:
            metrics["kl"].append(data["kl"].clamp(min=0).item())
