"""DPO and the pairwise variants that TRL 1.16's `DPOTrainer` has natively (or had, or nearly has).

Inputs are SUMMED completion log-probs (B,) under the policy and the reference; h = ℓ − ℓ_ref is the implicit
reward log-ratio, h_w / h_l for chosen / rejected and Δ = h_w − h_l. Entries whose paper works per token (LD-DPO,
WPO) take right-padded (B, T) per-token inputs with masks; padding positions may hold garbage and never matter.
Everything is computed in float32, whatever the input dtype.

`trl=` names TRL 1.16's option only where `DPOTrainer._compute_loss` computes the same number; the notes say
how TRL differs everywhere else.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from postrain.preference.registry import PREFERENCE
from postrain.registry import Requirement
from postrain.tensors import as_float, masked_row_mean

# exp() overflows float32 above ~88.7; TRL clamps f-divergence exponents at 80 for the same reason.
_EXP_CLAMP = 80.0


def _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps):
    lw, ll, rw, rl = map(as_float, (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps))
    return lw - rw, ll - rl


# --- DPO, IPO, label-noise variants ------------------------------------------------------------------------------


@PREFERENCE.register(
    "dpo", paper="Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
    catalog="preference:1",
    arxiv="2305.18290", trl="loss_type=sigmoid",
    notes="paper Eq. 7; identical to TRL 1.16 _compute_loss 'sigmoid' with f_divergence_type=reverse_kl")
def dpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1):
    """DPO: −log σ(β·Δ), Δ = (ℓ_w − ℓ_ref,w) − (ℓ_l − ℓ_ref,l) on summed log-probs.

    Default β=0.1 as in the paper's experiments (Appendix B; TRL's paper index).
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * (hw - hl))


@PREFERENCE.register(
    "ipo", paper="A General Theoretical Paradigm to Understand Learning from Human Preferences",
    catalog="preference:2",
    arxiv="2310.12036",
    notes="paper Eq. 17 on summed log-probs (as TRL <= 0.28 and the SPPO / RPO authors' trainers). TRL 1.16's "
          "loss_type=ipo divides each side's log-ratio by its completion length first (see ipo_token_mean)")
def ipo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1):
    """IPO: (Δ − 1/(2τ))², a squared regression of the log-ratio margin onto 1/(2τ); τ is `beta`.

    Δ uses summed log-probs, as the paper's sequence-level log-ratios. The paper sweeps τ; default 0.1 is
    TRL's. TRL ≥ 0.29 computes the per-token-averaged form instead, registered as `ipo_token_mean`.
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (hw - hl - 1.0 / (2.0 * beta)) ** 2


@PREFERENCE.register(
    "ipo_token_mean", paper="A General Theoretical Paradigm to Understand Learning from Human Preferences",
    catalog="preference:2",
    arxiv="2310.12036", trl="loss_type=ipo",
    notes="TRL 1.16 _compute_loss 'ipo': log-ratios divided by completion length (clamped at 1); TRL's comment "
          "says the IPO authors confirmed this normalization and that the paper's results used it")
def ipo_token_mean(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
                   rejected_lengths, *, beta: float = 0.1):
    """IPO on per-token-averaged log-ratios: (h_w/|y_w| − h_l/|y_l| − 1/(2τ))², τ is `beta` (TRL's form).

    Lengths are clamped at 1 as in TRL, so an empty completion gives a log-ratio of 0, not NaN.
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    nw, nl = map(as_float, (chosen_lengths, rejected_lengths))
    return (hw / nw.clamp(min=1.0) - hl / nl.clamp(min=1.0) - 1.0 / (2.0 * beta)) ** 2


@PREFERENCE.register(
    "cdpo", paper="A note on DPO with noisy preferences & relationship to IPO (Mitchell, 2023; no arXiv id: "
                  "https://ericmitchell.ai/cdpo.pdf). arXiv id given: Provably Robust DPO, which states cDPO "
                  "as its baseline", arxiv="2403.00409",
    catalog="preference:3",
    notes="TRL <= 0.28 loss_type=sigmoid with label_smoothing; TRL 1.16's sigmoid ignores label_smoothing, so "
          "no native equivalent")
def cdpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1,
         label_smoothing: float = 0.1):
    """Conservative DPO: −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ), DPO with labels flipped with probability ε.

    ε is `label_smoothing`. The note fixes no ε; default 0.1 is the flip rate rDPO compares cDPO at. At ε=0
    this is DPO.
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (hw - hl)
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


@PREFERENCE.register(
    "robust", paper="Provably Robust DPO: Aligning Language Models with Noisy Feedback", arxiv="2403.00409",
    catalog="preference:4",
    trl="loss_type=robust",
    notes="paper Eq. 8 / Sec. 3.1; identical to TRL 1.16 'robust' (ε = label_smoothing)")
def robust(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.01,
           label_smoothing: float = 0.1):
    """rDPO: [(1−ε)·(−log σ(βΔ)) − ε·(−log σ(−βΔ))] / (1−2ε), an unbiased DPO loss under label-flip rate ε.

    ε (`label_smoothing`) must lie in [0, 0.5). Defaults ε=0.1, β=0.01 from TRL's paper index (paper Sec. 6
    and App. B). At ε=0 this is DPO.
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (hw - hl)
    eps = label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


