"""Policy losses that weight each completion token from the whole group (catalog rows re-examined against the
authors' code): TW-GRPO from the group's next-token distributions, GTPO from the group's token ids.

Same calling convention as postrain.rl.losses: per-token loss (N, T), zero at padding, and a metrics dict; rows are
whole groups of `group_size` contiguous completions (the trainer restores generation order, see
postrain.trainers.grpo_loss.whole_groups). Two inputs the GRPO trainer provides for these entries only:
  vocab_logps     (N, T, V) log π(·| prompt, o_<t) over the whole vocabulary at every completion position, with the
                  gradient (TW-GRPO);
  completion_ids  (N, T) the completion token ids (GTPO).
"""

from __future__ import annotations

import math

import torch

from postrain.errors import RecipeError
from postrain.rl.losses import CLIP_HIGH, CLIP_LOW, GROUP, advantages_2d, clip_metrics, masked_log_ratio, off_policy_requirement, \
    ppo_terms, seq_adv, seq_mean
from postrain.rl.registry import POLICY_LOSSES
from postrain.tensors import grouped, masked, token_counts


# --- TW-GRPO ---------------------------------------------------------------------------------------------------

def tw_grpo_token_weights(vocab_logps: torch.Tensor, mask: torch.Tensor, group_size: int,
                          max_weight: float) -> torch.Tensor:
    """TW-GRPO's weight of each position, shared by the completions of a group (N, T), 0 at padding.

    Per group and position t: the log-distributions of the completions (the uniform distribution where a completion
    has ended), their mean ℓ̄ in log space, and d_i = ℓ̄ − ℓ_i clamped to [−11, 11]; the position's divergence is
    mean_i Σ_v (e^{d_i} − d_i − 1). Min-max normalised over the group's positions (up to its longest completion)
    and mapped onto [1, max_weight]."""
    n, t, vocab = vocab_logps.shape
    g = int(group_size)
    logps = grouped(vocab_logps.float(), g)  # (P, G, T, V)
    valid = grouped(mask.bool(), g)  # (P, G, T)
    uniform = torch.full((), -math.log(vocab), device=logps.device)
    filled = torch.where(valid.unsqueeze(-1), logps, uniform)
    diff = (filled.mean(1, keepdim=True) - filled).clamp(-11.0, 11.0)
    divergence = (torch.exp(diff) - diff - 1).sum(-1).mean(1)  # (P, T)
    # positions where some completion of the group is still running: the authors' batch is one group padded to
    # its longest completion, so that is the span their min-max sees
    span = valid.any(1)  # (P, T)
    big = torch.finfo(divergence.dtype).max
    low = torch.where(span, divergence, torch.full_like(divergence, big)).min(1, keepdim=True).values
    high = torch.where(span, divergence, torch.full_like(divergence, -big)).max(1, keepdim=True).values
    low, high = torch.where(span.any(1, keepdim=True), low, 0.0), torch.where(span.any(1, keepdim=True), high, 0.0)
    normalised = (divergence - low) / (high - low + 1e-8)
    weights = 1.0 + (max_weight - 1.0) * normalised  # (P, T)
    return masked(weights.unsqueeze(1).expand(-1, g, -1).reshape(n, t), mask)


@POLICY_LOSSES.register(
    "tw_grpo", paper="Reinforcing Video Reasoning with Focused Thinking", arxiv="2505.24718", catalog="rl:71",
    requires=(GROUP, off_policy_requirement("the clip of the ratio pi / pi_old to [1 - epsilon, 1 + epsilon_high]")),
    conventions=(CLIP_LOW, CLIP_HIGH),
    notes="checked against the authors' longmalongma/TW-GRPO src/open_r1/trainer/grpo_trainer.py: "
          "compute_token_importance_kl_logs_uniform (the weights, from the full log-softmax of every completion "
          "position, not detached: the gradient also flows through the weights, as there) and compute_loss "
          "loss_type 'tw_grpo' (the PPO clip with epsilon_low 0.2 / epsilon_high 0.28 set in __init__, times the "
          "weights; the loss sum(w l mask) / sum(mask) is aggregation token_mean); scripts/tw-grpo.sh alpha 1.70. "
          "The authors' batch is one prompt's group padded to its longest completion, so their min-max runs over "
          "that group's positions; here each group's min-max runs over the positions up to its own longest "
          "completion, whatever else the micro-batch holds. The vocabulary log-probs come from the logits divided "
          "by the sampling temperature, as the token log-probs TRL computes (the authors' are undivided; equal at "
          "temperature 1.0, the authors' generate_temperature)")
