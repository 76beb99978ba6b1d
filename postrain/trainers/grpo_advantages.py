"""The advantage step of the GRPO trainer's `rl:` path: shaping, the samplers around the advantage, the advantage
estimator, and what is logged of them (postrain.trainers.grpo describes the algorithm; postrain.rl.section the
sampler stages).

`replace_advantages` runs once per generation batch on the rewards TRL gathered from every process (whole groups):
TRL's weighted reward sum, shaping entries, the group and subset samplers (a keep mask before the advantage), the
advantage estimator on the kept rows, the row and reweighting samplers (row weights after it), and replaces
`output["advantages"]` by this process' rows, sliced exactly as TRL slices. Every sampler becomes a per-row weight
w_i >= 0 over the gathered batch (0: dropped, an integer: PF-PPO's multiplicity), the same on every process.
"""

from __future__ import annotations

from typing import Any

import torch

from postrain.rl.registry import ADVANTAGES, SAMPLERS, SHAPING
from postrain.rl.section import Part
from postrain.trainers.grpo_loss import sampling_logps

# Seeds of this module's draws: the run seed times this plus the generation counter (PF-PPO adds its own offset).
SEED_STRIDE = 1_000_003
PF_PPO_SEED_OFFSET = 500_009


def fill_unscorable(rewards: torch.Tensor, unscorable: torch.Tensor, group: int) -> torch.Tensor:
    """Rewards with each unscorable row set to the mean of its group's scorable rows (0 if none), so that the
    group mean is the one TRL's nan-aware baseline computes; those rows' advantages are set to 0 afterwards.
    (A group std still counts them, as values at the mean: it shrinks by sqrt((k-1)/(G-1)) for k scorable rows.)"""
    if not bool(unscorable.any()):
        return rewards
    grouped = torch.where(unscorable, torch.nan, rewards).view(-1, group)
    means = torch.nan_to_num(torch.nanmean(grouped, dim=1, keepdim=True), nan=0.0)
    return torch.where(torch.isnan(grouped), means, grouped).view(-1)


