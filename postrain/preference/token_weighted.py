"""Pairwise losses on token-weighted sums of log-probs (catalog rows re-examined against the authors' code).

Inputs follow the preference registry's convention, with per-token log-probs (B, T) of policy and reference, the
completion masks, and token-level inputs the DPO trainer computes from the pair's token ids
(postrain.trainers.token_level). float32 throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from postrain.errors import RecipeError
from postrain.preference.registry import PREFERENCE
from postrain.tensors import masked


def bmc_weighted_logps(token_logps, mask, diff_mask, delta: float) -> torch.Tensor:
    """Σ_t w_t·log π(y_t) over the completion, w_t = 1 + m_t·min(1 / π(y_t), δ): a token where the pair differs
    (m_t = 1) weighs more the less likely the model finds it (the weight itself carries no gradient)."""
    logps = masked(token_logps, mask)
    weight = 1.0 + masked(diff_mask, mask) * torch.exp(-logps.detach()).clamp(max=delta)
    return (logps * weight).sum(-1)


@PREFERENCE.register(
    "bmc", paper="Bridging and Modeling Correlations in Pairwise Data for Direct Preference Optimization",
    arxiv="2408.07471", catalog="preference:73",
    trainer_inputs={"stopwords": "nltk"},  # the authors' list
    notes="checked against the authors' YJiangcm/BMC scripts/dpo_bmc_trainer.py: concatenated_forward (the token "
          "weights 1 + m·clamp(exp(−log p), max=dpo_bmc_delta) from each model's own detached log-probs: the "
          "policy's for the policy, the reference's for the reference, which runs the same concatenated_forward "
          "in compute_reference_log_probs / get_batch_loss_metrics), find_modifications (difflib over the pair's "
          "token ids, stopword tokens left out) and dpo_loss's sigmoid branch; "
          "training_configs/instruction_following/llama-3-8b-base-dpo-bmc.yaml: beta 0.01, dpo_bmc_delta 1.5. The "
          "difference masks `chosen_diff_mask` / `rejected_diff_mask` are the trainer's (postrain.trainers."
          "token_level); the pseudo-winning responses (an LLM editing the losing one) are data the user brings")
def bmc(chosen_token_logps, rejected_token_logps, ref_chosen_token_logps, ref_rejected_token_logps, chosen_mask,
        rejected_mask, chosen_diff_mask, rejected_diff_mask, *, beta: float = 0.01, delta: float = 1.5):
    """BMC: DPO (sigmoid) on token-weighted sums, −log σ(β[(S_θ(y_w) − S_ref(y_w)) − (S_θ(y_l) − S_ref(y_l))]).

    S(y) = Σ_t w_t log p(y_t), w_t = 1 + m_t·min(1/p(y_t), δ) with p the scoring model's own probability of the token
    and m_t = 1 where the chosen and rejected token sequences differ (difflib's replaced, inserted or deleted
    tokens, stopwords excepted): the tokens that make the difference weigh up to 1 + δ, the more so the less
    confident the model is about them. beta 0.01 and delta 1.5 from the authors' Llama-3-8B config."""
    if delta < 0:
        raise RecipeError(f"bmc: delta caps the extra weight of a differing token and must be >= 0, got {delta!r}")
    policy = (bmc_weighted_logps(chosen_token_logps, chosen_mask, chosen_diff_mask, delta)
              - bmc_weighted_logps(rejected_token_logps, rejected_mask, rejected_diff_mask, delta))
    reference = (bmc_weighted_logps(ref_chosen_token_logps, chosen_mask, chosen_diff_mask, delta)
                 - bmc_weighted_logps(ref_rejected_token_logps, rejected_mask, rejected_diff_mask, delta))
    return -F.logsigmoid(beta * (policy - reference.to(policy.device)))