def tw_grpo(logps, old_logps, advantages, mask, vocab_logps, group_size: int, *, alpha: float = 1.7,
            epsilon: float = 0.2, epsilon_high: float = 0.28):
    """TW-GRPO: l_it = −min(r A, clip(r) A)·w_t, w_t ∈ [1, alpha] from how far the group's next-token distributions
    at position t spread out.

    Positions where the completions of a group disagree most about what comes next (the reasoning-critical ones)
    weigh up to alpha times the rest; each position's weight is shared by the group's completions. Needs the whole
    vocabulary's log-probs at every completion position (`vocab_logps`, N × T × V: the trainer runs an unfused
    forward for it) and whole groups. alpha 1.7 from the authors' scripts/tw-grpo.sh; the clip 0.2 / 0.28 is
    theirs too (it acts only off-policy; their runs take one update per rollout)."""
    if alpha < 1:
        raise RecipeError(f"tw_grpo: alpha is the largest token weight (weights run from 1 to alpha) and must be "
                          f">= 1, got {alpha!r}")
    if vocab_logps.dim() != 3 or vocab_logps.shape[:2] != mask.shape:
        raise ValueError(f"tw_grpo: vocab_logps must be (N, T, V) matching mask {tuple(mask.shape)}, got "
                         f"{tuple(vocab_logps.shape)}")
    weights = tw_grpo_token_weights(vocab_logps, mask, group_size, alpha)
    ratio = torch.exp(masked_log_ratio(logps, old_logps, mask))
    loss, low, high = ppo_terms(ratio, advantages_2d(advantages, mask), 1 - epsilon, 1 + epsilon_high)
    metrics = clip_metrics(ratio, mask, low, high)
    valid = mask.bool()
    metrics["tw_grpo/weight_mean"] = weights.detach()[valid].mean() if valid.any() else torch.tensor(1.0)
    return masked(loss * weights, mask), metrics


# --- GTPO ------------------------------------------------------------------------------------------------------