@PREFERENCE.register(
    "hinge", paper="Statistical Rejection Sampling Improves Preference Optimization", arxiv="2309.06657",
    catalog="preference:32",
    trl="loss_type=hinge",
    notes="RSO's hinge-norm loss (SLiC-HF 2305.10425's calibration hinge normalized by the SFT/reference "
          "policy); identical to TRL 1.16 'hinge'. SLiC-HF's own un-normalized hinge + SFT-target term is not "
          "this entry")
def hinge(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.05):
    """RSO hinge-norm: max(0, 1 − γ·Δ), γ is `beta`; zero loss and gradient once γΔ ≥ 1.

    Equivalently a hinge with margin 1/γ on Δ. Default γ=0.05 is RSO's (the paper's Sec. 5 "Method", with its
    Eq. 10; re-read with recipes/papers/rso.yaml); TRL's DPOConfig default is 0.1.
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.relu(1.0 - beta * (hw - hl))


@PREFERENCE.register(
    "sigmoid_norm", paper="Tulu 3: Pushing Frontiers in Open Language Model Post-Training", arxiv="2411.15124",
    catalog="preference:trl",
    trl="loss_type=sigmoid_norm",
    notes="length-normalized DPO; checked against allenai/open-instruct dpo_utils.py (loss_type dpo_norm "
          "averages policy and reference log-probs per token) and TRL 1.16 'sigmoid_norm' (lengths clamped at 1)")
def sigmoid_norm(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
                 rejected_lengths, *, beta: float = 5.0):
    """Length-normalized DPO: −log σ(β·(h_w/|y_w| − h_l/|y_l|)), log-ratios averaged per completion token.

    Default β=5 from Tülu 3's DPO recipe (open-instruct `--dpo_loss_type dpo_norm --dpo_beta 5`). Lengths
    are clamped at 1 as in TRL.
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    nw, nl = map(as_float, (chosen_lengths, rejected_lengths))
    return -F.logsigmoid(beta * (hw / nw.clamp(min=1.0) - hl / nl.clamp(min=1.0)))


# --- EXO, NCA, BCO, SPPO -----------------------------------------------------------------------------------------


@PREFERENCE.register(
    "exo_pair", paper="Towards Efficient and Exact Optimization of Language Model Alignment", arxiv="2402.00856",
    catalog="preference:19",
    trl="loss_type=exo_pair",
    notes="pairwise EXO-pref: reverse KL from softmax(β·h) over {y_w, y_l} to the smoothed label [1−ε, ε]; "
          "identical to TRL 1.16 'exo_pair'. haozheji/exact-optimization src/align_stage/loss.py::exact_loss "
          "uses unnormalized log-targets [0, −10] (ε≈4.5e-5 without the log(1−ε) term)")
