"""Pairwise losses whose reference term is modulated per pair (catalog rows re-examined against the authors' code).

Inputs follow the preference registry's convention: SUMMED completion log-probs (B,) for policy and reference;
an entry that averages over tokens divides by `chosen_lengths` / `rejected_lengths` itself. float32 throughout.
"""

from __future__ import annotations

import torch.nn.functional as F

from postrain.preference.registry import PREFERENCE
from postrain.tensors import as_float


@PREFERENCE.register(
    "mipo", paper="Modulated Intervention Preference Optimization (MIPO): Keep the Easy, Refine the Difficult",
    arxiv="2409.17545", catalog="preference:16",
    notes="checked against the authors' code, ncsoft/MIPO src/trainers/mipo_trainer.py (MIPOTrainer.mipo_loss, "
          "fed chosen_avg_logps / rejected_avg_logps of policy and reference by get_batch_loss_metrics and "
          "compute_ref_log_probs) and configs/llama3/config.yaml (beta 20.0; the README reports beta 5-25 all "
          "work). log(1 + e^K) is computed as softplus(K), the same value without overflow")
def mipo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths, *,
         beta: float = 20.0):
    """MIPO: −log σ(β[(ℓ̄_w − ℓ̄_l) − log(1 + e^K)]), K = ℓ̄_ref(y_w) − ℓ̄_ref(y_l), on per-token average log-probs.

    K measures how well the reference already separates the pair: a pair the reference gets right (large K) needs
    a large policy margin before its loss falls (the reference intervenes strongly, "refine the difficult" is
    the flip side); a pair the reference gets wrong (K ≪ 0) has log(1 + e^K) ≈ 0 and is trained as a reference-free
    margin. Unlike DPO the reference enters only through this per-pair offset, not as ℓ − ℓ_ref. Both policy and
    reference log-probs are averaged over the completion's tokens, as in the authors' trainer. beta = 20.0 from
    the authors' Llama-3-8B-Instruct config."""
    n_w, n_l = as_float(chosen_lengths).clamp(min=1.0), as_float(rejected_lengths).clamp(min=1.0)
    policy_margin = as_float(chosen_logps) / n_w - as_float(rejected_logps) / n_l
    k = (as_float(ref_chosen_logps) / n_w - as_float(ref_rejected_logps) / n_l).to(policy_margin.device)
    return -F.logsigmoid(beta * (policy_margin - F.softplus(k)))