def _right_aligned(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Row i of (N, T) read from its last valid position backwards: out[i, r] = x[i, len_i − 1 − r] (r < len_i)."""
    t = x.shape[1]
    r = torch.arange(t, device=x.device).unsqueeze(0)
    index = (lengths.unsqueeze(1) - 1 - r).clamp(min=0)
    return x.gather(1, index)


def _shared_run(ids: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Per group (G, T): tokens that some positive and some negative completion of the group carry at the same
    position, kept only along each completion's initial run of such tokens (from its first position on)."""
    same = (ids.unsqueeze(1) == ids.unsqueeze(0)) & valid.unsqueeze(0)  # [i, j, t]: j has i's token at t
    in_pos = (same & pos.view(1, -1, 1)).any(1)
    in_neg = (same & neg.view(1, -1, 1)).any(1)
    shared = in_pos & in_neg & valid & (pos | neg).unsqueeze(1)
    return torch.cumprod(shared.int(), dim=1).bool()


def gtpo_token_weights(completion_ids: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, group_size: int,
                       conflict_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GTPO's conflict weights δ (N, T) and each completion's count of conflict tokens (N,), as the authors'
    build_conflict_mask: conflict tokens are the initial runs, from the start and from the end of each completion,
    of tokens a positive- and a negative-advantage completion share at the same position (from the end: counted
    from each completion's last token). A conflict token weighs conflict_weight in a positive completion and 0 in a
    negative one (from both ends: the product); other tokens 1. Completions with advantage 0 keep 1 everywhere."""
    g = int(group_size)
    valid = mask.bool()
    lengths = token_counts(mask).long()
    adv = seq_adv(advantages)
    weights, counts = [], []
    for ids_g, valid_g, len_g, adv_g in zip(grouped(completion_ids, g), grouped(valid, g), grouped(lengths, g),
                                            grouped(adv, g)):
        pos, neg = adv_g > 0, adv_g < 0
        forward = _shared_run(ids_g, valid_g, pos, neg)
        rev_ids, rev_valid = _right_aligned(ids_g, len_g), _right_aligned(valid_g.int(), len_g).bool()
        rev_valid = rev_valid & (torch.arange(ids_g.shape[1], device=ids_g.device) < len_g.unsqueeze(1))
        backward_rev = _shared_run(rev_ids, rev_valid, pos, neg)
        backward = _right_aligned(backward_rev.int(), len_g).bool() & valid_g  # back to forward order
        conflict_w = (pos.float() * float(conflict_weight)).unsqueeze(1).expand_as(forward)  # negative: 0
        one = torch.ones_like(conflict_w)
        delta = torch.where(forward, conflict_w, one) * torch.where(backward, conflict_w, one)
        weights.append(torch.where(valid_g, delta, torch.zeros_like(delta)))
        active = pos | neg
        count = ((forward | backward) & valid_g).sum(1).clamp(min=1)
        counts.append(torch.where(active, count, torch.ones_like(count)))
    return torch.cat(weights), torch.cat(counts).float()


@POLICY_LOSSES.register(
    "gtpo", paper="GTPO: Trajectory-Based Policy Optimization in Large Language Models", arxiv="2508.03772",
    catalog="rl:69", requires=(GROUP,), advantages="per_sequence",  # its A'_i is one value per completion
    notes="checked against the authors' winstonsmith1897/GTPO gtpo/gtpo_training.py, the path their trainer runs by "
          "default (GTPO_accumulated_loss -> UnslothEfficientGTPO.forward): build_conflict_mask (forward and "
          "reversed initial runs of shared position-token pairs, W_RAW 2.0), the entropy filter and shaping "
          "(ENT_THRESHOLD 0.7, ENT_SCALE 0.1: A' = A - 0.1 H if H <= 0.7 else 0, H the completion's mean "
          "next-token entropy), gtpo_compute_loss (ratio pi / sg(pi) = 1, no old policy, per completion the token "
          "mean divided by its count of conflict tokens). Padding is told by the mask (the authors compare ids "
          "with PAD_ID 128004 and count padding as positions); the authors sum the completions' losses where "
          "aggregation seq_mean_token_mean averages them (a constant factor, the group size per device). The "
          "README's formula differs from the code (1/G, no division by the conflict count, an entropy test "
          "against the initial entropy and ln 2); the code is followed")
def gtpo(logps, advantages, mask, entropies, completion_ids, group_size: int, *, entropy_threshold: float = 0.7,
         entropy_scale: float = 0.1, conflict_weight: float = 2.0):
    """GTPO: l_it = −(π/sg(π))·A'_i·δ_it / n_i; δ protects the tokens that positive and negative completions of a
    group share at the start or end of the completion (conflict tokens: ×conflict_weight in a positive completion,
    0 in a negative one), n_i counts a completion's conflict tokens (at least 1).

    A'_i = A_i − entropy_scale·H_i for a completion whose mean token entropy H_i is at most entropy_threshold, else
    0 (a high-entropy completion is not trained on). On-policy by construction: the ratio is π over its own
    detached value, as in the authors' loss, so it reads no old log-probs. Needs the completion token ids and whole
    groups. Defaults from the authors' config.yaml (ent_threshold 0.7, ent_scale 0.1, w_raw 2.0)."""
    if conflict_weight < 0 or entropy_scale < 0 or entropy_threshold < 0:
        raise RecipeError(f"gtpo: conflict_weight, entropy_scale and entropy_threshold must be >= 0, got "
                          f"{conflict_weight!r}, {entropy_scale!r}, {entropy_threshold!r}")
    delta, counts = gtpo_token_weights(completion_ids, mask, advantages, group_size, conflict_weight)
    entropy = seq_mean(masked(entropies.detach(), mask), mask)
    adv = seq_adv(advantages)
    shaped = torch.where(entropy <= entropy_threshold, adv - entropy_scale * entropy, torch.zeros_like(adv))
    ratio = torch.exp(masked(logps, mask) - masked(logps, mask).detach())
    loss = -(ratio * (shaped / counts).unsqueeze(1) * delta)
    valid = mask.bool()
    metrics = {"gtpo/conflict_fraction": ((delta != 1) & valid).float().sum() / valid.float().sum().clamp(min=1.0),
               "gtpo/filtered_fraction": (entropy > entropy_threshold).float().mean(),
               "gtpo/entropy_mean": entropy.mean()}
    return masked(loss, mask), {k: v.detach() for k, v in metrics.items()}
