"""RePO replay (`rl.samplers: [repo_replay]`) in the GRPO trainer: a per-prompt buffer of past samples and the
off-policy loss term over the samples it replays.

RePO (arXiv 2506.09340; SihengLi99/RePO src/replay_grpo_trainer.py) trains on J_on + c * J_off: J_on is GRPO
over the G on-policy samples of a prompt, J_off the same clipped objective over R samples of that prompt drawn
from a buffer of its past samples, with their stored behaviour log-probs in the ratio and their advantages
normalised among the R replayed samples only ("split"). Per generation batch (training only):

  1. select   before this step's samples enter the buffer (the authors' order), each prompt whose buffer holds
              at least min_buffer_size samples replays min(size, num_replays) of them, chosen by the
              `repo_replay` entry (postrain.rl.samplers) from the buffered rewards (random_k: seeded draws, the
              same on every process);
  2. advantage the recipe's `rl.advantage` on each prompt's replayed rewards as one group (`grpo`: the paper's
              split normalisation, (r - mean) / (std + 1e-4) over the R replayed rewards);
  3. attach   prompt p's j-th replayed sample rides on the on-policy row p*G + (j mod G) of the generation batch,
              slot j div G, as the extra per-row tensors `rl_replay_*` (rows, slots, tokens): TRL's shuffle and
              split index dim 0 only, so every replayed sample stays in the micro-batch of a row of its prompt,
              whose prompt ids it shares;
  4. store    every on-policy sample of the batch (gathered from all processes; an unscorable one excepted)
              enters its prompt's buffer: completion ids, completion mask and behaviour per-token log-probs
              (TRL's old_per_token_logps, else a no-grad forward at generation time) and its raw reward (the
              weighted sum of the reward functions); the buffer keeps each prompt's last max_buffer_size.

In the loss, each micro-batch with replayed samples runs one more forward of the current policy on them (with
their prompt), the recipe's policy loss (ppo_clip: the paper's clip 0.2) against the stored behaviour log-probs
and the split advantages, and the recipe's aggregation over the replayed samples of the whole generation batch
(token_mean: their tokens; the sequence means: their count), as the on-policy term is aggregated over its own
rows; loss = L_on + off_policy_loss_coef * L_off. Regularizers (KL) apply to the on-policy term only, as in the
authors' code. Where the buffers hold replayed samples for any prompt of the batch every process runs that
forward in every micro-batch (on one masked row where its micro-batch has none), so sharded models see the same
forwards everywhere.

Differences from the authors' code, all where it cannot run as written: a prompt that has replays while another
of the batch has none (their merge assumes every prompt replays the same count); unscorable samples (every
reward None) do not enter the buffer (theirs rank them by a NaN sum); `highest_k` ranks by the weighted reward
(theirs by the unweighted sum over reward functions: the same with one reward function of weight 1). Their loss
type `grpo` divides both terms by the micro-batch's on- plus off-policy row count, i.e. (G L_on + R L_off) / (G
+ R); postrain normalises each term over its own rows, as the paper's objective writes it. Their "mixed"
normalisation (one group of G + R) is not implemented.

The buffer is saved beside every checkpoint (rl_replay.pt, postrain.trainers.grpo_state) and restored on resume.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from accelerate.utils import gather_object

from postrain.rl.registry import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES, SAMPLERS
from postrain.rl.section import Part, RLParts
from postrain.trainers.grpo_advantages import raw_rewards
from postrain.trainers.grpo_loss import MODEL_INPUT_KEYS, sampling_logps
from postrain.trainers.grpo_state import prompt_key

# random_k's draws: a generator seeded by the run seed, the generation counter and this offset (not the noise's).
REPLAY_SEED_OFFSET = 700_001


class ReplayBuffer:
    """Each prompt's last `capacity` samples (oldest first): completion ids, mask, behaviour log-probs (1-D
    tensors cut after the last completion token, on the CPU) and reward."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.entries: dict[str, list[dict[str, Any]]] = {}

    def add(self, key: str, ids: torch.Tensor, mask: torch.Tensor, logps: torch.Tensor, reward: float) -> None:
        valid = torch.nonzero(mask).flatten()
        length = int(valid[-1]) + 1 if valid.numel() else 0
        queue = self.entries.setdefault(key, [])
        queue.append({"ids": ids[:length].detach().cpu().long(), "mask": mask[:length].detach().cpu().long(),
                      "logps": logps[:length].detach().cpu().float(), "reward": float(reward)})
        del queue[:-self.capacity]

    def rewards(self, keys: list[str]) -> torch.Tensor:
        """(len(keys), capacity) float32: each key's buffered rewards, oldest first, NaN after them."""
        out = torch.full((len(keys), self.capacity), float("nan"))
        for i, key in enumerate(keys):
            queue = self.entries.get(key, [])
            out[i, :len(queue)] = torch.tensor([e["reward"] for e in queue])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "entries": self.entries}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = int(state["capacity"])
        self.entries = {k: [dict(e) for e in queue] for k, queue in state["entries"].items()}


def replay_part(parts: RLParts | None) -> Part | None:
    return None if parts is None else parts.sampler_at("replay")


