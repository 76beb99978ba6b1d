"""GRPOTrainer with reward-failure logging, registry RL parts when the recipe has an `rl:` section, and the
shared-prefix forwards and generation of `trainer.shared_prefix` (postrain.trainers.shared_prefix).

Without `rl:` (and without `trainer.shared_prefix`, whose two overrides below pass through when it is off) only
`Trainer.log` is overridden (reward-function failures are logged, never silent) and training is TRL's own. With `rl:` (postrain.rl.section) two hook points dispatch to the registries:

  advantages   `_calculate_rewards` is wrapped to keep the rewards TRL gathered from every process (whole groups);
               after TRL's `_generate_and_score_completions`, shaping entries and the advantage estimator run on
               them and `output["advantages"]` is replaced by this process' rows, sliced exactly as TRL slices.
  policy loss  `_compute_loss` is a compact version on TRL's `_get_per_token_logps_and_entropies`: the policy-loss
               entry's per-token loss, regularizers, then the aggregation entry, normalised for gradient
               accumulation as TRL normalises the matching loss_type.

What is reproduced from TRL 1.16's grpo_trainer.py (not copied wholesale; tests/test_grpo_trainer.py pins each
method's source by hash, so a TRL change fails the test and this file gets re-read against it):
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
from every process, the batch is assembled from whole kept groups and each process takes its slice, as TRL slices.
Per-prompt history (dcpo_smooth) lives in `self.rl_state` (postrain.trainers.grpo_sampling.PromptState), saved
into every checkpoint as rl_state.json.
"""

from __future__ import annotations

import json
import os
from typing import Any

import dataclasses

import datasets
import torch
from trl import GRPOConfig, GRPOTrainer

from postrain.errors import RecipeError
from postrain.rl.losses import disco_kl_stats
from postrain.rl.registry import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES, REGULARIZERS, SAMPLERS, SHAPING
from postrain.rl.regularizers import kl_penalty
from postrain.rl.section import Part, RLParts, parse_rl_section
from postrain.trainers import grpo_greso, grpo_replay, shared_prefix
from postrain.trainers.grpo_sampling import LEFT_PADDED, PromptState, cat_batches, group_rows, prompt_key, take_rows

# Beside each checkpoint: the per-prompt state and counters (JSON), and the recovered groups of
# recent_sample_recovery (tensors).
RL_STATE_FILE = "rl_state.json"
RL_BUFFER_FILE = "rl_buffer.pt"
# The refill stream's sampler seed is the run seed plus this, so it does not replay the main loop's prompt order.
REFILL_SEED_OFFSET = 1

