"""GFlowNet objectives on offline preference pairs (catalog rows re-examined against the authors' code).

Inputs follow the preference registry's convention: per-token log-probs (B, T) of policy and reference, the
completion masks, and per-token end-of-sequence log-probs the DPO trainer computes from full-vocabulary forwards
(postrain.trainers.token_level). float32 throughout.
"""

from __future__ import annotations

import torch

from postrain.preference.registry import PREFERENCE
from postrain.tensors import masked

# The authors' preference score in log space ("1 if chosen, small number otherwise"): log 1 for the chosen
# completion, -8 for the rejected one, scaled by alpha (ggoggam/gdpo src/algo/offline/gdpo.py, GDPOTrainer.loss).
CHOSEN_LOG_SCORE, REJECTED_LOG_SCORE = 0.0, -8.0


def detailed_balance_residuals(token_logps, ref_token_logps, eos_logps, ref_eos_logps, mask,
                               log_score: float) -> torch.Tensor:
    """Per-transition detailed-balance residuals (B, T) of one side of the pairs, 0 where no transition.

    With s_t the prefix before completion token t, log F(s_t) = log R_t − log π(EOS | s_t) and
    log R_t = log π_ref(y_t | s_t) + log π_ref,γ(EOS | s_t) (plus `log_score` at the completion's last token);
    the residual of the transition s_t → s_{t+1} is log F(s_t) − log F(s_{t+1}) + log π(y_t | s_t), for every
    completion token t that has a next one (the last token, EOS, ends the trajectory: its state's flow is where
    the score enters)."""
    keep = torch.as_tensor(mask).bool()
    lp = masked(token_logps, keep)
    log_reward = masked(ref_token_logps, keep) + masked(ref_eos_logps, keep)
    following = torch.cat([keep[:, 1:], torch.zeros_like(keep[:, :1])], dim=1)
    last = keep & ~following  # the completion's last token (the masks are contiguous spans)
    log_reward = log_reward + last.to(log_reward.dtype) * log_score
    log_flow = log_reward.detach() - masked(eos_logps, keep)  # the log-reward is a target: no gradient
    next_flow = torch.cat([log_flow[:, 1:], torch.zeros_like(log_flow[:, :1])], dim=1)
    residual = log_flow - next_flow + lp
    return torch.where(keep & following, residual, torch.zeros((), device=residual.device))


@PREFERENCE.register(
    "gdpo", paper="GDPO: Learning to Directly Align Language Models with Diversity Using GFlowNets",
    arxiv="2410.15096", catalog="preference:75", ranges={"alpha": ">= 0"},
    trainer_inputs={"gamma": 0.1},  # the authors' GDPOConfig.gamma: the reference's temperature for its EOS log-prob
    notes="checked against the authors' ggoggam/gdpo src/algo/offline/gdpo.py GDPOTrainer.loss (with "
          "mixin/utilities.py compute_token_logps) and src/config/__init__.py GDPOConfig (alpha 0.1, gamma 0.1, "
          "temperature 1.0; its beta 0.1 is not read by the loss). Two terms of the authors' code are left out, "
          "both artefacts of their tensor layout: the residual their slide_mask adds before the prompt's last token "
          "(scored with vocabulary id 0, the label their compute_token_logps puts at masked positions before it "
          "slides the mask), and, on every row shorter than its batch's longest, the residual after the "
          "completion's final EOS, whose only gradient is through the policy's EOS probability one position past "
          "the EOS (the batch's longest row has none, its tensor ending there). The per-token EOS log-probs "
          "(`*_token_eos_logps`, policy, with gradient) and the reference's at temperature gamma "
          "(`ref_*_token_eos_logps`, gamma set on the entry) are the trainer's (postrain.trainers.token_level)")
def gdpo(chosen_token_logps, rejected_token_logps, ref_chosen_token_logps, ref_rejected_token_logps, chosen_mask,
         rejected_mask, chosen_token_eos_logps, rejected_token_eos_logps, ref_chosen_token_eos_logps,
         ref_rejected_token_eos_logps, *, alpha: float = 0.1):
    """GDPO: the GFlowNet detailed-balance loss on each completion of the pair, ½ Σ_{y ∈ {y_w, y_l}} Σ_t δ_t².

    δ_t = log F(s_t) − log F(s_{t+1}) + log π(y_t | s_t) over the completion's transitions, with s_t the prefix
    before token t, log F(s_t) = log R_t − log π(EOS | s_t) and log R_t = log π_ref(y_t | s_t) +
    log softmax(z_ref(s_t) / γ)[EOS] (the reference's logits z_ref at temperature γ), no gradient through log R.
    The preference enters as a log-score added to log R at the completion's last token: α·0 for the chosen, α·(−8)
    for the rejected. The trainer computes log π(EOS | s_t) and the reference's tempered EOS log-prob at every
    completion token from unfused full-vocabulary forwards; γ (`gamma:` on the entry, default 0.1) is that
    reference temperature. The authors average the squared sums over the 2B rows (chosen and rejected alike),
    hence the ½ per pair. Defaults from the authors' GDPOConfig."""
    chosen = detailed_balance_residuals(chosen_token_logps, ref_chosen_token_logps, chosen_token_eos_logps,
                                        ref_chosen_token_eos_logps, chosen_mask, alpha * CHOSEN_LOG_SCORE)
    rejected = detailed_balance_residuals(rejected_token_logps, ref_rejected_token_logps, rejected_token_eos_logps,
                                          ref_rejected_token_eos_logps, rejected_mask, alpha * REJECTED_LOG_SCORE)
    return 0.5 * (chosen.pow(2).sum(-1) + rejected.pow(2).sum(-1))