def new_buffer(part: Part | None) -> ReplayBuffer | None:
    return None if part is None else ReplayBuffer(_params(part)["max_buffer_size"])


def _params(part: Part) -> dict[str, Any]:
    return {**part.variant.params, **part.params}


# --- generation: select, attach, store ------------------------------------------------------------------------

def attach_replays(trainer, inputs: list[dict], output: dict) -> dict:
    """The generation batch `output` (this process' rows, advantages already replaced) with each prompt's replayed
    samples attached to its rows; then this batch's samples enter the buffers."""
    part, buffer = trainer.rl_replay_part, trainer.rl_replay_buffer
    # replayed samples carry their completion ids and masks only (no images, no tool masks)
    if "tool_mask" in output or any(output.get(k) is not None for k in MODEL_INPUT_KEYS):
        raise RuntimeError("sampler 'repo_replay' stores completion ids and masks only: it supports neither tool "
                           "masks nor multimodal inputs")
    group, metrics = trainer.num_generations, trainer.metrics("train")
    n_local = output["completion_ids"].size(0)
    keys = gather_object([prompt_key(x.get("prompt")) for x in inputs])
    if len(keys) % group or any(len(set(keys[g:g + group])) != 1 for g in range(0, len(keys), group)):
        raise RuntimeError("sampler 'repo_replay' needs the generation batch in groups of num_generations rows of "
                           "one prompt each (TRL's RepeatSampler order)")
    group_keys = keys[::group]

    buffer_rewards = buffer.rewards(group_keys)
    generation = trainer.rl_state.counters.get("generations", 0)
    generator = torch.Generator().manual_seed(int(trainer.args.seed) * 1_000_003 + generation + REPLAY_SEED_OFFSET)
    draws = torch.rand(buffer_rewards.shape, generator=generator)
    chosen = SAMPLERS.call(part.name, {"buffer_rewards": buffer_rewards, "draws": draws}, part.params)
    selected = [torch.nonzero(chosen[p]).flatten().tolist() for p in range(len(group_keys))]
    advantages = replay_advantages(trainer, [buffer_rewards[p, s] for p, s in enumerate(selected)])
    total = sum(len(s) for s in selected)
    metrics["rl/replay/replayed"].append(float(total))
    metrics["rl/replay/prompts_replayed"].append(sum(1.0 for s in selected if s) / len(selected))
    metrics["rl/replay/buffer_size"].append((~torch.isnan(buffer_rewards)).sum(-1).float().mean().item())

    if total:
        output.update(_replay_rows(trainer, group_keys, selected, advantages, n_local, group,
                                   output["completion_ids"].device))
    _store(trainer, keys, output)
    return output


