"""The loss of the GRPO trainer's `rl:` path: a compact `_compute_loss` on TRL's
`_get_per_token_logps_and_entropies` (through `trainer.token_logps`, so the shared-prefix forward applies).

`rl_loss` computes the policy-loss entry's per-token loss, multiplies in token-selecting regularizers (the entropy
mask) and TRL's vLLM importance-sampling ratio, adds the other regularizers, weights rows by the samplers' weights
and aggregates with the aggregation entry, normalised for gradient accumulation as TRL normalises the matching
loss_type (postrain.trainers.grpo lists what is reproduced from TRL and where).
"""

from __future__ import annotations

from typing import Any

import torch

from postrain.rl.losses import disco_kl_stats
from postrain.rl.registry import AGGREGATIONS, POLICY_LOSSES, REGULARIZERS
from postrain.rl.regularizers import kl_penalty

# Model inputs besides ids and attention that TRL's batches may carry (vision models); passed through as TRL does.
MODEL_INPUT_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def sampling_logps(trainer, output: dict, with_entropies: bool):
    """Log-probs of the completions under the sampling policy (TRL's `old_per_token_logps` where it computed
    them, else one no-grad forward pass) and, if asked, their per-token entropies."""
    old = output.get("old_per_token_logps")
    if old is not None and not with_entropies:
        return old, None
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    with torch.no_grad():
        logps, entropies, _ = trainer.token_logps(
            trainer.model, ids, attention, output["completion_ids"].size(1),
            batch_size=trainer.args.per_device_train_batch_size, compute_entropy=with_entropies,
            **{k: output[k] for k in MODEL_INPUT_KEYS if k in output})
    return (logps if old is None else old), entropies


def rl_loss(trainer, model, inputs: dict) -> torch.Tensor:
    """The on-policy loss of one micro-batch (TRL's `_compute_loss` contract), logging TRL's `entropy`, `kl` and
    `aux_loss` metrics and the policy-loss entry's own."""
    parts = trainer.rl_parts
    accelerator = trainer.accelerator
    mode = "train" if trainer.model.training else "eval"
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1
    group = trainer.num_generations if mode == "train" else trainer.num_generations_eval

    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    vocab_logps = None
    if parts.policy_loss.variant.needs("vocab_logps"):  # TW-GRPO: the whole next-token distribution
        logps, entropies, vocab_logps, aux_loss = vocab_logps_and_entropies(
            trainer, model, input_ids, attention_mask, completion_ids.size(1))
    else:
        logps, entropies, aux_loss = trainer.token_logps(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=trainer.aux_loss_enabled, **{k: inputs.get(k) for k in MODEL_INPUT_KEYS})
    old = inputs.get("old_per_token_logps")
    vllm_correction = trainer.use_vllm and trainer.vllm_importance_sampling_correction
    rows = {"logps": logps, "entropies": entropies, "mask": mask, "advantages": inputs["advantages"],
            "old_logps": logps.detach() if old is None else old, "ref_logps": inputs.get("ref_per_token_logps"),
            "rewards": inputs.get("rl_rewards"), "weight": inputs.get("rl_weight"),
            "completion_ids": completion_ids, "vocab_logps": vocab_logps,
            # TRL puts pi_old / pi_vllm in every batch where its vLLM correction is on
            "is_ratio": inputs["importance_sampling_ratio"] if vllm_correction else None}
    if "rl_row_index" in inputs:
        rows = whole_groups(rows, inputs["rl_row_index"], group)
    weight = rows.pop("weight")  # samplers' row weights: a row of weight 0 is not trained nor counted
    is_ratio = rows.pop("is_ratio")  # (B, T) or (B, 1): TRL's pi_old / pi_vllm, truncated or masked
    if weight is not None:
        rows["mask"] = rows["mask"] * (weight > 0).unsqueeze(1).to(rows["mask"].dtype)
    logps, entropies, mask, ref = rows["logps"], rows["entropies"], rows["mask"], rows["ref_logps"]

    def global_mean(x: torch.Tensor) -> torch.Tensor:
        totals = accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum().float()]), reduction="sum")
        return totals[0] / totals[1].clamp(min=1.0)

    aggregation = parts.aggregation
    agg_data = aggregation_normalizers(trainer, inputs, mask, weight, mode, accumulation)
    loss_data = {**rows, "group_size": group}
    if parts.policy_loss.variant.needs("kl_stats"):  # DisCO: its KL constraint over every process' rows
        stats = accelerator.reduce(disco_kl_stats(logps, rows["old_logps"], mask), reduction="sum")
        if "num_sequences" in agg_data:  # the rows the aggregation divides by, over processes, per micro-batch
            stats[2] = float(agg_data["num_sequences"]) * accelerator.num_processes / accumulation
        loss_data["kl_stats"] = stats
    per_token, metrics = POLICY_LOSSES.call(parts.policy_loss.name, loss_data,
                                            trainer.part_params(parts.policy_loss))
    # A token-selecting regularizer multiplies the policy loss before any penalty is added (TRL's order for
    # its entropy mask and KL term).
    for part in parts.regularizers:
        if not part.variant.extra.get("selects_tokens"):
            continue
        local = entropies.detach()[mask.bool()].float()
        pool = accelerator.gather(accelerator.pad_across_processes(local, dim=0, pad_index=-1e9))
        keep = REGULARIZERS.call(part.name, {"entropies": entropies.detach(), "mask": mask,
                                             "all_entropies": pool[pool != -1e9]}, trainer.part_params(part))
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
                            "mean_entropy": mean_entropy}, trainer.part_params(part))

    if weight is not None:  # a row drawn w times counts w times (PF-PPO); dropped rows are masked above
        per_token = per_token * weight.to(per_token.dtype).unsqueeze(1)

    loss = AGGREGATIONS.call(aggregation.name, {"per_token_loss": per_token, "mask": mask, **agg_data},
                             trainer.part_params(aggregation))
    logged = trainer.metrics(mode)
    if trainer.aux_loss_enabled:
        loss = loss + trainer.router_aux_loss_coef * aux_loss / accumulation
        logged["aux_loss"].append(accelerator.gather_for_metrics(aux_loss).mean().item())

    logged["entropy"].append(mean_entropy.item())
    if ref is not None:
        logged["kl"].append(global_mean(kl_penalty("k3", logps.detach(), ref, mask)).item())
    for key, value in metrics.items():
        value = torch.as_tensor(value, dtype=torch.float32, device=loss.device).detach().reshape(1)
        logged[key].append(accelerator.gather(value).nanmean().item())
    return loss


