"""Unpaired preference losses: one completion per example with a binary label (1 desirable, 0 undesirable).

Data: `logps`, `ref_logps` (SUMMED completion log-probs, (B,)), `labels` (B,), plus what each entry needs.
Returns per-example losses (B,); their mean is the loss TRL's unpaired trainers compute (they concatenate the
desirable and undesirable losses and take the mean).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from postrain.preference.registry import PREFERENCE
from postrain.registry import Requirement


def _split(logps, ref_logps, labels):
    h = torch.as_tensor(logps).float() - torch.as_tensor(ref_logps).float()
    good = torch.as_tensor(labels, device=h.device) > 0.5
    return h, good


@PREFERENCE.register(
    "kto", paper="KTO: Model Alignment as Prospect Theoretic Optimization", arxiv="2402.01306",
    requires=(Requirement("rows_per_batch", "the KL reference point (each prompt paired with another row's "
                                            "completion of the batch)", amount=2, scope="process"),),
    catalog="preference:62",
    trl="KTOTrainer(loss_type='kto')",
    notes="checked against trl/trainer/kto_trainer.py::_compute_loss (1.16)")
def kto(logps, ref_logps, labels, kl, *, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0):
    """KTO: w_D·(1 − σ(β(h − z0))) for desirable, w_U·(1 − σ(β(z0 − h))) for undesirable, h = ℓ − ℓ_ref.

    `kl` is the reference point z0: the trainer's estimate of KL(π‖π_ref), the mean of ℓ − ℓ_ref over
    mismatched (prompt, completion) pairs of the batch (TRL cycles completions by one within the batch). As in
    TRL it is detached and clamped at 0 here; a scalar or a (B,) tensor. Defaults β=0.1, w_D=w_U=1 (TRL/paper).
    """
    h, good = _split(logps, ref_logps, labels)
    z0 = torch.as_tensor(kl, device=h.device).float().detach().clamp(min=0)
    return torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (h - z0))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z0 - h))))


@PREFERENCE.register(
    "apo_zero_unpaired",
    catalog="preference:trl",
    paper="Anchored Preference Optimization and Contrastive Revisions: Addressing Underspecification in "
          "Alignment", arxiv="2408.06266",
    trl="KTOTrainer(loss_type='apo_zero_unpaired')",
    notes="checked against trl/trainer/kto_trainer.py::_compute_loss (1.16)")
def apo_zero_unpaired(logps, ref_logps, labels, *, beta: float = 0.1, desirable_weight: float = 1.0,
                      undesirable_weight: float = 1.0):
    """APO-zero, unpaired: 1 − σ(βh) for desirable (push the reward up), σ(βh) for undesirable (push it down).

    h = ℓ − ℓ_ref. Anchored at zero reward, no KL reference point. Use it when the desirable completions are
    better than what the model currently generates. Defaults as TRL's KTOConfig (β=0.1, weights 1).
    """
    h, good = _split(logps, ref_logps, labels)
    return torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * h)),
                       undesirable_weight * torch.sigmoid(beta * h))


@PREFERENCE.register(
    "bco", paper="Binary Classifier Optimization for Large Language Model Alignment", arxiv="2404.04656",
    catalog="preference:trl",
    notes="checked against TRL's BCOTrainer.bco_loss (trl/trainer/bco_trainer.py, 0.x; removed in 1.16); "
          "the optional underlying-distribution-matching weights are not included")
def bco(logps, ref_logps, labels, delta, *, beta: float = 0.1):
    """BCO: a binary classifier on the implicit reward βh: −log σ(βh − δ) if desirable, −log σ(−(βh − δ)) if not.

    h = ℓ − ℓ_ref; δ is the reward shift, the running mean of βh over all completions seen so far (TRL's
    `RunningMoments`), kept by the trainer and passed in as data; it is detached here. Default β=0.1 (TRL's
    BCOConfig).
    """
    h, good = _split(logps, ref_logps, labels)
    z = beta * h - torch.as_tensor(delta, device=h.device).float().detach()
    return torch.where(good, -F.logsigmoid(z), -F.logsigmoid(-z))