def exo_pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1,
             label_smoothing: float = 1e-3):
    """EXO (pair): σ(βΔ)·(log σ(βΔ) − log(1−ε)) + σ(−βΔ)·(log σ(−βΔ) − log ε) = KL(p_θ ‖ [1−ε, ε]).

    `beta` is β_π, `label_smoothing` is ε ∈ (0, 1). Defaults β=0.1 (authors' IMDB script and TRL's paper
    index), ε=1e-3 (TRL's documented paper recommendation).
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (hw - hl)
    eps = label_smoothing
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


@PREFERENCE.register(
    "nca_pair", paper="Noise Contrastive Alignment of Language Models with Explicit Rewards", arxiv="2402.05369",
    catalog="preference:trl",
    trl="loss_type=nca_pair",
    notes="checked against thu-ml/Noise-Contrastive-Alignment preference_trainer.py (loss_type NCA) and its "
          "yaml (beta 0.01); identical to TRL 1.16 'nca_pair'")
def nca_pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.01):
    """NCA (pair): −log σ(βh_w) − ½·log σ(−βh_w) − ½·log σ(−βh_l), absolute (not relative) implicit rewards.

    Default β=0.01 from the authors' preference config.
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    rw, rl = beta * hw, beta * hl
    return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)


@PREFERENCE.register(
    "bco_pair", paper="Binary Classifier Optimization for Large Language Model Alignment", arxiv="2404.04656",
    catalog="preference:trl",
    notes="reward shift δ as in TRL <= 0.28 'bco_pair' (RunningMoments mean of β·h over chosen and rejected, "
          "detached). TRL 1.16's 'bco_pair' drops δ: it equals this entry with reward_shift not given")
def bco_pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, reward_shift=None, *,
             beta: float = 0.01):
    """BCO (pair): −log σ(βh_w − δ) − log σ(−(βh_l − δ)), a binary classifier with implicit reward βh.

    δ (`reward_shift`, a data input: scalar or (B,)) is the reward shift, the running mean of the implicit
    rewards β·h over all chosen and rejected completions seen so far; the trainer keeps that state and passes
    it, and it is detached here. Not given, δ=0 (TRL 1.16's form). Default β=0.01 from TRL's paper index.
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    delta = 0.0 if reward_shift is None else torch.as_tensor(reward_shift).detach().float()
    return -F.logsigmoid(beta * hw - delta) - F.logsigmoid(-(beta * hl - delta))


@PREFERENCE.register(
    "sppo_hard", paper="Self-Play Preference Optimization for Language Model Alignment", arxiv="2405.00675",
    catalog="preference:36",
    trl="loss_type=sppo_hard",
    notes="TRL's hard-label version (P(y_w ≻ π_t)=1, P(y_l ≻ π_t)=0), identical to TRL 1.16 'sppo_hard'; it is "
          "2× the authors' soft loss at those probabilities (their code halves the sum)")
def sppo_hard(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 1e-3):
    """SPPO with hard labels: (h_w − 1/(2β))² + (h_l + 1/(2β))²; the reference is the previous iterate π_t.

    η = 1/β. Default β=1e-3 from the authors' scripts/pipeline.sh.
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (hw - 0.5 / beta) ** 2 + (hl + 0.5 / beta) ** 2


@PREFERENCE.register(
    "sppo", paper="Self-Play Preference Optimization for Language Model Alignment", arxiv="2405.00675",
    catalog="preference:36",
    notes="checked against uclaml/SPPO sppo/trainer.py::sppo_loss (loss_type 'sppo') and scripts/compute_prob.py "
          "(win rates = mean PairRM probability against the K=5 samples); no TRL equivalent")
