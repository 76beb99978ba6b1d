"""Reference-free pairwise preference losses: no reference model, so none of them reads a `ref_*` input.

Inputs are SUMMED completion log-probs (B,); entries whose paper uses the per-token average divide by
`chosen_lengths` / `rejected_lengths` themselves. Everything is computed in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from postrain.preference.registry import PREFERENCE
from postrain.tensors import as_float


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Mächler's split, as TRL's ORPO)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@PREFERENCE.register(
    "simpo", paper="SimPO: Simple Preference Optimization with a Reference-Free Reward", arxiv="2405.14734",
    catalog="preference:5",
    trl="experimental.cpo.CPOTrainer(loss_type='simpo', cpo_alpha=0.0, simpo_gamma=gamma)",
    notes="checked against princeton-nlp/SimPO scripts/simpo_trainer.py::simpo_loss and training_configs")
def simpo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, beta: float = 2.0,
          gamma: float = 1.0):
    """SimPO: -log σ(β(ℓ̄_w − ℓ̄_l) − γ) on per-token average log-probs, no reference model.

    `gamma` is the margin γ itself. The authors' repo is parameterized by `gamma_beta_ratio` = γ/β and computes
    -log σ(β·((ℓ̄_w − ℓ̄_l) − γ/β)), the same number; convert with γ = β·gamma_beta_ratio. Defaults β=2.0,
    γ=1.0 are the repo's Llama-3-8B-Base config (β=2.0, γ/β=0.5); other configs: Mistral-Base β=2.0, γ/β=0.8;
    Llama-3-Instruct β=2.5, γ/β=0.55; Gemma-2-9B-it β=10, γ/β=0.5. The repo's optional SFT term (default 0)
    and label smoothing (default 0) are not part of the paper's loss and are left out.
    """
    lw, ll, nw, nl = map(as_float, (chosen_logps, rejected_logps, chosen_lengths, rejected_lengths))
    return -F.logsigmoid(beta * (lw / nw - ll / nl) - gamma)


@PREFERENCE.register(
    "orpo", paper="ORPO: Monolithic Preference Optimization without Reference Model", arxiv="2403.07691",
    catalog="preference:6",
    notes="odds-ratio term checked against trl/experimental/orpo/orpo_trainer.py::odds_ratio_loss (1.16); "
          "NLL per example over completion tokens as in the paper, where TRL averages over all tokens of the "
          "batch including the prompt")
def orpo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, beta: float = 0.1):
    """ORPO: NLL(y_w) − β·log σ(log odds(y_w) − log odds(y_l)), log odds = ℓ̄ − log(1 − e^ℓ̄).

    ℓ̄ is the per-token average log-prob; the NLL term is −ℓ̄_w (the per-token average over the chosen
    completion, the paper's L_SFT). `beta` is the paper's λ (TRL's ORPOConfig also calls it `beta`); default
    0.1 as in TRL's paper index. TRL's ORPOTrainer differs only in the NLL normalization: it averages the
    cross-entropy over every non-padding token of the batch, prompt tokens included.
    """
    lw, ll, nw, nl = map(as_float, (chosen_logps, rejected_logps, chosen_lengths, rejected_lengths))
    aw, al = lw / nw, ll / nl
    # log(1 − e^ℓ̄) is −inf at ℓ̄ = 0, which float32 log-softmax reaches when every token is certain (a log-prob rounds
    # to 0 once the logit gap passes ~17), and inf − inf is nan when both completions are: the odds are taken at
    # most at ℓ̄ = −1.2e-38 (odds e^87), a probability within float32's smallest normal of 1. The NLL term keeps
    # its own (unclamped) gradient.
    tiny = torch.finfo(torch.float32).tiny
    ow, ol = aw.clamp(max=-tiny), al.clamp(max=-tiny)
    log_odds_ratio = (ow - ol) - (_log1mexp(ow) - _log1mexp(ol))
    return -aw - beta * F.logsigmoid(log_odds_ratio)


@PREFERENCE.register(
    "repo", paper="RePO: ReLU-based Preference Optimization", arxiv="2503.07426",
    catalog="preference:10",
    notes="checked against junkangwu/RePO scripts/simpo_trainer.py (loss_type == 'repo') and training_configs")
def repo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, gamma: float = 0.4):
    """RePO: max(0, γ − (ℓ̄_w − ℓ̄_l)), a hinge on the reference-free average-log-prob margin (SimPO at β→∞).

    Pairs already separated by γ get zero loss and zero gradient. γ is the authors' `gamma_beta_ratio`
    (their code computes relu(−(ℓ̄_w − ℓ̄_l − gamma_beta_ratio)); β only scales logged rewards). Default 0.4
    from the Mistral-7B-Instruct and Gemma-2-9B-it configs; the Llama-3-8B-Instruct configs use 0.6.
    """
    lw, ll, nw, nl = map(as_float, (chosen_logps, rejected_logps, chosen_lengths, rejected_lengths))
    return torch.relu(gamma - (lw / nw - ll / nl))


@PREFERENCE.register(
    "contrastive_po",
    catalog="preference:trl",
    paper="Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine "
          "Translation", arxiv="2401.08417",
    notes="checked against fe1ixxu/ALMA utils/cpo_trainer.py and trl/experimental/cpo (loss_type='sigmoid'); "
          "TRL averages the NLL over all tokens of the batch, this entry per example")
def contrastive_po(chosen_logps, rejected_logps, chosen_lengths, *, beta: float = 0.1, cpo_alpha: float = 1.0):
    """Contrastive PO (CPO): −log σ(β(ℓ_w − ℓ_l)) + cpo_alpha·NLL(y_w), reference-free DPO plus BC term.

    ℓ are summed log-probs (the preference term uses sums, as in ALMA's and TRL's CPO); the NLL term is the
    per-token average −ℓ_w/|y_w|. Defaults β=0.1 and cpo_alpha=1.0 from the authors' CPOConfig (ALMA) and
    TRL. Not TRL's exact number: TRL's NLL is one cross-entropy averaged over all chosen tokens of the batch.
    """
    lw, ll, nw = map(as_float, (chosen_logps, rejected_logps, chosen_lengths))
    return -F.logsigmoid(beta * (lw - ll)) - cpo_alpha * lw / nw


@PREFERENCE.register(
    "alphapo", paper="AlphaPO: Reward Shape Matters for LLM Alignment", arxiv="2501.03884",
    catalog="preference:trl",
    trl="experimental.cpo.CPOTrainer(loss_type='alphapo', alpha=alpha, simpo_gamma=gamma)",
    notes="formula from trl/experimental/cpo/cpo_trainer.py::cpo_loss (1.16); defaults from TRL's paper index "
          "(Mistral-Instruct, Table 3 of the paper); paper text not read directly")
def alphapo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, alpha: float = 0.25,
            beta: float = 2.5, gamma: float = 0.1):
    """AlphaPO: SimPO with the reward reshaped, −log σ(β(r_α(y_w) − r_α(y_l)) − γ), r_α = (1 − p̄^(−α))/α.

    p̄ = exp(ℓ̄) is the per-token geometric-mean probability, so p̄^(−α) = exp(−α·ℓ̄); as α → 0, r_α → ℓ̄ and
    the loss becomes SimPO. Defaults α=0.25, β=2.5, γ=0.1 as TRL's paper index gives them for Mistral-Instruct.
    """
    lw, ll, nw, nl = map(as_float, (chosen_logps, rejected_logps, chosen_lengths, rejected_lengths))
    if alpha == 0.0:
        rw, rl = lw / nw, ll / nl
    else:
        rw = -torch.expm1(-alpha * lw / nw) / alpha
        rl = -torch.expm1(-alpha * ll / nl) / alpha
    return -F.logsigmoid(beta * (rw - rl) - gamma)


@PREFERENCE.register(
    "cpl", paper="Contrastive Preference Learning: Learning from Human Feedback without RL", arxiv="2310.13639",
    catalog="preference:89",
    notes="checked against jhejna/cpl research/algs/cpl.py::biased_bce_with_logits and configs/*/cpl.yaml")
def cpl(chosen_logps, rejected_logps, *, alpha: float = 0.1, lam: float = 0.5):
    """CPL: −log[e^{α·ℓ_w} / (e^{α·ℓ_w} + e^{λ·α·ℓ_l})] = −log σ(α·ℓ_w − λ·α·ℓ_l), reference-free.

    ℓ are summed log-probs (the regret of a segment is the sum of α·log π over its steps, discount 1 as in
    the authors' code). λ ∈ (0, 1] is the conservative bias (`contrastive_bias` in the code); λ=1 is a plain
    Bradley–Terry on α·ℓ. Defaults α=0.1, λ=0.5 from the authors' MetaWorld CPL configs. The optional
    BC term of CPL-BC (bc_coeff 0 in the CPL configs) is not included.
    """
    lw, ll = map(as_float, (chosen_logps, rejected_logps))
    return -F.logsigmoid(alpha * lw - lam * alpha * ll)