def raw_rewards(per_func: torch.Tensor, reward_weights: torch.Tensor, group: int) -> torch.Tensor:
    """TRL's reward: weighted nansum over reward functions; unscorable rows at their group's mean."""
    unscorable = torch.isnan(per_func).all(dim=1)
    weighted = (per_func * reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
    return fill_unscorable(weighted, unscorable, group)


def group_keep(part: Part, rewards: torch.Tensor, group: int, batch_groups: int) -> torch.Tensor:
    """The group sampler's keep mask over the groups of `rewards` (a `recovers` sampler: the groups it puts in the
    batch or the buffer)."""
    params = dict(part.params)
    if part.recovers:
        chosen = SAMPLERS.call(part.name, {"rewards": rewards, "group_size": group},
                               {**params, "batch_groups": batch_groups})
        keep = torch.zeros(rewards.numel() // group, dtype=torch.bool, device=rewards.device)
        keep[torch.cat([chosen["batch"], chosen["buffer"]]).to(rewards.device)] = True
        return keep
    return SAMPLERS.call(part.name, {"rewards": rewards, "group_size": group}, params).bool()


def replace_advantages(trainer, output: dict, keys: list[str] | None = None,
                       table_index: torch.Tensor | None = None) -> dict:
    """`output` (TRL's generation batch, this process' rows) with the `rl:` advantages, and the sampler weights
    and normalisers the loss reads (`rl_weight`, `num_items_in_batch`, `rl_num_sequences`), from the gathered
    rewards in `trainer.rl_rewards_per_func`. `keys`: every row's prompt id where a part keeps per-prompt state;
    `table_index`: for a refilled batch, each logged row's position in it."""
    parts = trainer.rl_parts
    mode = "train" if trainer.model.training else "eval"
    group = trainer.num_generations if mode == "train" else trainer.num_generations_eval
    per_func = trainer.rl_rewards_per_func
    device = per_func.device
    n_local, width = output["completion_ids"].shape
    process = trainer.accelerator.process_index
    rows = slice(process * n_local, (process + 1) * n_local)
    generation = trainer.rl_state.count("generations")  # seeds this generation's draws, the same on every process

    # TRL: rewards = weighted nansum over reward functions; a row every function scored None is unscorable.
    unscorable = torch.isnan(per_func).all(dim=1)
    raw = raw_rewards(per_func, trainer.reward_weights, group)
    mask = output["completion_mask"]
    if "tool_mask" in output:
        mask = mask * output["tool_mask"]
    scoring = [parts.advantage, *parts.shaping]

    def needs(name: str) -> bool:
        return any(p.variant.needs(name) for p in scoring)

    data: dict[str, Any] = {"rewards": raw, "group_size": group, "mask": trainer.gather_rows(mask)}
    if needs("old_logps") or needs("entropies"):
        old, entropies = sampling_logps(trainer, output, with_entropies=needs("entropies"))
        data["old_logps"] = trainer.gather_rows(old)
        if entropies is not None:
            data["entropies"] = trainer.gather_rows(entropies)
    if needs("ref_logps") and output.get("ref_per_token_logps") is not None:
        data["ref_logps"] = trainer.gather_rows(output["ref_per_token_logps"])
    if needs("noise"):  # the same draws on every process: a generator seeded by the run seed and the step
        generator = torch.Generator().manual_seed(int(trainer.args.seed) * SEED_STRIDE + generation)
        data["noise"] = torch.randn(raw.shape[0], generator=generator).to(device)
    if needs("ensemble_rewards"):  # the recipe's reward functions as the ensemble; a missing score -> the sum
        data["ensemble_rewards"] = torch.where(torch.isnan(per_func), raw.unsqueeze(1), per_func)
    if needs("step") or needs("total_steps"):  # training progress, for curriculum shaping (the same everywhere)
        data["step"], data["total_steps"] = int(trainer.state.global_step), int(trainer.state.max_steps)

    metrics = trainer.metrics(mode)
    for part in parts.shaping:
        params = trainer.part_params(part)
        if part.prompt_state:  # a per-prompt history in, the updated one out (training only)
            state = trainer.rl_state.rows(part.name, keys, *part.prompt_state).to(device)
            shaped, new_state = SHAPING.call(part.name, {**data, "state": state}, params)
            if mode == "train":
                trainer.rl_state.update(part.name, keys, new_state)
            data["rewards"] = shaped.to(device)
            continue
        data["rewards"] = SHAPING.call(part.name, data, params).to(device)
        logs = part.variant.extra.get("logs")  # the entry's hook: what it reports of this batch
        if logs is not None:
            for key, value in logs(data, params).items():
                metrics[key].append(value)
    rewards = data["rewards"]
    sampling = mode == "train" and any(p.stage != "replay" for p in parts.samplers)
    keep, advantage_group = keep_before_advantage(trainer, raw, data["mask"], group) if sampling \
        else (torch.ones_like(unscorable, dtype=torch.bool), group)
    advantages = estimate(trainer, data, keep, advantage_group, keys, update_state=mode == "train")
    advantages = torch.nan_to_num(advantages, nan=0.0)
    dropped = unscorable.view(-1, *([1] * (advantages.dim() - 1)))
    advantages = torch.where(dropped, torch.zeros_like(advantages), advantages)  # TRL: no signal, no update
    weights = keep.float()
    if sampling:
        weights = weights_after_advantage(trainer, weights, raw, advantages, generation)
        trained = (weights > 0).view(-1, *([1] * (advantages.dim() - 1)))
        advantages = torch.where(trained, advantages, torch.zeros_like(advantages))
        output["rl_weight"] = weights[rows]
        output["num_items_in_batch"] = (weights * data["mask"].float().sum(-1)).sum()  # kept tokens, weighted
        output["rl_num_sequences"] = weights.sum()
        metrics["rl/sampler/kept_fraction"].append((weights > 0).float().mean().item())

    output["advantages"] = advantages[rows] if advantages.dim() == 1 else advantages[rows, :width]
    if parts.policy_loss.variant.needs("rewards"):
        output["rl_rewards"] = rewards[rows]
    if parts.policy_loss.variant.needs("group_size"):  # to restore whole groups after TRL's shuffle
        output["rl_row_index"] = torch.arange(rewards.shape[0], device=device)[rows]
    log_advantages(trainer, mode, advantages, data["mask"], ~unscorable & (weights > 0),
                   rewards if parts.shaping else None, table_index)
    return output


def keep_before_advantage(trainer, rewards: torch.Tensor, mask: torch.Tensor, group: int):
    """Rows the group and subset samplers keep, and the group size the advantage sees (GFPO: k)."""
    keep = torch.ones_like(rewards, dtype=torch.bool)
    metrics = trainer.metrics("train")
    part = trainer.rl_parts.sampler_at("group")
    if part is not None:
        groups = group_keep(part, rewards, group, rewards.numel() // group)
        if not part.refills:  # a refilling one logged its share of every group it pooled
            metrics[f"rl/sampler/{part.name}/kept_groups"].append(groups.float().mean().item())
        keep = groups.repeat_interleave(group)
    part = trainer.rl_parts.sampler_at("subset")
    if part is not None:
        keep = keep & SAMPLERS.call(part.name, {"rewards": rewards, "group_size": group, "mask": mask},
                                    part.params).bool()
        return keep, int(part.params["k"])
    return keep, group


def estimate(trainer, data: dict[str, Any], keep: torch.Tensor, group: int, keys: list[str] | None,
             update_state: bool) -> torch.Tensor:
    """The advantage part on the kept rows only (as if the batch held no other; 0 elsewhere), reading and
    updating the per-prompt state of a stateful estimator."""
    part = trainer.rl_parts.advantage
    n = keep.numel()
    if part.prompt_state:
        data = {**data, "state": trainer.rl_state.rows(part.name, keys, *part.prompt_state).to(keep.device)}
    index = None if bool(keep.all()) else torch.nonzero(keep).flatten()
    if index is not None:
        data = {k: (v[index] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.size(0) == n else v)
                for k, v in data.items()}
    data["group_size"] = group
    if index is not None and index.numel() == 0:
        return torch.zeros(n, device=keep.device)
    result = ADVANTAGES.call(part.name, data, trainer.part_params(part))
    if part.prompt_state:
        result, new_state = result
        if update_state:
            kept_keys = keys if index is None else [keys[i] for i in index.tolist()]
            trainer.rl_state.update(part.name, kept_keys, new_state)
    result = result.float()
    if index is None:
        return result
    full = torch.zeros((n, *result.shape[1:]), dtype=result.dtype, device=result.device)
    full[index] = result
    return full


def weights_after_advantage(trainer, weights: torch.Tensor, rewards: torch.Tensor, advantages: torch.Tensor,
                            generation: int) -> torch.Tensor:
    """Row weights after the row sampler (RAFT++, CPPO) and the reweighting one (PF-PPO), over kept rows."""
    metrics = trainer.metrics("train")
    part = trainer.rl_parts.sampler_at("row")
    if part is not None:
        kept = torch.nonzero(weights > 0).flatten()
        if part.variant.needs("advantages"):  # CPPO: ranks the kept completions by their advantage
            if advantages.dim() != 1:
                raise RuntimeError(f"sampler {part.name!r} ranks completions by |advantage|, but advantage "
                                   f"{trainer.rl_parts.advantage.name!r} gives one per token")
            chosen = SAMPLERS.call(part.name, {"rewards": rewards[kept], "group_size": 1,
                                               "advantages": advantages[kept]}, part.params)
            row_keep = torch.zeros_like(weights, dtype=torch.bool)
            row_keep[kept[chosen.bool()]] = True
        else:
            row_keep = SAMPLERS.call(part.name, {"rewards": rewards, "group_size": trainer.num_generations},
                                     part.params).bool()
        metrics[f"rl/sampler/{part.name}/kept_rows"].append(
            (row_keep[kept].float().mean().item() if kept.numel() else 0.0))
        weights = weights * row_keep
    part = trainer.rl_parts.sampler_at("reweight")
    if part is not None:  # PF-PPO: draw as many rows as are kept, with replacement, by the entry's weights
        kept = torch.nonzero(weights > 0).flatten()
        if kept.numel():
            probs = SAMPLERS.call(part.name, {"rewards": rewards[kept], "group_size": 1}, part.params)
            seed = int(trainer.args.seed) * SEED_STRIDE + generation + PF_PPO_SEED_OFFSET
            draws = torch.multinomial(probs.float().cpu(), kept.numel(), replacement=True,
                                      generator=torch.Generator().manual_seed(seed))
            counts = torch.bincount(draws, minlength=kept.numel()).to(weights)
            metrics[f"rl/sampler/{part.name}/distinct_rows"].append((counts > 0).float().mean().item())
            resampled = torch.zeros_like(weights)
            resampled[kept] = weights[kept] * counts
            weights = resampled
    return weights


def log_advantages(trainer, mode, advantages, mask, trained, shaped_rewards, table_index=None) -> None:
    """postrain's advantage statistics over the trained rows (TRL's describe its own estimate, which the rl:
    path replaces), and the completions table's advantages column (0 for a row not trained)."""
    if advantages.dim() == 1:
        values = advantages[trained]
        table = trainer.logged_column("advantages")
        logged = advantages.tolist() if table_index is None else \
            [advantages[i].item() if i >= 0 else 0.0 for i in table_index.tolist()]
        for _ in range(min(len(logged), len(table))):
            table.pop()
        table.extend(logged)
    else:
        values = advantages[(mask > 0) & trained.unsqueeze(1)]
    metrics = trainer.metrics(mode)
    if values.numel():
        metrics["rl/advantages/mean"].append(values.mean().item())
        metrics["rl/advantages/std"].append(values.std().item() if values.numel() > 1 else 0.0)
        metrics["rl/advantages/min"].append(values.min().item())
        metrics["rl/advantages/max"].append(values.max().item())
    if shaped_rewards is not None and bool(trained.any()):
        metrics["rl/shaped_reward/mean"].append(shaped_rewards[trained].mean().item())