def sppo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_probs, rejected_probs, *,
         beta: float = 1e-3):
    """SPPO: ½[(h_w − (P_w − ½)/β)² + (h_l − (P_l − ½)/β)²], regressing log-ratios onto scaled win rates.

    P_w = `chosen_probs`, P_l = `rejected_probs` are the estimated win rates P̂(y ≻ π_t | x) of each response
    against the current policy's samples; the reference is π_t (the previous iterate). η = 1/β; default
    β=1e-3 from the authors' scripts. The ½ is the authors' code's.
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    pw, pl = map(as_float, (chosen_probs, rejected_probs))
    return 0.5 * ((hw - (pw - 0.5) / beta) ** 2 + (hl - (pl - 0.5) / beta) ** 2)


# --- AOT (batch-coupled), APO, DiscoPOP ---------------------------------------------------------------------------


# AOT sorts within the batch it is given (one process' micro-batch): with one pair the sort is the identity.
_AOT_BATCH = Requirement("rows_per_batch", "the optimal transport over the batch (sorting its margins; over one pair "
                                           "it is that pair's own logistic loss)", amount=2, scope="process")


def _smoothed_logistic(z, label_smoothing):
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


@PREFERENCE.register(
    "aot", paper="Distributional Preference Alignment of LLMs via Optimal Transport", arxiv="2406.05882",
    requires=(_AOT_BATCH,),
    catalog="preference:21",
    trl="loss_type=aot",
    notes="TRL 1.16 'aot' (contributed with the paper); TRL returns the per-quantile losses, whose mean is "
          "this entry's value. Sorts within the batch it is given: per-device batches in a distributed run")
def aot(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1,
        label_smoothing: float = 0.0):
    """AOT (paired): mean over the batch of the smoothed logistic loss on sort(ℓ_w − ℓ_l) − sort(ℓ_ref,w − ℓ_ref,l).

    First-order stochastic dominance of the policy's chosen-vs-rejected margins over the reference's, solved as
    1-D optimal transport by sorting each within the batch. The batch loss is returned at every position.
    TRL's paper index lists no paper hyperparameter: β=0.1 is TRL's default; ε (`label_smoothing`) 0.
    """
    lw, ll, rw, rl = map(as_float, (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps))
    u = torch.sort(lw - ll).values - torch.sort(rw - rl).values
    return _smoothed_logistic(beta * u, label_smoothing).mean().expand(lw.shape)


@PREFERENCE.register(
    "aot_unpaired", paper="Distributional Preference Alignment of LLMs via Optimal Transport",
    requires=(_AOT_BATCH,),
    catalog="preference:21",
    arxiv="2406.05882", trl="loss_type=aot_unpaired",
    notes="TRL 1.16 'aot_unpaired' (TRL <= 0.28 'aot_pair'); the batch loss is returned at every position")
def aot_unpaired(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1,
                 label_smoothing: float = 0.0):
    """AOT (unpaired): mean smoothed logistic loss on sort(h_w) − sort(h_l), chosen and rejected sorted apart.

    Makes the chosen implicit-reward distribution dominate the rejected one without using the pairing. Same
    defaults as `aot`.
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    u = torch.sort(hw).values - torch.sort(hl).values
    return _smoothed_logistic(beta * u, label_smoothing).mean().expand(hw.shape)


@PREFERENCE.register(
    "apo_zero", paper="Anchored Preference Optimization and Contrastive Revisions: Addressing Underspecification "
                      "in Alignment", arxiv="2408.06266", trl="loss_type=apo_zero",
    catalog="preference:trl",
    notes="paper Eq. 7; the authors (ContextualAI/CLAIR_and_APO) point to TRL's implementation, identical to "
          "TRL 1.16 'apo_zero'")
def apo_zero(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1):
    """APO-zero: (1 − σ(βh_w)) + σ(βh_l); raises the chosen and lowers the rejected likelihood, each anchored.

    Use when the chosen outputs are better than the model's own. Default β=0.1 (paper Sec. 5.2).
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (1.0 - torch.sigmoid(beta * hw)) + torch.sigmoid(beta * hl)


@PREFERENCE.register(
    "apo_down", paper="Anchored Preference Optimization and Contrastive Revisions: Addressing Underspecification "
                      "in Alignment", arxiv="2408.06266", trl="loss_type=apo_down",
    catalog="preference:trl",
    notes="paper Eq. 8; identical to TRL 1.16 'apo_down'")
def apo_down(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1):
    """APO-down: σ(βh_w) + (1 − σ(β(h_w − h_l))); lowers both likelihoods, the rejected one more.

    Use when the chosen outputs are worse than the model's own. Default β=0.1 (paper Sec. 5.2).
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.sigmoid(beta * hw) + (1.0 - torch.sigmoid(beta * (hw - hl)))


