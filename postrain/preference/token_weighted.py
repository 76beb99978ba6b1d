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
