"""GRPOTrainer with reward-failure logging, registry RL parts when the recipe has an `rl:` section, and the
shared-prefix forwards and generation of `trainer.shared_prefix` (postrain.trainers.shared_prefix).

Without `rl:` (and without `trainer.shared_prefix`, whose two overrides below pass through when it is off) only
`Trainer.log` is overridden (reward-function failures are logged, never silent) and training is TRL's own. With `rl:` (postrain.rl.section) two hook points dispatch to the registries:

  advantages   `_calculate_rewards` is wrapped to keep the rewards TRL gathered from every process (whole groups);
               after TRL's `_generate_and_score_completions`, shaping entries and the advantage estimator run on
               them and `output["advantages"]` is replaced by this process' rows, sliced exactly as TRL slices
               (postrain.trainers.grpo_advantages).
  policy loss  `_compute_loss` is a compact version on TRL's `_get_per_token_logps_and_entropies`: the policy-loss
               entry's per-token loss, regularizers, then the aggregation entry, normalised for gradient
               accumulation as TRL normalises the matching loss_type (postrain.trainers.grpo_loss).

What is reproduced from TRL 1.16's grpo_trainer.py (not copied wholesale; tests/test_grpo_trainer.py pins each
method's source by hash, so a TRL change fails the test and these modules get re-read against it):
  - `_generate_and_score_completions` (l.2754-2837): the weighted reward sum (nansum over reward functions,
    `sum_then_normalize`), unscorable rows (every reward None -> NaN) get advantage 0, the process slice
    `process_index * n_local ... (process_index + 1) * n_local`, the completions table's advantages column.
  - `_prepare_inputs` (l.1522-1551): shuffles the generation batch, then splits it into steps_per_generation
    micro-batches (why group losses carry a row index and need steps_per_generation == 1).
  - `_compute_loss` (l.3020-3064, 3153-3184, 3248-3270): how input ids, attention and loss masks are assembled (tool_mask),
    `old_per_token_logps` defaulting to the detached current log-probs, the accumulation normalisers of
    loss_type grpo / dr_grpo (/ current_gradient_accumulation_steps) and dapo (num_items_in_batch / processes
    * accumulation steps / steps_per_generation), the MoE aux loss term, and the `kl` / `entropy` metrics.
  - the vLLM importance-sampling correction (`_generate_and_score_completions` l.2640-2710 computes the ratio
    pi_old / pi_vllm, `_compute_loss` l.3146 applies it): the ratio TRL puts in the batch multiplies the policy
    entry's per-token loss after the entropy mask and before the additive regularizers, whatever the entry and
    the aggregation; refill pools and group reordering carry it with the other per-row columns.
  - `get_high_entropy_mask` (l.1380-1415): the entropy quantile over every process' valid tokens.
  - `_save_checkpoint` / `_load_optimizer_and_scheduler`: TRL's own pattern for state beside the checkpoint (its
    adaptive-entropy controller writes entropy_ctrl_state.json the same way); postrain writes rl_state.json.
  - `get_train_dataloader` / `_get_train_sampler` (l.1258-1316): the refill stream is the same RepeatSampler over
    the training set, with another seed and each generation batch once.
TRL options this path does not reproduce are refused at recipe load time (postrain.rl.section.TRL_CONFLICTS).

Samplers (`rl.samplers`, stages in postrain.rl.section): every sampler becomes a per-row weight w_i >= 0 over the
gathered generation batch (0: dropped, an integer: PF-PPO's resampling multiplicity), computed once per generation
from gathered rewards, so every process takes the same decision. The loss is the aggregation over the rows with
w_i > 0, as if the batch held each such row w_i times and no other:
  token_mean                 sum_i w_i sum_t l_it / sum_i w_i |o_i|     (TRL's num_items_in_batch, weighted)
  seq_mean_token_mean        sum_i w_i mean_t l_it / sum_i w_i
  seq_mean_token_sum         sum_i w_i sum_t l_it / sum_i w_i
  seq_mean_token_sum_norm    sum_i w_i sum_t l_it / (sum_i w_i * max_completion_length)
  delta_l                    sum_i w_i L_i^-a sum_t l_it / (sum_i w_i L_i^-a * max_completion_length)
with the sums over the whole generation batch (all processes; delta_l: this micro-batch, times the accumulation
steps, as without samplers), so a dropped group contributes nothing and is not counted: the loss of the batch as if
the dropped rows had never been generated, which is what verl trains on after filtering (and TRL 1.7's GFPO after
its filter). With every weight 1 these are TRL's normalisers. Samplers act on training batches only.

DAPO's refill (keep generating until enough groups are kept) is done in `_generate_and_score_completions`: each
round is TRL's own method on the next batch of a second pass over the training set; the rounds' rows are gathered
from every process, the batch is assembled from whole kept groups and each process takes its slice, as TRL slices
(postrain.trainers.grpo_refill). Per-prompt history (dcpo_smooth) lives in `self.rl_state` (postrain.trainers.grpo_state.PromptState), saved
into every checkpoint as rl_state.json.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import datasets
import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import RepeatSampler

from postrain.errors import RecipeError
from postrain.rl.section import Part, RLParts, parse_rl_section
from postrain.trainers import grpo_advantages, grpo_greso, grpo_loss, grpo_refill, grpo_replay, grpo_state, shared_prefix


@dataclasses.dataclass
class PostrainGRPOConfig(GRPOConfig):
    """TRL's GRPOConfig and postrain's switches for computing the same training faster.

    `shared_prefix` is a field of the trainer config (a recipe's `trainer.shared_prefix`), not a section of its
    own, because it is a setting of how the trainer computes, beside TRL's own `cast_lm_head_to_fp32` or
    `use_liger_kernel`: it reaches the trainer as `args.shared_prefix`, is saved with the training arguments of
    every checkpoint, and is validated, shown by `postrain config` and checked by --dry-run exactly as TRL's fields
    are (postrain.trainers.TRAINERS names this class for `grpo`)."""

    shared_prefix: bool = dataclasses.field(default=False, metadata={"help": (
        "Encode each group's prompt once: in the policy, old-policy and reference forwards (one packed row per "
        "group with a block attention mask, Prefix Grouper) and in HF generation (one prefill per distinct "
        "prompt). Log-probs, entropies, gradients and the sampling distribution are unchanged. Qwen2 / Llama "
        "models with sdpa or eager attention (postrain.trainers.shared_prefix).")})


class PostrainGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer; also logs `rewards/<name>/errors`, the completions each reward failed to score since
    the last log (the reward error policy `score` scores them as failed instead of stopping the run), with
    `rewards/<name>/timeouts`, `rewards/<name>/non_finite` and a reward's own counts, and with
    `rl=` (a recipe's `rl:` section: its parsed parts, as postrain.jobs.grpo passes them, or the mapping for direct
    Python use, parsed here by the same function) trains with the registry parts it names.

    The `rl:` path's steps live in modules by concern, each a set of functions of this trainer that use only its
    public interface (the `rl_*` attributes and the methods under "interface" below): grpo_greso and grpo_refill
    (which prompts and groups make the batch), grpo_advantages (shaping, samplers, the advantage), grpo_loss and
    grpo_replay (the loss terms), grpo_state (what is kept between steps and saved beside checkpoints)."""

    def __init__(self, *args, rl: RLParts | dict[str, Any] | None = None, **kwargs):
        self.rl_parts = rl if rl is None or isinstance(rl, RLParts) else parse_rl_section(rl)
        self.rl_state = grpo_state.PromptState()
        self.rl_rewards_per_func: torch.Tensor | None = None  # (N, reward functions), gathered: whole groups
        self.rl_recovered: dict[str, Any] | None = None  # recent_sample_recovery: kept groups beyond the last batch
        self.rl_refill = grpo_refill.RefillStream(self)  # the second pass over the training set for refills
        self.rl_replay_part = grpo_replay.replay_part(self.rl_parts)
        self.rl_replay_buffer = grpo_replay.new_buffer(self.rl_replay_part)  # RePO: each prompt's past samples
        super().__init__(*args, **kwargs)
        self.shared_prefix = bool(getattr(self.args, "shared_prefix", False))
        if self.shared_prefix:
            for role, model in (("model", self.model), ("reference model", self.ref_model)):
                reason = None if model is None else shared_prefix.unsupported_reason(model.config)
                if reason is not None:  # a hub model whose config was not on disk when the recipe loaded
                    raise RecipeError(f"trainer.shared_prefix cannot run on this {role}: {reason}. Set "
                                      f"trainer.shared_prefix: false")
        refill = self.refill_part()
        if refill is not None and isinstance(self.train_dataset, (torch.utils.data.IterableDataset,
                                                                  datasets.IterableDataset)):
            raise ValueError(f"sampler {refill.name!r} refills the batch from a second pass over the training set, "
                             f"which needs a map-style dataset; {type(self.train_dataset).__name__} is streamed")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # rewards/<name>/<count>: errors, timeouts, non_finite and a reward's own counts (code_exec's outcomes),
        # since the last log. Each process scores its own completions: the count is the sum over processes (every
        # process has the same rewards, so the same names in the same order).
        counted = [(fn, fn.pop_counts()) for fn in self.reward_funcs if hasattr(fn, "pop_counts")]
        names = [(fn, counts, name) for fn, counts in counted for name in fn.count_names]
        if names:
            local = torch.tensor([float(counts[name]) for _, counts, name in names], device=self.accelerator.device)
            for (fn, _, name), total in zip(names, self.accelerator.reduce(local, reduction="sum").tolist()):
                logs[f"rewards/{fn.name}/{name}"] = total
        super().log(logs, start_time)

    # --- shared prefix: one prompt encoding per group --------------------------------------------------------

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **model_inputs):
        """TRL's per-token log-probs and entropies; with shared_prefix, through packed rows (one per group of rows
        sharing a prompt; postrain.trainers.shared_prefix). Every forward of the policy, the old policy and the
        reference, on TRL's loss path and the rl: path, comes through here."""
        if (not self.shared_prefix or compute_aux_loss or any(v is not None for v in model_inputs.values())
                or not shared_prefix.shareable_layout(attention_mask, logits_to_keep)):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **model_inputs)
        chunks = shared_prefix.pack(input_ids, attention_mask, logits_to_keep, batch_size)
        unwrapped = self.accelerator.unwrap_model(model)
        logps, entropies = shared_prefix.packed_logps_and_entropies(
            model, chunks, input_ids.size(0), logits_to_keep,
            attn_implementation=unwrapped.config._attn_implementation,
            dtype=unwrapped.get_input_embeddings().weight.dtype, compute_entropy=compute_entropy,
            autocast=self.accelerator.autocast)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["shared_prefix/token_fraction"].append(
            sum(c.tokens for c in chunks) / float(input_ids.numel()))
        return logps, entropies, None

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """TRL's generation; with shared_prefix and transformers' generate (not vLLM, which caches prefixes
        itself, nor continuous batching), each distinct prompt is prefilled once."""
        if (not self.shared_prefix or self.use_vllm or self.use_transformers_continuous_batching or images
                or multimodal_fields or has_tool_images):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        with shared_prefix.shared_prefill(self.accelerator.unwrap_model(self.model_wrapped)):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)

    # --- rl: the algorithm, at TRL's hook points ---------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.rl_parts is not None:
            self.rl_rewards_per_func = rewards_per_func  # (N, reward functions), gathered: whole groups
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        if self.rl_parts is None:
            return super()._generate_and_score_completions(inputs)
        training = self.model.training
        greso = self.rl_parts.sampler_at("prompt") if training else None
        if greso is not None:  # GRESO: skip prompts before their rollout, others in their place
            inputs = grpo_greso.select_inputs(self, greso, inputs)
        keys = grpo_state.prompt_keys(self.rl_parts, inputs)  # where a part keeps per-prompt state
        output = super()._generate_and_score_completions(inputs)
        if greso is not None:
            grpo_greso.observe(self, greso, inputs, self.rl_rewards_per_func)
        table_index = None
        refill = self.refill_part() if training else None
        if refill is not None:  # DAPO: more rounds until enough groups are kept, pooled over processes
            output, keys, table_index = grpo_refill.refill(self, refill, output, keys)
        output = grpo_advantages.replace_advantages(self, output, keys, table_index)
        if self.rl_replay_part is not None and training:  # RePO: each prompt's replayed samples ride on its rows
            output = grpo_replay.attach_replays(self, inputs, output)
        return output

    def _compute_loss(self, model, inputs):
        if self.rl_parts is None:
            return super()._compute_loss(model, inputs)
        loss = grpo_loss.rl_loss(self, model, inputs)
        if "rl_replay_valid" in inputs:  # RePO: + c * L_off over the replayed samples of this micro-batch
            mode = "train" if self.model.training else "eval"
            accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
            loss = loss + grpo_replay.replay_loss(self, model, inputs, mode, accumulation)
        return loss

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.rl_parts is None or not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        grpo_state.save(folder, self.rl_state, self.rl_recovered, self.rl_replay_buffer)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.rl_parts is None or checkpoint is None:
            return
        self.rl_recovered = grpo_state.load(checkpoint, self.rl_state, self.rl_replay_buffer, self.accelerator.device)
        self.rl_refill.restart()  # continue the refill stream where the checkpoint left it

    # --- interface: what the rl: modules use of the trainer ----------------------------------------------------

    def refill_part(self) -> Part | None:
        """The group sampler that refills the batch (`refill=True`), if the recipe has one."""
        part = self.rl_parts.sampler_at("group") if self.rl_parts is not None else None
        return part if part is not None and part.refills else None

    def part_params(self, part: Part) -> dict[str, Any]:
        """The part's hyperparameters; a `max_completion_length` it leaves unset is TRL's configured one."""
        params = dict(part.params)
        if "max_completion_length" in part.variant.params and "max_completion_length" not in params:
            params["max_completion_length"] = self.max_completion_length
        return params

    def metrics(self, mode: str):
        """TRL's metrics of `mode` ("train" / "eval"): name -> values since the last log, averaged when logged."""
        return self._metrics[mode]

    def logged_column(self, name: str):
        """A column of TRL's completions table (`advantages`, ...), the rows logged since the last log."""
        return self._logs[name]

    @property
    def pad_token_id(self) -> int:
        return self._tokenizer.pad_token_id

    def token_logps(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        """Per-token log-probs, entropies and aux loss: TRL's forward, or the shared-prefix one (see above)."""
        return self._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs)

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(local rows, T) -> (all rows, longest T), zero-padded: per-token tensors of the whole batch."""
        return self.accelerator.gather(self.accelerator.pad_across_processes(x, dim=1, pad_index=0))

    def generate_and_score(self, inputs):
        """TRL's own generation and scoring of a batch (a refill round), without the rl: steps."""
        return super()._generate_and_score_completions(inputs)

    def refill_dataloader(self):
        """Generation batches over the training set for refills: TRL's RepeatSampler (as get_train_dataloader),
        another seed, each batch once (the main loop's repeat_count is for reusing a batch, which refill does
        not)."""

        def sampler(dataset):
            return RepeatSampler(data_source=dataset, mini_repeat_count=self.num_generations,
                                 batch_size=self.args.generation_batch_size // self.num_generations, repeat_count=1,
                                 shuffle=self.shuffle_dataset, seed=self.args.seed + grpo_refill.REFILL_SEED_OFFSET)

        return self._get_dataloader(dataset=self.train_dataset, description="Refill",
                                    batch_size=self._train_batch_size * self.args.steps_per_generation,
                                    sampler_fn=sampler, is_training=True)