@PREFERENCE.register(
    "discopop", paper="Discovering Preference Optimization Algorithms with and for Large Language Models",
    catalog="preference:20",
    arxiv="2406.08414", trl="loss_type=discopop (discopop_tau=tau)",
    notes="checked against SakanaAI/DiscoPOP src/alignment/gpo.py::log_ratio_modulated_loss (tau=0.05) and "
          "recipes (beta=0.05); identical to TRL 1.16 'discopop'")
def discopop(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.05,
             tau: float = 0.05):
    """DiscoPOP (log-ratio modulated): (1 − σ(βΔ/τ))·(−log σ(βΔ)) + σ(βΔ/τ)·e^(−βΔ).

    Blends the logistic (DPO) and exponential losses by a sigmoid of the scaled margin. Defaults β=0.05,
    τ=0.05 from the authors' code and recipes.

    Not convex in the margin z = βΔ: at τ=0.05 each pair's loss has a local maximum near z ≈ +0.07 and a local
    minimum near z ≈ −0.12, so from a policy equal to its reference (z = 0) gradient descent first *lowers* the
    margin. Measured on the reversal task from a noisy SFT model (tests/learning.py): 30 steps lowered the loss
    (0.83 -> 0.79) and the held-out preference accuracy with it (0.40 -> 0.02).
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (hw - hl)
    # σ(z/τ)·e^(−z) as exp(log σ(z/τ) − z): at large negative margins σ(z/τ) underflows to 0 while e^(−z) overflows,
    # and their product, whose limit is 0 (e^(z(1/τ − 1)) for τ < 1), would be 0·inf = nan in value and gradient.
    # 1 − σ(z/τ) is σ(−z/τ), exact where σ(z/τ) rounds to 1.
    return torch.sigmoid(-z / tau) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / tau) - z)


# --- f-DPO --------------------------------------------------------------------------------------------------------

_FDPO = dict(paper="Beyond Reverse KL: Generalizing DPO with Diverse Divergence Constraints", arxiv="2309.16240")


@PREFERENCE.register(
    "fdpo_forward_kl", **_FDPO, trl="loss_type=sigmoid, f_divergence_type=forward_kl",
    catalog="preference:18",
    notes="f′(u) = −1/u: checked against alecwangcq/f-divergence-dpo trainers.py::forward_dpo_loss; TRL 1.16 "
          "uses 1 − e^(−h) (the constant cancels). Exponent clamped at 80 in float32 (TRL clamps only α-div)")
def fdpo_forward_kl(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1):
    """f-DPO, forward KL: −log σ(β·(−e^(−h_w) + e^(−h_l))), DPO with f′(π/π_ref) = −π_ref/π in place of h.

    Default β=0.1 (the paper's HH runs). The exponent is clamped at 80 so it stays finite in float32.
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    fw, fl = -torch.exp((-hw).clamp(max=_EXP_CLAMP)), -torch.exp((-hl).clamp(max=_EXP_CLAMP))
    return -F.logsigmoid(beta * (fw - fl))


@PREFERENCE.register(
    "fdpo_js", **_FDPO, trl="loss_type=sigmoid, f_divergence_type=js_divergence",
    catalog="preference:18",
    notes="f′(u) = log(2u/(1+u)) = log 2 + log σ(h): checked against alecwangcq/f-divergence-dpo "
          "trainers.py::js_dpo_loss; identical to TRL 1.16 js_divergence")
def fdpo_js(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1):
    """f-DPO, Jensen-Shannon: −log σ(β·(log σ(h_w) − log σ(h_l))), f′(u) = log(2u/(1+u)) (log 2 cancels).

    Default β=0.1 (the paper's HH runs).
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * (F.logsigmoid(hw) - F.logsigmoid(hl)))


@PREFERENCE.register(
    "fdpo_alpha", **_FDPO,
    catalog="preference:18",
    trl="loss_type=sigmoid, f_divergence_type=alpha_divergence, f_alpha_divergence_coef=1-alpha",
    notes="f′(u) = (1 − u^(−α))/α, α ∈ (0,1): checked against alecwangcq/f-divergence-dpo "
          "trainers.py::alpha_dpo_loss. TRL 1.16 computes (u^(c−1) − 1)/(c−1) with c = f_alpha_divergence_coef, "
          "i.e. the paper's α = 1 − c (same at the default 0.5; its docstring's 'u^-α' does not match its code)")
def fdpo_alpha(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1,
               alpha: float = 0.5):
    """f-DPO, α-divergence: −log σ(β·(f′(u_w) − f′(u_l))), f′(u) = (1 − u^(−α))/α, u = π/π_ref.

    α→0 recovers DPO (reverse KL), α→1 forward KL. Defaults β=0.1, α=0.5 (the authors' HH scripts). The
    exponent −αh is clamped at 80 in float32, as TRL does, so it stays finite.
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    # −expm1 keeps 1 − u^(−α) accurate for small α·h (the α→0 limit is DPO)
    fw = -torch.expm1((-alpha * hw).clamp(max=_EXP_CLAMP)) / alpha
    fl = -torch.expm1((-alpha * hl).clamp(max=_EXP_CLAMP)) / alpha
    return -F.logsigmoid(beta * (fw - fl))


# --- DPO + NLL on the chosen ---------------------------------------------------------------------------------------


@PREFERENCE.register(
    "rpo", paper="Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly an Adversarial "
                 "Regularizer", arxiv="2405.16436",
    catalog="preference:31",
    notes="main-paper (cumulative) form, checked against YSLIU627/Regularized-Preference-Optimization "
          "alignment-handbook/scripts/rpo_trainer.py (losses -= policy_chosen_logps * beta * eta, summed logps) "
          "and recipes/zephyr-7b-beta/rpo (eta 0.005, beta 0.01). TRL's ['sigmoid','sft'] with weights "
          "[1, eta] differs: no β factor and a batch token-mean NLL (the paper's App. F 'average' variant)")
def rpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.01,
        eta: float = 0.005):
    """RPO: −log σ(βΔ) − η·β·ℓ_w, DPO plus an SFT (NLL) term on the chosen with SUMMED log-probs.

    The NLL is the cumulative (summed over tokens) log-likelihood, scaled by η·β as in the paper's objective
    and the authors' code. Defaults η=0.005, β=0.01 from the authors' Zephyr-7B recipe.
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    lw = as_float(chosen_logps)
    return -F.logsigmoid(beta * (hw - hl)) - eta * beta * lw


@PREFERENCE.register(
    "dpo_nll", paper="Iterative Reasoning Preference Optimization", arxiv="2404.19733",
    catalog="preference:30",
    notes="L_DPO+NLL with α on the NLL term (paper v3; TRL <= 0.28 rpo_alpha, recommended 1.0). The NLL is "
          "normalized per example by the chosen completion length; TRL's rpo_alpha / 1.16 ['sigmoid','sft'] "
          "average over all chosen tokens of the batch instead (equal only for equal lengths)")
def dpo_nll(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, *,
            beta: float = 0.1, alpha: float = 1.0):
    """DPO+NLL: −log σ(βΔ) − α·ℓ_w/|y_w|, DPO plus the per-token-average NLL of the chosen completion.

    The reference is the previous iteration's model. Defaults α=1, β=0.1 (paper). Lengths are clamped at 1.
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    lw, nw = map(as_float, (chosen_logps, chosen_lengths))
    return -F.logsigmoid(beta * (hw - hl)) - alpha * lw / nw.clamp(min=1.0)


# --- per-token entries: WPO, LD-DPO --------------------------------------------------------------------------------


@PREFERENCE.register(
    "wpo", paper="WPO: Enhancing RLHF with Weighted Preference Optimization", arxiv="2406.11827",
    catalog="preference:9",
    notes="checked against wzhouad/WPO scripts/run_wpo.py (get_batch_logps weight, clamp max=1, detached) and "
          "training_configs (beta 0.01). TRL 1.16 use_weighting=True computes the same weight without the clamp")
def wpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_token_logps,
        rejected_token_logps, chosen_token_log_sum_sq_probs, rejected_token_log_sum_sq_probs, chosen_mask,
        rejected_mask, *, beta: float = 0.01):
    """WPO: −w·log σ(βΔ), w = min(1, w_w·w_l), w(y) = exp(mean_t[log π(y_t|·) − log Σ_v π(v|·)²]), detached.

    w(y) is the length-normalized probability of y under the current policy "aligned" to its own sampling
    distribution, so off-policy pairs are weighted like on-policy ones. Per-token inputs: the policy's token
    log-probs and log Σ_v π(v|prefix)² per position, right-padded with masks. Default β=0.01 (authors' configs).
    """
    hw, hl = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    with torch.no_grad():
        aligned_w = masked_row_mean(torch.as_tensor(chosen_token_logps).float()
                                    - torch.as_tensor(chosen_token_log_sum_sq_probs).float(), chosen_mask)
        aligned_l = masked_row_mean(torch.as_tensor(rejected_token_logps).float()
                                    - torch.as_tensor(rejected_token_log_sum_sq_probs).float(), rejected_mask)
        weight = torch.exp(aligned_w + aligned_l).clamp(max=1.0)
    return -weight * F.logsigmoid(beta * (hw - hl))