def replay_advantages(trainer, rewards: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each prompt's replayed rewards -> their advantages by the recipe's advantage entry, the prompt's replayed
    samples as one group (one call over every prompt when all replay the same count, else a call per prompt)."""
    part = trainer.rl_parts.advantage
    params = trainer.part_params(part)
    sizes = {r.numel() for r in rewards if r.numel()}
    if not sizes:
        return [r.clone() for r in rewards]
    if len(sizes) == 1:
        flat = torch.cat([r for r in rewards if r.numel()])
        values = ADVANTAGES.call(part.name, {"rewards": flat, "group_size": sizes.pop()}, params).float()
        parts = iter(torch.split(torch.nan_to_num(values, nan=0.0), [r.numel() for r in rewards if r.numel()]))
        return [next(parts) if r.numel() else r.clone() for r in rewards]
    return [torch.nan_to_num(ADVANTAGES.call(part.name, {"rewards": r, "group_size": r.numel()}, params).float(),
                             nan=0.0) if r.numel() else r.clone() for r in rewards]


def _replay_rows(trainer, group_keys, selected, advantages, n_local: int, group: int, device) -> dict:
    """The `rl_replay_*` tensors of this process' rows: (rows, slots, tokens) ids, mask and behaviour log-probs,
    (rows, slots) advantages and validity; and the replayed tokens and samples of the whole batch (scalars)."""
    buffer = trainer.rl_replay_buffer
    entries = [[buffer.entries[group_keys[p]][i] for i in s] for p, s in enumerate(selected)]
    slots = max(math.ceil(len(s) / group) for s in selected)
    width = max(1, max(e["ids"].numel() for es in entries for e in es))
    ids = torch.full((n_local, slots, width), int(trainer.pad_token_id), dtype=torch.long)
    mask = torch.zeros((n_local, slots, width), dtype=torch.long)
    logps = torch.zeros((n_local, slots, width))
    adv = torch.zeros((n_local, slots))
    valid = torch.zeros((n_local, slots), dtype=torch.bool)
    first = trainer.accelerator.process_index * n_local
    tokens = 0
    for p, es in enumerate(entries):
        for j, e in enumerate(es):
            tokens += int(e["mask"].sum())
            row, slot, n = p * group + j % group - first, j // group, e["ids"].numel()
            if 0 <= row < n_local:
                ids[row, slot, :n], mask[row, slot, :n], logps[row, slot, :n] = e["ids"], e["mask"], e["logps"]
                adv[row, slot], valid[row, slot] = advantages[p][j], True
    out = {"rl_replay_ids": ids, "rl_replay_mask": mask, "rl_replay_logps": logps,
           "rl_replay_advantages": adv, "rl_replay_valid": valid}
    out = {k: v.to(device) for k, v in out.items()}
    out["rl_replay_num_items"] = torch.tensor(float(tokens), device=device)
    out["rl_replay_num_sequences"] = torch.tensor(float(sum(len(s) for s in selected)), device=device)
    return out


def _store(trainer, keys: list[str], output: dict) -> None:
    """Every on-policy sample of the batch (all processes) into its prompt's buffer, in gathered row order."""
    behaviour, _ = sampling_logps(trainer, output, with_entropies=False)
    ids = trainer.gather_rows(output["completion_ids"]).cpu()
    mask = trainer.gather_rows(output["completion_mask"]).cpu()
    logps = trainer.gather_rows(behaviour.detach().float()).cpu()
    per_func = trainer.rl_rewards_per_func
    unscorable = torch.isnan(per_func).all(dim=1).cpu()
    rewards = raw_rewards(per_func, trainer.reward_weights, trainer.num_generations).cpu()
    for i, key in enumerate(keys):
        if not bool(unscorable[i]):
            trainer.rl_replay_buffer.add(key, ids[i], mask[i], logps[i], rewards[i].item())


# --- loss -------------------------------------------------------------------------------------------------------

def replay_loss(trainer, model, inputs: dict, mode: str, accumulation: int) -> torch.Tensor:
    """off_policy_loss_coef * L_off over the replayed samples riding on this micro-batch's rows."""
    parts, part = trainer.rl_parts, trainer.rl_replay_part
    valid = inputs["rl_replay_valid"]
    row, slot = torch.nonzero(valid, as_tuple=True)
    empty = row.numel() == 0
    if empty:  # still one forward (masked out), so that every process runs the same forwards
        row, slot = torch.zeros(1, dtype=torch.long, device=valid.device), torch.zeros_like(row[:1])
    completion_ids, mask = inputs["rl_replay_ids"][row, slot], inputs["rl_replay_mask"][row, slot]
    if empty:
        mask = torch.zeros_like(mask)
    input_ids = torch.cat([inputs["prompt_ids"][row], completion_ids], dim=1)
    attention = torch.cat([inputs["prompt_mask"][row], mask], dim=1)
    logps, _, _ = trainer.token_logps(
        model, input_ids, attention, completion_ids.size(1), batch_size=trainer.args.per_device_train_batch_size)
    data = {"logps": logps, "old_logps": inputs["rl_replay_logps"][row, slot], "mask": mask,
            "advantages": inputs["rl_replay_advantages"][row, slot]}
    per_token, loss_metrics = POLICY_LOSSES.call(parts.policy_loss.name, data,
                                                 trainer.part_params(parts.policy_loss))
    if empty:  # 0, with a graph through the forward
        off = logps.sum() * 0.0
    else:
        agg_data = _normalizers(trainer, inputs, mask, mode, accumulation)
        off = AGGREGATIONS.call(parts.aggregation.name, {"per_token_loss": per_token, "mask": mask, **agg_data},
                                trainer.part_params(parts.aggregation))
    logged = trainer.metrics(mode)
    logged["rl/replay/off_policy_loss"].append(trainer.accelerator.gather(off.detach().reshape(1)).mean().item())
    logged["rl/replay/rows"].append(float(0 if empty else row.numel()))
    if not empty:
        for key, value in loss_metrics.items():
            value = torch.as_tensor(value, dtype=torch.float32, device=off.device).detach().reshape(1)
            logged[f"rl/replay/{key}"].append(value.nanmean().item())
    return _params(part)["off_policy_loss_coef"] * off


def _normalizers(trainer, inputs: dict, mask: torch.Tensor, mode: str, accumulation: int) -> dict[str, Any]:
    """The aggregation's normalizers over the replayed samples of the generation batch, scaled as the on-policy
    term's (postrain.trainers.grpo_loss.aggregation_normalizers with sampler weights): per process and micro-batch."""
    aggregation = trainer.rl_parts.aggregation
    processes = trainer.accelerator.num_processes
    scale = accumulation / trainer.args.steps_per_generation if mode == "train" else 1.0
    data: dict[str, Any] = {}
    if aggregation.variant.needs("global_tokens"):
        data["global_tokens"] = inputs["rl_replay_num_items"].clamp(min=1.0) / processes * scale
    if aggregation.variant.needs("num_sequences"):
        data["num_sequences"] = inputs["rl_replay_num_sequences"].clamp(min=1.0) / processes * scale
    if aggregation.variant.needs("length_weight_sum"):
        alpha = trainer.part_params(aggregation).get("alpha", aggregation.variant.params.get("alpha", 1.0))
        lengths = mask.float().sum(-1)
        weights = torch.where(lengths > 0, lengths.clamp(min=1.0) ** -alpha, torch.zeros_like(lengths))
        data["length_weight_sum"] = weights.sum().clamp(min=1e-12) * accumulation
    return data