def _pilot_sums(token_logratios: torch.Tensor, mask, counts: torch.Tensor) -> torch.Tensor:
    """Σ of the per-token log-ratios over `counts` tokens drawn uniformly, without replacement, from each row's
    completion tokens (all of them where the row has fewer), detached: SGDPO's pilot term.

    The draw ranks uniform noise over the valid tokens (padding sorts last) and keeps the `counts` lowest ranks, a
    uniform subset as the authors' torch.randperm(n)[:k]; it uses torch's global generator, which the trainer seeds."""
    valid = torch.as_tensor(mask, device=token_logratios.device) > 0
    noise = torch.where(valid, torch.rand(valid.shape, device=valid.device), 2.0)
    rank = noise.argsort(dim=-1).argsort(dim=-1)
    picked = valid & (rank < counts.to(rank.device)[:, None])
    return torch.where(picked, token_logratios, 0.0).sum(-1).detach()


@PREFERENCE.register(
    "sgdpo", paper="SGDPO: Self-Guided Direct Preference Optimization for Language Model Alignment",
    arxiv="2505.12435", catalog="preference:23",
    ranges={"pilot_ratio_chosen": "in (0, 1]", "pilot_ratio_rejected": "in (0, 1]"},
    notes="checked against the first author's repository WNQzhu/SGDPO (README 'SGDPO-ACL25'): "
          "code/scripts/pdpo_trainer_v4.py::PDPOTrainer.pdpo_loss and get_pilot_logps (the pilot sums are built "
          "with torch.tensor(list), which copies their values: no gradient flows through them), "
          "code/scripts/pdpo_config.py (sample_ratio_r2 0.9, label_smoothing 0) and "
          "code/training_configs/llama-3-8b-base-pdpo-v7.yaml (beta 0.1, sample_ratio_r1 0.7)")
def sgdpo(chosen_token_logps, rejected_token_logps, ref_chosen_token_logps, ref_rejected_token_logps, chosen_mask,
          rejected_mask, *, beta: float = 0.1, pilot_ratio_chosen: float = 0.7, pilot_ratio_rejected: float = 0.9,
          label_smoothing: float = 0.0):
    """SGDPO: ½·ℓ(β[h_w − p_l]) + ½·ℓ(β[p_w − h_l]), ℓ(z) = −(1 − ε)·log σ(z) − ε·log σ(−z).

    h = Σ_t (log π − log π_ref) over a completion; p_w / p_l, the pilot terms, are the same sum over a random
    subset of the chosen's / rejected's tokens, of size max(⌊m·r⌋, 1) with m = min(|y_w|, |y_l|) and r =
    `pilot_ratio_chosen` / `pilot_ratio_rejected`, drawn anew on every call. Each half contrasts one whole response
    with a length-matched sample of the other, so the gradient of the first half moves the chosen only and that of
    the second the rejected only: the pilots are constants, as in the authors' code. Defaults beta 0.1, r 0.7 for
    the chosen (the authors' Llama-3 config) and 0.9 for the rejected (their config class's default)."""
    mw, ml = torch.as_tensor(chosen_mask), torch.as_tensor(rejected_mask)
    policy_w, policy_l = masked(chosen_token_logps, mw), masked(rejected_token_logps, ml)
    hw_tokens = policy_w - masked(ref_chosen_token_logps, mw).to(policy_w.device)
    hl_tokens = policy_l - masked(ref_rejected_token_logps, ml).to(policy_l.device)
    shortest = torch.minimum((mw > 0).sum(-1), (ml > 0).sum(-1)).double()
    # Python's int(m * r) on a double, as the authors' max(int(min_len * ratio), 1)
    counts_w = torch.floor(shortest * pilot_ratio_chosen).clamp(min=1).long()
    counts_l = torch.floor(shortest * pilot_ratio_rejected).clamp(min=1).long()
    pilot_w, pilot_l = _pilot_sums(hw_tokens, mw, counts_w), _pilot_sums(hl_tokens, ml, counts_l)

    def smoothed(z):
        return -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)

    return 0.5 * smoothed(hw_tokens.sum(-1) - pilot_l) + 0.5 * smoothed(pilot_w - hl_tokens.sum(-1))
