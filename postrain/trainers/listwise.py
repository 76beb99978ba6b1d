"""K-response lists in `postrain dpo`: list-wise registry losses (LiPO-λ, DPO's Plackett-Luce form, EXO-K, SELM).

A row is `{prompt, completions: [K texts], scores: [K numbers]}` (higher is better) or, instead of `scores`,
`ranks: [K integers]` (1 = best), which become scores ψ = K − rank (`postrain.trainers.dpo.list_scores`). Rows may
hold different numbers of completions (at least 2). A batch of B rows is one policy forward over all its
completions (and one reference forward where a loss reads the reference): the summed log-probs come back as
`list_logps` / `list_ref_logps` of shape (B, K), K the longest list of the batch, with `list_mask` 1 where a slot
holds a completion and `list_scores` (B, K); padded slots hold 0 and are masked. `per_device_train_batch_size`
counts rows (prompts): a step of B rows forwards up to B·K sequences.

Logged besides `loss` and `loss/<name>`: `logps/mean` (mean summed log-prob of the completions) and, where the
reference is used, `rewards/accuracies`: the fraction of the batch's scored pairs (ψi > ψj, same prompt) whose
log-ratios are in the same order (h_i > h_j), which for K = 2 is DPO's reward accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

from postrain.preference.section import LISTS
from postrain.trainers.completions import CompletionsDPOTrainer, tokenize_completions
from postrain.trainers.dpo import list_scores
from postrain.trainers.shared_prefix_dpo import list_leaders


def tokenize_list_row(example: dict, processing_class, eos_token: str) -> dict:
    prompt_ids, completions_ids = tokenize_completions(example, processing_class, example["completions"], eos_token)
    return {"prompt_ids": prompt_ids, "completions_ids": completions_ids, "list_scores": list_scores(example)}


@dataclass
class DataCollatorForLists:
    """Pads every completion of every row as its own prompt+completion sequence (N = Σ K_b of them, row by row)
    and adds `list_scores` and `list_mask` (B, K)."""

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        sizes = torch.tensor([len(example["completions_ids"]) for example in examples])
        # TRL's unpaired collator pads prompt+completion sequences and their completion masks; it also stacks each
        # example's `label` into a tensor, and that slot carries each completion's score here.
        flat = [{"prompt_ids": example["prompt_ids"], "completion_ids": ids, "label": score}
                for example in examples for ids, score in zip(example["completions_ids"], example["list_scores"])]
        batch = DataCollatorForUnpairedPreference(self.pad_token_id, self.max_length, self.pad_to_multiple_of)(flat)
        list_mask = torch.arange(int(sizes.max()))[None, :] < sizes[:, None]
        batch["list_scores"] = as_lists(batch.pop("label").float(), list_mask)
        batch["list_mask"] = list_mask.long()
        return batch


def as_lists(flat: torch.Tensor, list_mask: torch.Tensor) -> torch.Tensor:
    """Per-completion values (N,), row by row, as (B, K) with 0 in the masked slots (differentiable)."""
    return torch.zeros(list_mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(
        list_mask.to(flat.device).bool(), flat)


class ListwiseDPOTrainer(CompletionsDPOTrainer):
    """PostrainDPOTrainer for K-response lists: `losses` are list-wise registry losses (lipo_lambda,
    plackett_luce_dpo, exo_k). See the module docstring for the data and the batch."""

    shape = LISTS
    signature_columns = ("prompt_ids", "completions_ids", "list_scores")
    tokenize_row = staticmethod(tokenize_list_row)

    def _setup_batches(self) -> None:
        # TRL has set the tokenizer's pad token (args.pad_token, else the tokenizer's, else EOS) by now.
        self.data_collator = DataCollatorForLists(self._tokenizer.pad_token_id, self.args.max_length,
                                                  self.args.pad_to_multiple_of)

    def _prefix_leaders(self, inputs: dict) -> torch.Tensor:
        """A list's completions are contiguous rows sharing its prompt (trainer.shared_prefix)."""

        return list_leaders(inputs["list_mask"])

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        inputs = self._with_shared_prefix(model, inputs)
        list_mask = inputs["list_mask"]
        outputs, logps, model_kwargs = self._sequence_logps(model, inputs)
        data = {"list_logps": as_lists(logps, list_mask), "list_scores": inputs["list_scores"], "list_mask": list_mask}
        if self.uses_reference:
            data["list_ref_logps"] = as_lists(self._reference_logps(inputs), list_mask)
        loss = self._registry_loss(mode, data, outputs)
        self._log_list_metrics(mode, data)
        return self._with_outputs(loss, model, model_kwargs, return_outputs)

    def _log_list_metrics(self, mode: str, data: dict) -> None:
        metrics = self._metrics[mode]
        valid = data["list_mask"].bool()
        logps = data["list_logps"].detach()
        metrics["logps/mean"].append(self._gathered_mean(logps[valid].sum(), valid.sum()))
        if "list_ref_logps" in data:
            h = logps - data["list_ref_logps"]
            scores = data["list_scores"]
            pairs = (scores[:, :, None] > scores[:, None, :]) & valid[:, :, None] & valid[:, None, :]
            ordered = pairs & (h[:, :, None] > h[:, None, :])
            accuracy = self._gathered_mean(ordered.sum(), pairs.sum())
            if accuracy is not None:
                metrics["rewards/accuracies"].append(accuracy)
