"""GRPOTrainer with reward-failure logging and, when the recipe has an `rl:` section, registry RL parts.

Without `rl:` only `Trainer.log` is overridden (reward-function failures are logged, never silent) and training
is TRL's own. With `rl:` (postrain.rl.section) two hook points dispatch to the registries:

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
  - `get_high_entropy_mask` (l.1380-1415): the entropy quantile over every process' valid tokens.
TRL options this path does not reproduce are refused at recipe load time (postrain.rl.section.TRL_CONFLICTS).
"""

from __future__ import annotations

from typing import Any

import torch
from trl import GRPOTrainer

from postrain.rl.registry import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES, REGULARIZERS, SHAPING
from postrain.rl.regularizers import kl_penalty
from postrain.rl.section import Part, parse_rl_section

# Model inputs besides ids and attention that TRL's batches may carry (vision models); passed through as TRL does.
MODEL_INPUT_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


class PostrainGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer; also logs `rewards/<name>/errors`, the completions each reward failed to score since
    the last log (the reward error policy `score` scores them as failed instead of stopping the run), and with
    `rl=` (a recipe's `rl:` section) trains with the registry parts it names."""

    def __init__(self, *args, rl: dict[str, Any] | None = None, **kwargs):
        self.rl_parts = parse_rl_section(rl) if rl is not None else None
        self._rl_rewards_per_func: torch.Tensor | None = None
        self._rl_generations = 0
        super().__init__(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for fn in self.reward_funcs:
            if hasattr(fn, "pop_error_count"):
                logs[f"rewards/{fn.name}/errors"] = float(fn.pop_error_count())
        super().log(logs, start_time)

    # --- advantages -------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.rl_parts is not None:
            self._rl_rewards_per_func = rewards_per_func  # (N, reward functions), gathered: whole groups
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.rl_parts is None:
            return output
        return self._replace_advantages(output)

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

    def _replace_advantages(self, output: dict) -> dict:
        parts = self.rl_parts
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        per_func = self._rl_rewards_per_func
        device = per_func.device
        n_local, width = output["completion_ids"].shape
        rows = slice(self.accelerator.process_index * n_local, (self.accelerator.process_index + 1) * n_local)

        # TRL: rewards = weighted nansum over reward functions; a row every function scored None is unscorable.
        unscorable = torch.isnan(per_func).all(dim=1)
        rewards = _fill_unscorable((per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1),
                                   unscorable, group)
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        scoring = [parts.advantage, *parts.shaping]

        def needs(name: str) -> bool:
            return any(p.variant.needs(name) for p in scoring)

        data: dict[str, Any] = {"rewards": rewards, "group_size": group, "mask": self._gather_rows(mask)}
        if needs("old_logps") or needs("entropies"):
            old, entropies = self._sampling_logps(output, with_entropies=needs("entropies"))
            data["old_logps"] = self._gather_rows(old)
            if entropies is not None:
                data["entropies"] = self._gather_rows(entropies)
        if needs("ref_logps") and output.get("ref_per_token_logps") is not None:
            data["ref_logps"] = self._gather_rows(output["ref_per_token_logps"])
        if needs("noise"):  # the same draws on every process: a generator seeded by the run seed and the step
            generator = torch.Generator().manual_seed(int(self.args.seed) * 1_000_003 + self._rl_generations)
            data["noise"] = torch.randn(rewards.shape[0], generator=generator).to(device)
        if needs("ensemble_rewards"):  # the recipe's reward functions as the ensemble; a missing score -> the sum
            data["ensemble_rewards"] = torch.where(torch.isnan(per_func), rewards.unsqueeze(1), per_func)

        for part in parts.shaping:
            data["rewards"] = SHAPING.call(part.name, data, self._part_params(part)).to(device)
        rewards = data["rewards"]
        advantages = ADVANTAGES.call(parts.advantage.name, data, self._part_params(parts.advantage)).float()
        advantages = torch.nan_to_num(advantages, nan=0.0)
        dropped = unscorable.view(-1, *([1] * (advantages.dim() - 1)))
        advantages = torch.where(dropped, torch.zeros_like(advantages), advantages)  # TRL: no signal, no update

        output["advantages"] = advantages[rows] if advantages.dim() == 1 else advantages[rows, :width]
        if parts.policy_loss.variant.needs("rewards"):
            output["rl_rewards"] = rewards[rows]
        if parts.policy_loss.variant.needs("group_size"):  # to restore whole groups after TRL's shuffle
            output["rl_row_index"] = torch.arange(rewards.shape[0], device=device)[rows]
        self._log_advantages(mode, advantages, data["mask"], unscorable, rewards if parts.shaping else None)
        self._rl_generations += 1
        return output

    def _log_advantages(self, mode, advantages, mask, unscorable, shaped_rewards) -> None:
        """postrain's advantage statistics (TRL's describe its own estimate, which the rl: path replaces), and
        the completions table's advantages column."""
        if advantages.dim() == 1:
            values = advantages[~unscorable]
            table = self._logs["advantages"]
            for _ in range(min(advantages.numel(), len(table))):
                table.pop()
            table.extend(advantages.tolist())
        else:
            values = advantages[(mask > 0) & ~unscorable.unsqueeze(1)]
        metrics = self._metrics[mode]
        if values.numel():
            metrics["rl/advantages/mean"].append(values.mean().item())
            metrics["rl/advantages/std"].append(values.std().item() if values.numel() > 1 else 0.0)
            metrics["rl/advantages/min"].append(values.min().item())
            metrics["rl/advantages/max"].append(values.max().item())
        if shaped_rewards is not None:
            metrics["rl/shaped_reward/mean"].append(shaped_rewards[~unscorable].mean().item())

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
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled, **{k: inputs.get(k) for k in MODEL_INPUT_KEYS})
        old = inputs.get("old_per_token_logps")
        rows = {"logps": logps, "entropies": entropies, "mask": mask, "advantages": inputs["advantages"],
                "old_logps": logps.detach() if old is None else old, "ref_logps": inputs.get("ref_per_token_logps"),
                "rewards": inputs.get("rl_rewards")}
        if "rl_row_index" in inputs:
            rows = _whole_groups(rows, inputs["rl_row_index"], group)
        logps, entropies, mask, ref = rows["logps"], rows["entropies"], rows["mask"], rows["ref_logps"]

        def global_mean(x: torch.Tensor) -> torch.Tensor:
            totals = self.accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum().float()]), reduction="sum")
            return totals[0] / totals[1].clamp(min=1.0)

        per_token, metrics = POLICY_LOSSES.call(parts.policy_loss.name, {**rows, "group_size": group},
                                                self._part_params(parts.policy_loss))
        # A token-selecting regularizer multiplies the policy loss before any penalty is added (TRL's order for
        # its entropy mask and KL term).
        for part in parts.regularizers:
            if part.name == "high_entropy_tokens":
                local = entropies.detach()[mask.bool()].float()
                pool = self.accelerator.gather(self.accelerator.pad_across_processes(local, dim=0, pad_index=-1e9))
                keep = REGULARIZERS.call(part.name, {"entropies": entropies.detach(), "mask": mask,
                                                     "all_entropies": pool[pool != -1e9]}, self._part_params(part))
                per_token = per_token * keep
        mean_entropy = global_mean(entropies.detach())
        for part in parts.regularizers:
            if part.name != "high_entropy_tokens":
                per_token = per_token + REGULARIZERS.call(
                    part.name, {"logps": logps, "ref_logps": ref, "mask": mask, "entropies": entropies,
                                "mean_entropy": mean_entropy}, self._part_params(part))

        aggregation = parts.aggregation
        agg_data: dict[str, Any] = {"per_token_loss": per_token, "mask": mask}
        if aggregation.variant.needs("global_tokens"):  # TRL's loss_type="dapo" normaliser
            tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                tokens = tokens * accumulation / self.args.steps_per_generation
            agg_data["global_tokens"] = tokens
        if aggregation.variant.needs("num_sequences"):  # TRL's "grpo" / "dr_grpo": local mean / accumulation
            agg_data["num_sequences"] = mask.size(0) * accumulation
        if aggregation.variant.needs("length_weight_sum"):  # this micro-batch's sum, times the accumulation
            alpha = self._part_params(aggregation).get("alpha", aggregation.variant.params.get("alpha", 1.0))
            lengths = mask.float().sum(-1)
            weights = torch.where(lengths > 0, lengths.clamp(min=1.0) ** -alpha, torch.zeros_like(lengths))
            agg_data["length_weight_sum"] = weights.sum() * accumulation
        loss = AGGREGATIONS.call(aggregation.name, agg_data, self._part_params(aggregation))
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
        return loss


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
