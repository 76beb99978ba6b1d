"""DAPO's refill in the GRPO trainer (a group sampler with `refill=True`: dynamic_sampling, online_difficulty,
recent_sample_recovery): generate more groups until the generation batch holds enough kept ones, and pool them.

Each round is TRL's own generation (`trainer.generate_and_score`) on the next batch of the refill stream, a second
pass over the training set (TRL's RepeatSampler, another seed: `trainer.refill_dataloader`). The rounds' rows are
gathered from every process, the batch is assembled from whole kept groups and each process takes its slice, as TRL
slices. A pooled batch is a dict of per-row tensors of the whole generation batch (every process' rows, gathered):
prompt columns left-padded, completion columns right-padded, as TRL pads them.
"""

from __future__ import annotations

from typing import Any

import torch

from postrain.rl.section import Part
from postrain.trainers.grpo_advantages import group_keep, raw_rewards
from postrain.trainers.grpo_loss import MODEL_INPUT_KEYS
from postrain.trainers.grpo_state import prompt_keys

# Columns TRL left-pads (prompts); every other per-row column is right-padded.
LEFT_PADDED = frozenset({"prompt_ids", "prompt_mask"})
# The refill stream's sampler seed is the run seed plus this, so it does not replay the main loop's prompt order.
REFILL_SEED_OFFSET = 1