# Model inputs besides ids and attention that TRL's batches may carry (vision models); passed through as TRL does.
MODEL_INPUT_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


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
    Python use, parsed here by the same function) trains with the registry parts it names."""

    def __init__(self, *args, rl: RLParts | dict[str, Any] | None = None, **kwargs):
        self.rl_parts = rl if rl is None or isinstance(rl, RLParts) else parse_rl_section(rl)
        self.rl_state = PromptState()
        self._rl_rewards_per_func: torch.Tensor | None = None
        self._rl_samplers: dict[str, Part] = {p.stage: p for p in self.rl_parts.samplers if p.stage != "replay"} \
            if self.rl_parts is not None else {}  # repo_replay weighs no row: postrain.trainers.grpo_replay
        self._rl_replay_part = grpo_replay.replay_part(self.rl_parts)
        self.rl_replay_buffer = grpo_replay.new_buffer(self._rl_replay_part)  # RePO: each prompt's past samples
        self._rl_refill_iter = None
        self._rl_buffer: dict[str, Any] | None = None  # recent_sample_recovery: kept groups beyond the last batch
        super().__init__(*args, **kwargs)
        self.shared_prefix = bool(getattr(self.args, "shared_prefix", False))
        if self.shared_prefix:
            for role, model in (("model", self.model), ("reference model", self.ref_model)):
                reason = None if model is None else shared_prefix.unsupported_reason(model.config)
                if reason is not None:  # a hub model whose config was not on disk when the recipe loaded
                    raise RecipeError(f"trainer.shared_prefix cannot run on this {role}: {reason}. Set "
                                      f"trainer.shared_prefix: false")
        refill = self._refill_part()
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

    # --- advantages -------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.rl_parts is not None:
            self._rl_rewards_per_func = rewards_per_func  # (N, reward functions), gathered: whole groups
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        if self.rl_parts is None:
            return super()._generate_and_score_completions(inputs)
        greso = grpo_greso.greso_part(self) if self.model.training else None
        if greso is not None:  # GRESO: skip prompts before their rollout, others in their place
            inputs = grpo_greso.select_inputs(self, greso, inputs)
        keys = self._prompt_keys(inputs)
        output = super()._generate_and_score_completions(inputs)
        if greso is not None:
            grpo_greso.observe(self, greso, inputs, self._rl_rewards_per_func)
        table_index = None
        if self.model.training and self._refill_part() is not None:
            output, keys, table_index = self._refill(output, keys)
        output = self._replace_advantages(output, keys, table_index)
        if self._rl_replay_part is not None and self.model.training:
            output = grpo_replay.attach_replays(self, inputs, output)
        return output

    # --- samplers: refill, recovery, per-prompt state ----------------------------------------------------------

    def _refill_part(self) -> Part | None:
        part = self._rl_samplers.get("group")
        return part if part is not None and part.refills else None

    def _prompt_keys(self, inputs) -> list[str] | None:
        """Every process' prompt ids, in gathered row order, where a part keeps per-prompt state."""
        stateful_shaping = any(p.prompt_state for p in self.rl_parts.shaping)
        if not self.rl_parts.advantage.prompt_state and not stateful_shaping:
            return None
        from accelerate.utils import gather_object

        return gather_object([prompt_key(x.get("prompt")) for x in inputs])

    def _raw_rewards(self, per_func: torch.Tensor, group: int) -> torch.Tensor:
        """TRL's reward: weighted nansum over reward functions; unscorable rows at their group's mean."""
        unscorable = torch.isnan(per_func).all(dim=1)
        weighted = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        return _fill_unscorable(weighted, unscorable, group)

    def _group_keep(self, part: Part, rewards: torch.Tensor, group: int, batch_groups: int) -> torch.Tensor:
        """The group sampler's keep mask over the groups of `rewards` (recent_sample_recovery: the groups it puts
        in the batch or the buffer)."""
        params = dict(part.params)
        if part.recovers:
            chosen = SAMPLERS.call(part.name, {"rewards": rewards, "group_size": group},
                                   {**params, "batch_groups": batch_groups})
            keep = torch.zeros(rewards.numel() // group, dtype=torch.bool, device=rewards.device)
            keep[torch.cat([chosen["batch"], chosen["buffer"]]).to(rewards.device)] = True
            return keep
        return SAMPLERS.call(part.name, {"rewards": rewards, "group_size": group}, params).bool()

    def _pool(self, output: dict) -> dict[str, torch.Tensor]:
        """The generation batch's per-row columns from every process (gathered, padded to one width)."""
        n = output["completion_ids"].size(0)
        pooled = {}
        for key, value in output.items():
            if key in ("advantages", "num_items_in_batch") or value is None:
                continue
            if key in MODEL_INPUT_KEYS or not (isinstance(value, torch.Tensor) and value.dim() >= 1
                                               and value.size(0) == n):
                raise RuntimeError(f"sampler {self._refill_part().name!r} pools generation batches, which it cannot "
                                   f"do with the batch column {key!r} (multimodal inputs are not supported)")
            if value.dim() >= 2:
                value = self.accelerator.pad_across_processes(value, dim=1, pad_index=self._pad_value(key),
                                                              pad_first=key in LEFT_PADDED)
            pooled[key] = self.accelerator.gather(value)
        return pooled

    def _pad_value(self, key: str) -> float:
        if key == "importance_sampling_ratio":  # TRL's own value past a completion's end: exp(0), masked out anyway
            return 1.0
        return self._tokenizer.pad_token_id if key in ("prompt_ids", "completion_ids") else 0

    def _refill(self, output: dict, keys: list[str] | None):
        """DAPO dynamic sampling (and RSR): generate more batches until enough groups are kept or the sampler's
        max_num_gen_batches rounds were generated; returns this process' rows of the assembled batch, their
        prompt ids, and for each row TRL logged this step its position in the batch (-1: not trained)."""
        part = self._refill_part()
        group, mode = self.num_generations, "train"
        n_local = output["completion_ids"].size(0)
        target = n_local * self.accelerator.num_processes // group
        max_rounds = part.params.get("max_num_gen_batches", part.variant.params["max_num_gen_batches"])
        pooled, per_func, pool_keys = [self._pool(output)], [self._rl_rewards_per_func], [keys]
        buffered = 0
        if self._rl_buffer is not None:  # RSR: last step's surplus groups come first
            buffered = self._rl_buffer["rewards_per_func"].size(0)
            pooled.insert(0, self._rl_buffer["batch"])
            per_func.insert(0, self._rl_buffer["rewards_per_func"])
            pool_keys.insert(0, self._rl_buffer["keys"])
        rounds = 1
        while True:
            keep = self._group_keep(part, self._raw_rewards(torch.cat(per_func), group), group, target)
            if int(keep.sum()) >= target or (max_rounds and rounds >= max_rounds):
                break
            batch = self._next_refill_batch()
            batch_keys = self._prompt_keys(batch)
            more = super()._generate_and_score_completions(batch)
            pooled.append(self._pool(more))
            per_func.append(self._rl_rewards_per_func)
            pool_keys.append(batch_keys)
            rounds += 1

        pool = cat_batches(pooled, {k: self._pad_value(k) for k in pooled[0]})
        all_per_func = torch.cat(per_func)
        all_keys = None if keys is None else [k for ks in pool_keys for k in ks]
        kept = torch.nonzero(keep).flatten()
        chosen = kept[:target]
        short = target - chosen.numel()
        if short:  # train on what there is: dropped groups fill the batch with weight 0
            chosen = torch.cat([chosen, torch.nonzero(~keep).flatten()[:short]])
        if part.recovers:
            surplus = group_rows(kept[target:], group)
            self._rl_buffer = None if surplus.numel() == 0 else {
                "batch": take_rows(pool, surplus), "rewards_per_func": all_per_func[surplus],
                "keys": None if all_keys is None else [all_keys[i] for i in surplus.tolist()]}
            self._metrics[mode]["rl/sampler/recovered_groups"].append(float(surplus.numel() // group))
        metrics = self._metrics[mode]
        metrics["rl/sampler/gen_batches"].append(float(rounds))
        metrics["rl/sampler/short_groups"].append(float(short))
        metrics[f"rl/sampler/{part.name}/kept_groups"].append(keep.float().mean().item())  # of all pooled groups

        rows = group_rows(chosen, group)
        position = torch.full((all_per_func.size(0),), -1, dtype=torch.long, device=rows.device)
        position[rows] = torch.arange(rows.numel(), device=rows.device)
        mine = rows[self.accelerator.process_index * n_local:(self.accelerator.process_index + 1) * n_local]
        self._rl_rewards_per_func = all_per_func[rows]
        assembled = {**take_rows(pool, mine), "advantages": None, "num_items_in_batch": None}
        return assembled, None if all_keys is None else [all_keys[i] for i in rows.tolist()], position[buffered:]

    def _next_refill_batch(self) -> list[dict]:
        """The next generation batch (this process' rows) of the refill stream. Its position is a counter in the
        state, so a resumed run continues the stream; the global RNG is left untouched (the DataLoader draws a
        base seed from it), so a refill does not change the main loop's sampling."""
        drawn = self.rl_state.count("refill_batches")
        with torch.random.fork_rng(devices=[]):
            if self._rl_refill_iter is None:
                self._rl_refill_iter = self._refill_batches(skip=drawn)
            return next(self._rl_refill_iter)

    def _refill_batches(self, skip: int):
        """Endless generation batches over the training set: TRL's RepeatSampler (get_train_dataloader), another
        seed, each batch once (the main loop's repeat_count is for reusing a batch, which refill does not)."""
        from trl.trainer.utils import RepeatSampler

        def sampler(dataset):
            return RepeatSampler(data_source=dataset, mini_repeat_count=self.num_generations,
                                 batch_size=self.args.generation_batch_size // self.num_generations, repeat_count=1,
                                 shuffle=self.shuffle_dataset, seed=self.args.seed + REFILL_SEED_OFFSET)

        loader = self._get_dataloader(dataset=self.train_dataset, description="Refill",
                                      batch_size=self._train_batch_size * self.args.steps_per_generation,
                                      sampler_fn=sampler, is_training=True)
        seen = 0
        while True:
            epoch_batches = 0
            for batch in loader:
                epoch_batches += 1
                seen += 1
                if seen > skip:
                    yield batch
            if epoch_batches == 0:
                raise RuntimeError(f"the training set has fewer prompts than one generation batch "
                                   f"({self.args.generation_batch_size // self.num_generations}), so the refill "
                                   f"stream is empty")

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.rl_parts is None or not self.args.should_save:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        with open(os.path.join(folder, RL_STATE_FILE), "w") as f:
            json.dump(self.rl_state.state_dict(), f)
        if self._rl_buffer is not None:
            torch.save(self._rl_buffer, os.path.join(folder, RL_BUFFER_FILE))
        grpo_replay.save_buffer(self.rl_replay_buffer, folder)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.rl_parts is None or checkpoint is None:
            return
        path = os.path.join(checkpoint, RL_STATE_FILE)
        if os.path.exists(path):
            with open(path) as f:
                self.rl_state.load_state_dict(json.load(f))
        self._rl_refill_iter = None  # continue the refill stream where the checkpoint left it
        buffer = os.path.join(checkpoint, RL_BUFFER_FILE)
        self._rl_buffer = torch.load(buffer, map_location=self.accelerator.device) if os.path.exists(buffer) else None
        grpo_replay.load_buffer(self.rl_replay_buffer, checkpoint)

    def _part_params(self, part: Part) -> dict[str, Any]:
        """The part's hyperparameters; a `max_completion_length` it leaves unset is TRL's configured one."""
        params = dict(part.params)
        if "max_completion_length" in part.variant.params and "max_completion_length" not in params:
            params["max_completion_length"] = self.max_completion_length
        return params

    def _gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(local rows, T) -> (all rows, longest T), zero-padded: per-token tensors of the whole batch."""
        return self.accelerator.gather(self.accelerator.pad_across_processes(x, dim=1, pad_index=0))

    def _sampling_logps(self, output: dict, with_entropies: bool):
        """Log-probs of the completions under the sampling policy (TRL's `old_per_token_logps` where it computed
        them, else one no-grad forward pass) and, if asked, their per-token entropies."""
        old = output.get("old_per_token_logps")
        if old is not None and not with_entropies:
            return old, None
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        with torch.no_grad():
            logps, entropies, _ = self._get_per_token_logps_and_entropies(
                self.model, ids, attention, output["completion_ids"].size(1),
                batch_size=self.args.per_device_train_batch_size, compute_entropy=with_entropies,
                **{k: output[k] for k in MODEL_INPUT_KEYS if k in output})
        return (logps if old is None else old), entropies

    def _replace_advantages(self, output: dict, keys: list[str] | None = None,
                            table_index: torch.Tensor | None = None) -> dict:
        parts = self.rl_parts
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        per_func = self._rl_rewards_per_func
        device = per_func.device
        n_local, width = output["completion_ids"].shape
        rows = slice(self.accelerator.process_index * n_local, (self.accelerator.process_index + 1) * n_local)
        generation = self.rl_state.count("generations")  # seeds this generation's draws, the same on every process

        # TRL: rewards = weighted nansum over reward functions; a row every function scored None is unscorable.
        unscorable = torch.isnan(per_func).all(dim=1)
        raw_rewards = self._raw_rewards(per_func, group)
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        scoring = [parts.advantage, *parts.shaping]

        def needs(name: str) -> bool:
            return any(p.variant.needs(name) for p in scoring)

        data: dict[str, Any] = {"rewards": raw_rewards, "group_size": group, "mask": self._gather_rows(mask)}
        if needs("old_logps") or needs("entropies"):
            old, entropies = self._sampling_logps(output, with_entropies=needs("entropies"))
            data["old_logps"] = self._gather_rows(old)
            if entropies is not None:
                data["entropies"] = self._gather_rows(entropies)
        if needs("ref_logps") and output.get("ref_per_token_logps") is not None:
            data["ref_logps"] = self._gather_rows(output["ref_per_token_logps"])
        if needs("noise"):  # the same draws on every process: a generator seeded by the run seed and the step
            generator = torch.Generator().manual_seed(int(self.args.seed) * 1_000_003 + generation)
            data["noise"] = torch.randn(raw_rewards.shape[0], generator=generator).to(device)
        if needs("ensemble_rewards"):  # the recipe's reward functions as the ensemble; a missing score -> the sum
            data["ensemble_rewards"] = torch.where(torch.isnan(per_func), raw_rewards.unsqueeze(1), per_func)
        if needs("step") or needs("total_steps"):  # training progress, for curriculum shaping (the same everywhere)
            data["step"], data["total_steps"] = int(self.state.global_step), int(self.state.max_steps)

        for part in parts.shaping:
            if part.prompt_state:  # a per-prompt history in, the updated one out (training only)
                width, first_visit = part.prompt_state
                state = self.rl_state.rows(part.name, keys, width, first_visit).to(device)
                shaped, new_state = SHAPING.call(part.name, {**data, "state": state}, self._part_params(part))
                if mode == "train":
                    self.rl_state.update(part.name, keys, new_state)
                data["rewards"] = shaped.to(device)
                continue
            data["rewards"] = SHAPING.call(part.name, data, self._part_params(part)).to(device)
            logs = part.variant.extra.get("logs")  # the entry's hook: what it reports of this batch
            if logs is not None:
                for key, value in logs(data, self._part_params(part)).items():
                    self._metrics[mode][key].append(value)
        rewards = data["rewards"]
        sampling = mode == "train" and bool(self._rl_samplers)
        keep, advantage_group = self._keep_before_advantage(raw_rewards, data["mask"], group) if sampling \
            else (torch.ones_like(unscorable, dtype=torch.bool), group)
        advantages = self._advantages(data, keep, advantage_group, keys, update_state=mode == "train")
        advantages = torch.nan_to_num(advantages, nan=0.0)
        dropped = unscorable.view(-1, *([1] * (advantages.dim() - 1)))
        advantages = torch.where(dropped, torch.zeros_like(advantages), advantages)  # TRL: no signal, no update
        weights = keep.float()
        if sampling:
            weights = self._weights_after_advantage(weights, raw_rewards, advantages, generation)
            trained = (weights > 0).view(-1, *([1] * (advantages.dim() - 1)))
            advantages = torch.where(trained, advantages, torch.zeros_like(advantages))
            output["rl_weight"] = weights[rows]
            output["num_items_in_batch"] = (weights * data["mask"].float().sum(-1)).sum()  # kept tokens, weighted
            output["rl_num_sequences"] = weights.sum()
            self._metrics[mode]["rl/sampler/kept_fraction"].append((weights > 0).float().mean().item())

        output["advantages"] = advantages[rows] if advantages.dim() == 1 else advantages[rows, :width]
        if parts.policy_loss.variant.needs("rewards"):
            output["rl_rewards"] = rewards[rows]
        if parts.policy_loss.variant.needs("group_size"):  # to restore whole groups after TRL's shuffle
            output["rl_row_index"] = torch.arange(rewards.shape[0], device=device)[rows]
        self._log_advantages(mode, advantages, data["mask"], ~unscorable & (weights > 0),
                             rewards if parts.shaping else None, table_index)
        return output

    def _keep_before_advantage(self, rewards: torch.Tensor, mask: torch.Tensor, group: int):
        """Rows the group and subset samplers keep, and the group size the advantage sees (GFPO: k)."""
        keep = torch.ones_like(rewards, dtype=torch.bool)
        metrics = self._metrics["train"]
        part = self._rl_samplers.get("group")
        if part is not None:
            groups = self._group_keep(part, rewards, group, rewards.numel() // group)
            if not part.refills:  # a refilling one logged its share of every group it pooled
                metrics[f"rl/sampler/{part.name}/kept_groups"].append(groups.float().mean().item())
            keep = groups.repeat_interleave(group)
        part = self._rl_samplers.get("subset")
        if part is not None:
            keep = keep & SAMPLERS.call(part.name, {"rewards": rewards, "group_size": group, "mask": mask},
                                        part.params).bool()
            return keep, int(part.params["k"])
        return keep, group

    def _advantages(self, data: dict[str, Any], keep: torch.Tensor, group: int, keys: list[str] | None,
                    update_state: bool) -> torch.Tensor:
        """The advantage part on the kept rows only (as if the batch held no other; 0 elsewhere), reading and
        updating the per-prompt state of a stateful estimator."""
        part = self.rl_parts.advantage
        n = keep.numel()
        if part.prompt_state:
            width, first_visit = part.prompt_state
            data = {**data, "state": self.rl_state.rows(part.name, keys, width, first_visit).to(keep.device)}
        index = None if bool(keep.all()) else torch.nonzero(keep).flatten()
        if index is not None:
            data = {k: (v[index] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.size(0) == n else v)
                    for k, v in data.items()}
        data["group_size"] = group
        if index is not None and index.numel() == 0:
            return torch.zeros(n, device=keep.device)
        result = ADVANTAGES.call(part.name, data, self._part_params(part))
        if part.prompt_state:
            result, new_state = result
            if update_state:
                kept_keys = keys if index is None else [keys[i] for i in index.tolist()]
                self.rl_state.update(part.name, kept_keys, new_state)
        result = result.float()
        if index is None:
            return result
        full = torch.zeros((n, *result.shape[1:]), dtype=result.dtype, device=result.device)
        full[index] = result
        return full

    def _weights_after_advantage(self, weights: torch.Tensor, rewards: torch.Tensor, advantages: torch.Tensor,
                                 generation: int) -> torch.Tensor:
        """Row weights after the row sampler (RAFT++, CPPO) and the reweighting one (PF-PPO), over kept rows."""
        metrics = self._metrics["train"]
        part = self._rl_samplers.get("row")
        if part is not None:
            kept = torch.nonzero(weights > 0).flatten()
            if part.variant.needs("advantages"):  # CPPO: ranks the kept completions by their advantage
                if advantages.dim() != 1:
                    raise RuntimeError(f"sampler {part.name!r} ranks completions by |advantage|, but advantage "
                                       f"{self.rl_parts.advantage.name!r} gives one per token")
                chosen = SAMPLERS.call(part.name, {"rewards": rewards[kept], "group_size": 1,
                                                   "advantages": advantages[kept]}, part.params)
                row_keep = torch.zeros_like(weights, dtype=torch.bool)
                row_keep[kept[chosen.bool()]] = True
            else:
                row_keep = SAMPLERS.call(part.name, {"rewards": rewards, "group_size": self.num_generations},
                                         part.params).bool()
            metrics[f"rl/sampler/{part.name}/kept_rows"].append(
                (row_keep[kept].float().mean().item() if kept.numel() else 0.0))
            weights = weights * row_keep
        part = self._rl_samplers.get("reweight")
        if part is not None:  # PF-PPO: draw as many rows as are kept, with replacement, by the entry's weights
            kept = torch.nonzero(weights > 0).flatten()
            if kept.numel():
                probs = SAMPLERS.call(part.name, {"rewards": rewards[kept], "group_size": 1}, part.params)
                generator = torch.Generator().manual_seed(int(self.args.seed) * 1_000_003 + generation + 500_009)
                draws = torch.multinomial(probs.float().cpu(), kept.numel(), replacement=True, generator=generator)
                counts = torch.bincount(draws, minlength=kept.numel()).to(weights)
                metrics[f"rl/sampler/{part.name}/distinct_rows"].append((counts > 0).float().mean().item())
                resampled = torch.zeros_like(weights)
                resampled[kept] = weights[kept] * counts
                weights = resampled
        return weights

    def _log_advantages(self, mode, advantages, mask, trained, shaped_rewards, table_index=None) -> None:
        """postrain's advantage statistics over the trained rows (TRL's describe its own estimate, which the rl:
        path replaces), and the completions table's advantages column (0 for a row not trained)."""
        if advantages.dim() == 1:
            values = advantages[trained]
            table = self._logs["advantages"]
            logged = advantages.tolist() if table_index is None else \
                [advantages[i].item() if i >= 0 else 0.0 for i in table_index.tolist()]
            for _ in range(min(len(logged), len(table))):
                table.pop()
            table.extend(logged)
        else:
            values = advantages[(mask > 0) & trained.unsqueeze(1)]
        metrics = self._metrics[mode]
        if values.numel():
            metrics["rl/advantages/mean"].append(values.mean().item())
            metrics["rl/advantages/std"].append(values.std().item() if values.numel() > 1 else 0.0)
            metrics["rl/advantages/min"].append(values.min().item())
            metrics["rl/advantages/max"].append(values.max().item())
        if shaped_rewards is not None and bool(trained.any()):
            metrics["rl/shaped_reward/mean"].append(shaped_rewards[trained].mean().item())

    # --- policy loss ------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        if self.rl_parts is None:
            return super()._compute_loss(model, inputs)
        parts = self.rl_parts
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        group = self.num_generations if mode == "train" else self.num_generations_eval

        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        vocab_logps = None
        if parts.policy_loss.variant.needs("vocab_logps"):  # TW-GRPO: the whole next-token distribution
            logps, entropies, vocab_logps, aux_loss = self._vocab_logps_and_entropies(
                model, input_ids, attention_mask, completion_ids.size(1))
        else:
            logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled, **{k: inputs.get(k) for k in MODEL_INPUT_KEYS})
        old = inputs.get("old_per_token_logps")
        rows = {"logps": logps, "entropies": entropies, "mask": mask, "advantages": inputs["advantages"],
                "old_logps": logps.detach() if old is None else old, "ref_logps": inputs.get("ref_per_token_logps"),
                "rewards": inputs.get("rl_rewards"), "weight": inputs.get("rl_weight"),
                "completion_ids": completion_ids, "vocab_logps": vocab_logps,
                "is_ratio": inputs["importance_sampling_ratio"] if self._vllm_correction() else None}
        if "rl_row_index" in inputs:
            rows = _whole_groups(rows, inputs["rl_row_index"], group)
        weight = rows.pop("weight")  # samplers' row weights: a row of weight 0 is not trained nor counted
        is_ratio = rows.pop("is_ratio")  # (B, T) or (B, 1): TRL's pi_old / pi_vllm, truncated or masked
        if weight is not None:
            rows["mask"] = rows["mask"] * (weight > 0).unsqueeze(1).to(rows["mask"].dtype)
        logps, entropies, mask, ref = rows["logps"], rows["entropies"], rows["mask"], rows["ref_logps"]

        def global_mean(x: torch.Tensor) -> torch.Tensor:
            totals = self.accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum().float()]), reduction="sum")
            return totals[0] / totals[1].clamp(min=1.0)

        aggregation = parts.aggregation
        agg_data = self._aggregation_normalizers(inputs, mask, weight, mode, accumulation)
        loss_data = {**rows, "group_size": group}
        if parts.policy_loss.variant.needs("kl_stats"):  # DisCO: its KL constraint over every process' rows
            stats = self.accelerator.reduce(disco_kl_stats(logps, rows["old_logps"], mask), reduction="sum")
            if "num_sequences" in agg_data:  # the rows the aggregation divides by, over processes, per micro-batch
                stats[2] = float(agg_data["num_sequences"]) * self.accelerator.num_processes / accumulation
            loss_data["kl_stats"] = stats
        per_token, metrics = POLICY_LOSSES.call(parts.policy_loss.name, loss_data,
                                                self._part_params(parts.policy_loss))
        # A token-selecting regularizer multiplies the policy loss before any penalty is added (TRL's order for
        # its entropy mask and KL term).
        for part in parts.regularizers:
            if part.variant.extra.get("selects_tokens"):
                local = entropies.detach()[mask.bool()].float()
                pool = self.accelerator.gather(self.accelerator.pad_across_processes(local, dim=0, pad_index=-1e9))
                keep = REGULARIZERS.call(part.name, {"entropies": entropies.detach(), "mask": mask,
                                                     "all_entropies": pool[pool != -1e9]}, self._part_params(part))
                per_token = per_token * keep
        # TRL's vLLM importance-sampling correction weighs the policy loss of each vLLM-drawn token (or sequence)
        # by pi_old / pi_vllm, after the entropy mask and before the KL term, so penalties are not reweighted.
        if is_ratio is not None:
            per_token = per_token * is_ratio.to(per_token.dtype)
        mean_entropy = global_mean(entropies.detach())
        for part in parts.regularizers:
            if not part.variant.extra.get("selects_tokens"):
                per_token = per_token + REGULARIZERS.call(
                    part.name, {"logps": logps, "ref_logps": ref, "mask": mask, "entropies": entropies,
                                "mean_entropy": mean_entropy}, self._part_params(part))

        if weight is not None:  # a row drawn w times counts w times (PF-PPO); dropped rows are masked above
            per_token = per_token * weight.to(per_token.dtype).unsqueeze(1)

        loss = AGGREGATIONS.call(aggregation.name, {"per_token_loss": per_token, "mask": mask, **agg_data},
                                 self._part_params(aggregation))
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        logged = self._metrics[mode]
        logged["entropy"].append(mean_entropy.item())
        if ref is not None:
            logged["kl"].append(global_mean(kl_penalty("k3", logps.detach(), ref, mask)).item())
        for key, value in metrics.items():
            value = torch.as_tensor(value, dtype=torch.float32, device=loss.device).detach().reshape(1)
            logged[key].append(self.accelerator.gather(value).nanmean().item())
        if "rl_replay_valid" in inputs:  # RePO: + c * L_off over the replayed samples of this micro-batch
            loss = loss + grpo_replay.replay_loss(self, model, inputs, mode, accumulation)
        return loss

    def _vocab_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep):
        """Per-token log-probs, entropies and the whole vocabulary's log-probs (N, T, V) at every completion
        position, for a policy loss that reads `vocab_logps` (TW-GRPO), from the model's own unfused forward: TRL's
        fused LM head returns no distribution. The logits are divided by the sampling temperature, as TRL's head
        divides them, so `logps` equal TRL's (tests/test_grpo_trainer.py). Memory: N·T·V float32 values with
        their gradient (about 4.8 GB at N = 16, T = 512, V = 150k), so this suits small models and vocabularies.
        Multimodal inputs and the shared-prefix forward are not used on this path."""
        kwargs = {"output_router_logits": True} if self.aux_loss_enabled else {}
        with self.accelerator.autocast():
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        logits = outputs.logits[:, -(logits_to_keep + 1):-1].float() / self.temperature
        vocab = logits.log_softmax(-1)
        logps = vocab.gather(-1, input_ids[:, -logits_to_keep:].unsqueeze(-1)).squeeze(-1)
        entropies = -(vocab.exp() * vocab).sum(-1)
        return logps, entropies, vocab, (getattr(outputs, "aux_loss", None) if self.aux_loss_enabled else None)

    def _vllm_correction(self) -> bool:
        """Whether TRL's vLLM importance-sampling correction is on: then TRL's `_generate_and_score_completions`
        puts `importance_sampling_ratio` in every batch (and always computes `old_per_token_logps`)."""
        return bool(self.use_vllm and self.vllm_importance_sampling_correction)

    def _aggregation_normalizers(self, inputs, mask, weight, mode: str, accumulation: int) -> dict[str, Any]:
        """The global normalizers the recipe's aggregation reads, scaled as TRL scales its own (see the
        aggregation entries and tests/test_rl_distributed.py)."""
        aggregation = self.rl_parts.aggregation
        agg_data: dict[str, Any] = {}
        if aggregation.variant.needs("global_tokens"):  # TRL's loss_type="dapo" normaliser (weighted by samplers)
            tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                tokens = tokens * accumulation / self.args.steps_per_generation
            agg_data["global_tokens"] = tokens
        if aggregation.variant.needs("num_sequences"):
            if weight is None:  # TRL's "grpo" / "dr_grpo": local mean / accumulation
                agg_data["num_sequences"] = mask.size(0) * accumulation
            else:  # the kept rows of the generation batch, scaled as the dapo normaliser (the same value unfiltered)
                agg_data["num_sequences"] = (inputs["rl_num_sequences"].clamp(min=1.0) / self.accelerator.num_processes
                                             * accumulation / self.args.steps_per_generation)
        if aggregation.variant.needs("length_weight_sum"):  # this micro-batch's sum, times the accumulation
            alpha = self._part_params(aggregation).get("alpha", aggregation.variant.params.get("alpha", 1.0))
            lengths = mask.float().sum(-1)
            weights = torch.where(lengths > 0, lengths.clamp(min=1.0) ** -alpha, torch.zeros_like(lengths))
            if weight is not None:
                weights = weights * weight.to(weights.dtype)
            agg_data["length_weight_sum"] = weights.sum() * accumulation
        return agg_data