def _desensitized_logps(token_logps, mask, shared_lengths, alpha):
    """Σ over the first `shared_lengths` completion tokens + α·Σ over the rest (LD-DPO's ℓ̃)."""
    mask = torch.as_tensor(mask).bool()
    position = mask.long().cumsum(-1)  # 1-based index among completion tokens
    in_shared = mask & (position <= shared_lengths.unsqueeze(-1))
    in_tail = mask & (position > shared_lengths.unsqueeze(-1))
    logps = torch.as_tensor(token_logps).float()
    return torch.where(in_shared, logps, 0.0).sum(-1) + alpha * torch.where(in_tail, logps, 0.0).sum(-1)


@PREFERENCE.register(
    "ld_dpo", paper="Length Desensitization in Direct Preference Optimization", arxiv="2409.06411",
    catalog="preference:11",
    trl="ld_alpha=alpha (loss_type=sigmoid)",
    notes="checked against TRL 1.16 _compute_loss ld_alpha branch (shared prefix = min of the two completion "
          "lengths, applied to policy and reference alike)")
def ld_dpo(chosen_token_logps, rejected_token_logps, ref_chosen_token_logps, ref_rejected_token_logps,
           chosen_mask, rejected_mask, *, beta: float = 0.1, alpha: float = 0.5):
    """LD-DPO: DPO on ℓ̃(y) = ℓ(y_≤l_p) + α·ℓ(y_>l_p), l_p = min(|y_w|, |y_l|), for policy and reference.

    Tokens past the shorter completion's length (the "verbose" tail) count with weight α ∈ [0, 1]: α=1 is
    DPO. The paper tunes α per model; 0.5 is a mid-range starting point, not a paper constant. β=0.1.
    """
    mw, ml = torch.as_tensor(chosen_mask).bool(), torch.as_tensor(rejected_mask).bool()
    shared = torch.minimum(mw.sum(-1), ml.sum(-1))
    lw = _desensitized_logps(chosen_token_logps, mw, shared, alpha)
    ll = _desensitized_logps(rejected_token_logps, ml, shared, alpha)
    rw = _desensitized_logps(ref_chosen_token_logps, mw, shared, alpha)
    rl = _desensitized_logps(ref_rejected_token_logps, ml, shared, alpha)
    return -F.logsigmoid(beta * ((lw - rw) - (ll - rl)))
