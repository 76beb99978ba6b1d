"""Policy losses of the mirror-learning / drift family: l = -(r A - drift(r, A)), a drift >= 0 that is zero (with
zero gradient) at r = 1 taking the place of PPO's clip (catalog row re-examined against the authors' code).

Same calling convention as postrain.rl.losses: per-token loss (N, T), zero at padding, and a metrics dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from postrain.errors import RecipeError
from postrain.rl.losses import advantages_2d, masked_log_ratio, masked_mean, ratio_metrics
from postrain.rl.registry import POLICY_LOSSES
from postrain.tensors import masked


@POLICY_LOSSES.register(
    "discovered_po", paper="Discovered Policy Optimisation", arxiv="2210.05639", catalog="rl:87",
    notes="the closed-form drift the paper distils from its learned LPO objective, checked against the first "
          "author's re-implementation luchris429/purejaxrl purejaxrl/dpo_continuous_action.py (_loss_fn: drift1 "
          "for A >= 0, drift2 for A < 0; DPO_ALPHA 2.0, DPO_BETA 0.6, UPDATE_EPOCHS 4); the learned-drift version "
          "is luchris429/discovered-policy-optimisation dpo/brax_drift.py. The paper is about continuous control; "
          "here the drift acts per completion token with the sequence's advantage. The authors standardise "
          "advantages over the minibatch inside the loss; here the advantage entry does the normalising. Of the "
          "catalog row's three objectives (TRPO, MDPO, LPO/DPO) only this one is registered")
def discovered_po(logps, old_logps, advantages, mask, *, alpha: float = 2.0, beta: float = 0.6):
    """Discovered Policy Optimisation: l = -(r A - drift), r = π/π_old per token.

    drift = ReLU((r − 1)A − α·tanh((r − 1)A / α)) where A ≥ 0, ReLU(log(r)·A − β·tanh(log(r)·A / β)) where A < 0.
    x − c·tanh(x/c) is ≈ x³/(3c²) near 0, so the drift and its gradient vanish at r = 1 (the first update of a
    batch is the plain policy gradient) and grow as the ratio moves in the direction A rewards: a soft trust
    region that, unlike PPO's clip, keeps a gradient pulling the ratio back. It acts only off-policy, from the
    second optimisation pass over a generation batch (num_iterations or steps_per_generation > 1).
    alpha = 2.0, beta = 0.6 from the authors' implementation."""
    if alpha <= 0 or beta <= 0:
        raise RecipeError(f"discovered_po: alpha and beta are the drift's tanh scales and must be > 0, got "
                          f"alpha={alpha!r}, beta={beta!r}")
    log_ratio = masked_log_ratio(logps, old_logps, mask)
    ratio = torch.exp(log_ratio)
    adv = advantages_2d(advantages, mask).expand_as(ratio)
    pos = (ratio - 1) * adv
    neg = log_ratio * adv
    drift = torch.where(adv >= 0, F.relu(pos - alpha * torch.tanh(pos / alpha)),
                        F.relu(neg - beta * torch.tanh(neg / beta)))
    loss = -(ratio * adv - drift)
    metrics = ratio_metrics(ratio, mask)
    metrics["drift/mean"] = masked_mean(drift.detach(), mask)
    return masked(loss, mask), metrics