def _fill_unscorable(rewards: torch.Tensor, unscorable: torch.Tensor, group: int) -> torch.Tensor:
    """Rewards with each unscorable row set to the mean of its group's scorable rows (0 if none), so that the
    group mean is the one TRL's nan-aware baseline computes; those rows' advantages are set to 0 afterwards.
    (A group std still counts them, as values at the mean: it shrinks by sqrt((k-1)/(G-1)) for k scorable rows.)"""
    if not bool(unscorable.any()):
        return rewards
    grouped = torch.where(unscorable, torch.nan, rewards).view(-1, group)
    means = torch.nan_to_num(torch.nanmean(grouped, dim=1, keepdim=True), nan=0.0)
    return torch.where(torch.isnan(grouped), means, grouped).view(-1)


def _whole_groups(rows: dict[str, Any], row_index: torch.Tensor, group: int) -> dict[str, Any]:
    """Rows put back in generation order (TRL shuffles the batch before splitting it into micro-batches), so a
    loss over groups sees each group's completions contiguous; the load-time check keeps groups whole."""
    order = torch.argsort(row_index)
    index = row_index[order]
    groups = index.view(-1, group) // group if index.numel() % group == 0 else None
    if groups is None or not bool((groups == groups[:, :1]).all()):
        raise RuntimeError("a micro-batch does not hold whole groups; the rl: policy loss needs them "
                           "(steps_per_generation must be 1 and per_device_train_batch_size a multiple of "
                           "num_generations)")
    return {k: (v[order] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in rows.items()}