def vocab_logps_and_entropies(trainer, model, input_ids, attention_mask, logits_to_keep):
    """Per-token log-probs, entropies and the whole vocabulary's log-probs (N, T, V) at every completion
    position, for a policy loss that reads `vocab_logps` (TW-GRPO), from the model's own unfused forward: TRL's
    fused LM head returns no distribution. The logits are divided by the sampling temperature, as TRL's head
    divides them, so `logps` equal TRL's (tests/test_grpo_trainer.py). Memory: N·T·V float32 values with
    their gradient (about 4.8 GB at N = 16, T = 512, V = 150k), so this suits small models and vocabularies.
    Multimodal inputs and the shared-prefix forward are not used on this path."""
    kwargs = {"output_router_logits": True} if trainer.aux_loss_enabled else {}
    with trainer.accelerator.autocast():
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    logits = outputs.logits[:, -(logits_to_keep + 1):-1].float() / trainer.temperature
    vocab = logits.log_softmax(-1)
    logps = vocab.gather(-1, input_ids[:, -logits_to_keep:].unsqueeze(-1)).squeeze(-1)
    entropies = -(vocab.exp() * vocab).sum(-1)
    return logps, entropies, vocab, (getattr(outputs, "aux_loss", None) if trainer.aux_loss_enabled else None)


def aggregation_normalizers(trainer, inputs, mask, weight, mode: str, accumulation: int) -> dict[str, Any]:
    """The global normalizers the recipe's aggregation reads, scaled as TRL scales its own (see the
    aggregation entries and tests/test_rl_distributed.py)."""
    aggregation = trainer.rl_parts.aggregation
    processes, steps_per_generation = trainer.accelerator.num_processes, trainer.args.steps_per_generation
    agg_data: dict[str, Any] = {}
    if aggregation.variant.needs("global_tokens"):  # TRL's loss_type="dapo" normaliser (weighted by samplers)
        tokens = inputs["num_items_in_batch"].clamp(min=1.0) / processes
        if mode == "train":
            tokens = tokens * accumulation / steps_per_generation
        agg_data["global_tokens"] = tokens
    if aggregation.variant.needs("num_sequences"):
        if weight is None:  # TRL's "grpo" / "dr_grpo": local mean / accumulation
            agg_data["num_sequences"] = mask.size(0) * accumulation
        else:  # the kept rows of the generation batch, scaled as the dapo normaliser (the same value unfiltered)
            agg_data["num_sequences"] = (inputs["rl_num_sequences"].clamp(min=1.0) / processes
                                         * accumulation / steps_per_generation)
    if aggregation.variant.needs("length_weight_sum"):  # this micro-batch's sum, times the accumulation
        alpha = trainer.part_params(aggregation).get("alpha", aggregation.variant.params.get("alpha", 1.0))
        lengths = mask.float().sum(-1)
        weights = torch.where(lengths > 0, lengths.clamp(min=1.0) ** -alpha, torch.zeros_like(lengths))
        if weight is not None:
            weights = weights * weight.to(weights.dtype)
        agg_data["length_weight_sum"] = weights.sum() * accumulation
    return agg_data


def whole_groups(rows: dict[str, Any], row_index: torch.Tensor, group: int) -> dict[str, Any]:
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