def pad_columns(x: torch.Tensor, width: int, *, left: bool, value: float) -> torch.Tensor:
    """(N, T, ...) -> (N, width, ...), padding on the left or the right with `value`."""
    extra = width - x.size(1)
    if extra <= 0:
        return x
    pad = torch.full((x.size(0), extra, *x.shape[2:]), value, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def cat_batches(batches: list[dict[str, torch.Tensor]], pad_values: dict[str, float]) -> dict[str, torch.Tensor]:
    """Pooled batches with the same columns, one after the other; 2-D+ columns padded to the widest."""
    keys = batches[0].keys()
    for b in batches[1:]:
        if b.keys() != keys:
            raise RuntimeError(f"generation rounds returned different columns: {sorted(keys)} vs {sorted(b.keys())}")
    out = {}
    for key in keys:
        parts = [b[key] for b in batches]
        if parts[0].dim() >= 2:
            width = max(p.size(1) for p in parts)
            parts = [pad_columns(p, width, left=key in LEFT_PADDED, value=pad_values.get(key, 0)) for p in parts]
        out[key] = torch.cat(parts, dim=0)
    return out


def take_rows(batch: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[index.to(v.device)] for k, v in batch.items()}


def group_rows(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Row indices of the given group indices, each group's rows contiguous, in the order of `groups`."""
    return (groups.view(-1, 1) * group_size + torch.arange(group_size, device=groups.device)).view(-1)


def pad_value(key: str, pad_token_id: int) -> float:
    """What a pooled column is padded with: TRL's pad token for ids, exp(0) for the vLLM importance-sampling
    ratio (TRL's own value past a completion's end, masked out anyway), else 0."""
    if key == "importance_sampling_ratio":
        return 1.0
    return pad_token_id if key in ("prompt_ids", "completion_ids") else 0


def pool(trainer, part: Part, output: dict) -> dict[str, torch.Tensor]:
    """The generation batch's per-row columns from every process (gathered, padded to one width)."""
    accelerator = trainer.accelerator
    n = output["completion_ids"].size(0)
    pooled = {}
    for key, value in output.items():
        if key in ("advantages", "num_items_in_batch") or value is None:
            continue
        if key in MODEL_INPUT_KEYS or not (isinstance(value, torch.Tensor) and value.dim() >= 1
                                           and value.size(0) == n):
            raise RuntimeError(f"sampler {part.name!r} pools generation batches, which it cannot do with the batch "
                               f"column {key!r} (multimodal inputs are not supported)")
        if value.dim() >= 2:
            value = accelerator.pad_across_processes(value, dim=1, pad_index=pad_value(key, trainer.pad_token_id),
                                                     pad_first=key in LEFT_PADDED)
        pooled[key] = accelerator.gather(value)
    return pooled


def refill(trainer, part: Part, output: dict, keys: list[str] | None):
    """DAPO dynamic sampling (and RSR): generate more batches until enough groups are kept or the sampler's
    max_num_gen_batches rounds were generated; returns this process' rows of the assembled batch, their prompt ids,
    and for each row TRL logged this step its position in the batch (-1: not trained). Sets
    `trainer.rl_rewards_per_func` to the assembled batch's and, for a `recovers=True` sampler,
    `trainer.rl_recovered` to the kept groups beyond it."""
    accelerator, metrics = trainer.accelerator, trainer.metrics("train")
    group = trainer.num_generations
    n_local = output["completion_ids"].size(0)
    target = n_local * accelerator.num_processes // group
    max_rounds = part.value("max_num_gen_batches")
    pooled, per_func, pool_keys = [pool(trainer, part, output)], [trainer.rl_rewards_per_func], [keys]
    buffered = 0
    if trainer.rl_recovered is not None:  # RSR: last step's surplus groups come first
        buffered = trainer.rl_recovered["rewards_per_func"].size(0)
        pooled.insert(0, trainer.rl_recovered["batch"])
        per_func.insert(0, trainer.rl_recovered["rewards_per_func"])
        pool_keys.insert(0, trainer.rl_recovered["keys"])
    rounds = 1
    while True:
        keep = group_keep(part, raw_rewards(torch.cat(per_func), trainer.reward_weights, group), group, target)
        if int(keep.sum()) >= target or (max_rounds and rounds >= max_rounds):
            break
        batch = trainer.rl_refill.next_batch()
        batch_keys = prompt_keys(trainer.rl_parts, batch)
        more = trainer.generate_and_score(batch)
        pooled.append(pool(trainer, part, more))
        per_func.append(trainer.rl_rewards_per_func)
        pool_keys.append(batch_keys)
        rounds += 1

    pool_batch = cat_batches(pooled, {k: pad_value(k, trainer.pad_token_id) for k in pooled[0]})
    all_per_func = torch.cat(per_func)
    all_keys = None if keys is None else [k for ks in pool_keys for k in ks]
    kept = torch.nonzero(keep).flatten()
    chosen = kept[:target]
    short = target - chosen.numel()
    if short:  # train on what there is: dropped groups fill the batch with weight 0
        chosen = torch.cat([chosen, torch.nonzero(~keep).flatten()[:short]])
    if part.recovers:
        surplus = group_rows(kept[target:], group)
        trainer.rl_recovered = None if surplus.numel() == 0 else {
            "batch": take_rows(pool_batch, surplus), "rewards_per_func": all_per_func[surplus],
            "keys": None if all_keys is None else [all_keys[i] for i in surplus.tolist()]}
        metrics["rl/sampler/recovered_groups"].append(float(surplus.numel() // group))
    metrics["rl/sampler/gen_batches"].append(float(rounds))
    metrics["rl/sampler/short_groups"].append(float(short))
    metrics[f"rl/sampler/{part.name}/kept_groups"].append(keep.float().mean().item())  # of all pooled groups

    rows = group_rows(chosen, group)
    position = torch.full((all_per_func.size(0),), -1, dtype=torch.long, device=rows.device)
    position[rows] = torch.arange(rows.numel(), device=rows.device)
    mine = rows[accelerator.process_index * n_local:(accelerator.process_index + 1) * n_local]
    trainer.rl_rewards_per_func = all_per_func[rows]
    assembled = {**take_rows(pool_batch, mine), "advantages": None, "num_items_in_batch": None}
    return assembled, None if all_keys is None else [all_keys[i] for i in rows.tolist()], position[buffered:]


class RefillStream:
    """Endless generation batches (this process' rows) over the training set, for refills (and GRESO's
    replacements): `trainer.refill_dataloader()`, each batch once. Its position is the counter `refill_batches` of
    the trainer's PromptState, so a resumed run continues the stream; the global RNG is left untouched (the
    DataLoader draws a base seed from it), so a refill does not change the main loop's sampling."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.batches = None

    def next_batch(self) -> list[dict[str, Any]]:
        drawn = self.trainer.rl_state.count("refill_batches")
        with torch.random.fork_rng(devices=[]):
            if self.batches is None:
                self.batches = self._batches(skip=drawn)
            return next(self.batches)

    def restart(self) -> None:
        """Continue from the counter on the next batch (after a checkpoint was loaded)."""
        self.batches = None

    def _batches(self, skip: int):
        loader = self.trainer.refill_dataloader()
        seen = 0
        while True:
            epoch_batches = 0
            for batch in loader:
                epoch_batches += 1
                seen += 1
                if seen > skip:
                    yield batch
            if epoch_batches == 0:
                args = self.trainer.args
                raise RuntimeError(f"the training set has fewer prompts than one generation batch "
                                   f"({args.generation_batch_size // self.trainer.num_generations}), so the refill "
                                   f"stream is empty")
