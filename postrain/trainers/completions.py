"""What the list-wise and unpaired DPO trainers share: rows holding a prompt and one or more completions, each
completion scored as its own sequence.

Tokenization follows TRL 1.16's `DPOTrainer._prepare_dataset` (its `tokenize_fn` for chosen and rejected), with
TRL's own helpers: non-conversational completions get the EOS token appended, conversational rows go through the
chat template with the generation prompt, and a row's completions start where the tokenized prompt and the
tokenized prompt+completion first differ (`common_prefix_length`, the minimum over the row's completions, as TRL
takes it over chosen and rejected), so every completion of a row shares one prompt. Rows whose prompt alone fills
`max_length` are dropped, as TRL does. Batches are padded by TRL's `DataCollatorForUnpairedPreference` (one
sequence per completion, `keep_start` truncation at `max_length`), and each batch's sequences go through one
policy forward (`PostrainDPOTrainer._policy_forward`, copied from TRL) and, where a loss reads the reference,
one reference forward (TRL's `compute_ref_log_probs`).
"""

from __future__ import annotations

import json

import datasets
import torch
from trl.data_utils import _tokenize, common_prefix_length, is_conversational
from trl.trainer.utils import global_then_local_main_first

from postrain.trainers.dpo import PostrainDPOTrainer, check_loss_data
from postrain.trainers.shared_prefix_dpo import ROWS_KEY

SEQUENCE_KEYS = ("input_ids", "attention_mask", "completion_mask")


def tokenize_completions(example: dict, processing_class, completions: list, eos_token: str) -> tuple[list, list]:
    """(prompt_ids, [completion_ids per completion]) of a row, tokenized as TRL 1.16's DPOTrainer tokenizes
    chosen and rejected."""
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    template_kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
    prompt = example["prompt"]
    if is_conversational({"prompt": prompt}):
        prompt_ids = _tokenize(processing_class, prompt, add_generation_prompt=True, **template_kwargs)["input_ids"]
        full_ids = [_tokenize(processing_class, prompt + completion, **template_kwargs)["input_ids"]
                    for completion in completions]
    else:
        completions = [c if c.endswith(eos_token) else c + eos_token for c in completions]
        prompt_ids = _tokenize(processing_class, prompt)["input_ids"]
        full_ids = [_tokenize(processing_class, prompt + completion)["input_ids"] for completion in completions]
    prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full_ids)
    return prompt_ids[:prompt_len], [ids[prompt_len:] for ids in full_ids]


class CompletionsDPOTrainer(PostrainDPOTrainer):
    """Base of the list-wise and unpaired trainers: a subclass names its tokenized columns (`signature_columns`),
    its row tokenizer (`tokenize_row(example, processing_class, eos_token) -> dict`, a module-level function so
    that `datasets` can fingerprint it) and its collator (`_setup_batches`), and computes its loss from
    `_sequence_logps` / `_reference_logps`."""

    signature_columns: tuple[str, ...] = ()
    tokenize_row = None

    def _check_raw_data(self, train_dataset, eval_dataset) -> None:
        # Row contents (K scores per K completions, labels in [0, 1]) before tokenizing; postrain dpo has already
        # checked them when the data loaded, this covers the Python API.

        for dataset, where in ((train_dataset, "train_dataset"), (eval_dataset, "eval_dataset")):
            if isinstance(dataset, datasets.Dataset) and "prompt_ids" not in dataset.column_names:
                check_loss_data(self.loss_terms, dataset, where)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in (dataset.column_names or []):  # prepared already (evaluate() prepares again)
            return dataset
        map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, datasets.Dataset) else {}
        with global_then_local_main_first():
            fn_kwargs = {"processing_class": processing_class, "eos_token": self._tokenizer.eos_token}
            dataset = dataset.map(type(self).tokenize_row, fn_kwargs=fn_kwargs, **map_kwargs)
            if args.max_length is not None:  # as TRL: a prompt filling max_length leaves no completion token
                dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length, **map_kwargs)
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(self.signature_columns)

    @staticmethod
    def _sequence_inputs(batch: dict, prefix: str) -> dict:
        """The model inputs of the batch's sequences `<prefix>input_ids`, with the shared-prefix rows where the
        batch carries them (trainer.shared_prefix: the main sequences only)."""
        inputs = {key: batch[prefix + key] for key in SEQUENCE_KEYS}
        if not prefix and ROWS_KEY in batch:
            inputs[ROWS_KEY] = batch[ROWS_KEY]
        return inputs

    def _sequence_logps(self, model, batch: dict, prefix: str = ""):
        """The policy forward on the batch's sequences `<prefix>input_ids` (one per completion): its outputs,
        summed completion log-probs (N,) and the model's keyword arguments."""
        inputs = self._sequence_inputs(batch, prefix)
        outputs, per_token_logps, _, model_kwargs = self._policy_forward(model, inputs)
        return outputs, per_token_logps.sum(dim=1), model_kwargs

    def _reference_logps(self, batch: dict, prefix: str = "") -> torch.Tensor:
        """Summed reference log-probs (N,) of the batch's sequences `<prefix>input_ids`."""
        inputs = self._sequence_inputs(batch, prefix)
        return self._reference_token_logps(inputs, inputs["completion_mask"].size(1) - 1).sum(dim=1)

    def _gathered_mean(self, total: torch.Tensor, count: torch.Tensor) -> float | None:
        """Σ total / Σ count over every process (None when the count is 0)."""
        gather = self.accelerator.gather
        total, count = gather(total.detach().float().reshape(1)).sum(), gather(count.float().reshape(1)).sum()
        return (total / count).item() if count > 0 else None
