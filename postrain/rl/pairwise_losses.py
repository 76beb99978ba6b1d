"""Policy losses that compare the completions of a group pairwise, against the reference model (catalog rows
re-examined against the authors' code). Rows must hold whole groups (the trainer's check for `group_size`).

Same calling convention as postrain.rl.losses: a per-token loss (N, T), zero at padding, and a metrics dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from postrain.errors import RecipeError
from postrain.rl.losses import off_policy_requirement, spread_over_tokens
from postrain.rl.registry import POLICY_LOSSES
from postrain.rl.regularizers import kl_penalty
from postrain.tensors import grouped, masked, masked_row_mean, token_counts


@POLICY_LOSSES.register(
    "trpa", paper="Trust Region Preference Approximation: A simple and stable reinforcement learning algorithm for "
    "LLM reasoning", arxiv="2504.04524", catalog=("rl:15", "preference:104"),
    notes="checked against the authors' code, XueruiSu/Trust-Region-Preference-Approximation "
          "verl/trainer/ppo/core_algos.py::compute_pairwise_policy_loss (pairs across preference levels within a "
          "group, anisotropy when the better one is at level 1, the fallback without pairs) and "
          "verl/workers/actor/dp_actor.py (use_trkl_loss: + tr_kl_loss_coef x token-mean low_var_kl to pi_old; the "
          "KL to the reference is then not added), main_TRPA.sh (trpa_beta 0.1, trpa_anisotropy 2.5, "
          "tr_kl_loss_coef 0.001, use_sqrt_trkl False). Preference levels are the reward's distinct values, higher "
          "better; the authors' levels come from their rule-based reward (kk.py: level 1 = right format and answer, "
          "score 3), so `top_reward` names the reward of level 1. The authors pair within each micro-batch, whose "
          "rows verl reorders by length over processes and splits by token count (ray_trainer.py, dp_actor.py), so "
          "a group's completions may be scattered; here pairs form within each group of the micro-batch (whole "
          "groups), the pairing compute_pairwise_policy_loss is written for",
    # The trust region compares pi with pi_old: with one update per rollout pi_old is pi and the term is 0 (as in
    # the authors' own run, which recomputes old log-probs with the actor's weights just before its single update).
    requires=(off_policy_requirement("the trust region tr_kl_coef x KL(pi || pi_old)"),),
    # A fact for the GRPO trainer's checks (postrain.rl.section): the mean over the micro-batch's pairs and the trust
    # region's token mean are this process' own, so a batch split over processes does not train as on one.
    one_process="its loss is a mean over the micro-batch's own pairs and tokens, not the gathered batch's")
def trpa(logps, old_logps, ref_logps, rewards, mask, group_size: int, *, beta: float = 0.1, anisotropy: float = 2.5,
         top_reward: float = 1.0, tr_kl_coef: float = 1e-3):
    """TRPA: mean over pairs (w better than l in a group) of −log σ(h), h = c·β·(ρ_w − ρ_l), plus a trust region
    tr_kl_coef · KL(π‖π_old).

    ρ = mean over tokens of log π − log π_ref (the mean-token log-ratio against the reference); c = anisotropy when
    the better completion is at the top level (reward == top_reward), else 1. When no group of the micro-batch has
    two different rewards, the loss is the mean over completions of −log σ(±ρ), + for a top-level completion, −
    otherwise (the authors' fallback). The trust region is verl's low_var_kl (k3 clamped to [−10, 10]) against the
    behaviour policy, averaged over all valid tokens. Returned so that aggregation seq_mean_token_mean gives exactly
    this loss for the micro-batch. Defaults from the authors' script."""
    if beta <= 0 or anisotropy <= 0 or tr_kl_coef < 0:
        raise RecipeError(f"trpa: beta and anisotropy must be > 0 and tr_kl_coef >= 0, got beta={beta!r}, "
                          f"anisotropy={anisotropy!r}, tr_kl_coef={tr_kl_coef!r}")
    n = mask.shape[0]
    rho = masked_row_mean(logps, mask) - masked_row_mean(ref_logps, mask).to(logps.device)
    r = rewards.float().to(rho.device)
    top = r == float(top_reward)
    rho_g, r_g, top_g = grouped(rho, group_size), grouped(r, group_size), grouped(top, group_size)
    better = r_g.unsqueeze(2) > r_g.unsqueeze(1)  # (groups, i, j): completion i beats j
    scale = torch.where(top_g.unsqueeze(2), torch.full_like(rho_g.unsqueeze(2), anisotropy),
                        torch.ones_like(rho_g.unsqueeze(2)))
    h = beta * scale * (rho_g.unsqueeze(2) - rho_g.unsqueeze(1))
    pair_loss = torch.where(better, -F.logsigmoid(h), torch.zeros_like(h))
    pairs = better.sum()
    if int(pairs) > 0:
        # each pair's loss split between its two rows; x n / pairs so that the mean over rows is the mean over pairs
        per_row = 0.5 * (pair_loss.sum(2) + pair_loss.sum(1)).reshape(-1) * (n / pairs.float())
    else:
        sign = torch.where(top, torch.ones_like(rho), -torch.ones_like(rho))
        per_row = -F.logsigmoid(sign * rho)
    kl = kl_penalty("k3", logps, old_logps.to(logps.device), mask).clamp(-10.0, 10.0)
    kl_total = masked(kl, mask).sum()
    # the token mean over the micro-batch, carried by the rows: x n / all tokens
    per_row = per_row + tr_kl_coef * masked(kl, mask).sum(-1) * (n / token_counts(mask).sum().clamp(min=1.0))
    metrics = {"trpa/pairs": pairs.float().detach(),
               "trpa/tr_kl": (kl_total / token_counts(mask).sum().clamp(min=1.0)).detach(),
               "trpa/log_ratio_mean": rho.detach().mean()}
    return spread_over_tokens(per_row, mask), metrics
