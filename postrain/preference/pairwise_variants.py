"""Reference-based pairwise DPO variants from the seed papers (offsets, length / entropy terms, score margins,
token- and turn-level weights, batch-level robustness, iterative / self-play regressions).

Every entry returns per-example losses (B,); an entry whose loss couples the batch (β-DPO, Dr. DPO) returns its
batch loss spread so that `.mean()` is the paper's loss. Log-probs are SUMMED over completion tokens unless the
docstring says the entry length-normalizes them itself. Computation is in float32 whatever the input dtype.
Notation: h = ℓ − ℓ_ref (policy minus reference summed log-prob), Δ = h_w − h_l, LS = logsigmoid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from postrain.errors import DataError, RecipeError
from postrain.preference.registry import PREFERENCE
from postrain.registry import Requirement
from postrain.tensors import as_float, masked


def _beta_dpo_rows(params: dict, layout) -> int:
    """σ0 is a std (2 pairs), and the selection keeps int(N(1 − rho)) of N pairs, at least one."""
    rho = float(params.get("rho", 0.0))
    return max(2, math.ceil(1.0 / (1.0 - rho) - 1e-9)) if rho < 1 else 2


# What the batch-coupled entries need from the batch layout (postrain.jobs.liveness): γ-PO and Dr. DPO see one
# process' micro-batch, β-DPO the batch gathered over processes (postrain.trainers.dpo_state).
_GAMMA_PO_BATCH = Requirement("rows_per_batch", "the reallocation of the margin over the batch's pairs (one pair "
                                                "gets gamma itself, as SimPO)", amount=2, scope="process")
_DR_DPO_BATCH = Requirement("rows_per_batch", "the soft worst case over the batch's pairs (over one pair it is that "
                                              "pair's DPO loss)", amount=2, scope="process")
_BETA_DPO_BATCH = Requirement("rows_per_batch", "the batch-level beta and the selection of pairs (the margin "
                                                "statistics of the gathered batch)", amount=_beta_dpo_rows)


def _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps):
    return (as_float(chosen_logps) - as_float(ref_chosen_logps)) - (as_float(rejected_logps) - as_float(ref_rejected_logps))


def _without_pairs(losses, dropped):
    """`losses` with the `dropped` pairs taken out of the batch mean, as if filtered out of the data: they get 0
    (and no gradient) and the kept ones are scaled by B / kept, so `.mean()` is the mean over the kept pairs (0
    when none is kept)."""
    kept = (~dropped).sum().clamp(min=1)
    return torch.where(dropped, torch.zeros_like(losses), losses) * (losses.numel() / kept)


def _odpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, offset_base, tie, beta, alpha):
    # Ties get a placeholder base of 1 (offset 0) before they are dropped, so no log(0) reaches the backward pass.
    base = torch.where(tie, torch.ones_like(offset_base), offset_base)
    losses = -F.logsigmoid(beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
                           - alpha * torch.log(base))
    return _without_pairs(losses, tie)


@PREFERENCE.register("odpo", paper="Direct Preference Optimization with an Offset", arxiv="2402.10571",
                     catalog="preference:8",
                     notes="checked against rycolab/odpo trainers.py::preference_loss (offset branch) and "
                           "config/loss/odpo.yaml (alpha=1.0). Ties (s_w = s_l) are dropped from the batch mean, "
                           "as preference_datasets.py::tldr_paired_responses drops equal-reward pairs from the data "
                           "(their offset log 0 = -inf would give loss 0 and nan under alpha=0)")
def odpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, score_chosen, score_rejected, *,
         beta: float = 0.1, alpha: float = 1.0):
    """ODPO: DPO with a score-dependent offset, −LS(βΔ − α·log(s_w − s_l)).

    The chosen must beat the rejected by more when its score gap is larger. Pairs with equal scores carry no
    preference and have no finite offset: they are left out of the batch mean, as the authors leave them out of
    their data (see `_without_pairs`). A pair scored s_w < s_l raises DataError (its offset is undefined).
    alpha=1.0 is the authors' config default; the paper tunes β per task (the repo config leaves it required), so
    beta=0.1 here is DPO's usual default, not an ODPO value."""
    s_w, s_l = as_float(score_chosen), as_float(score_rejected)
    disordered = ~(s_w >= s_l)  # also catches nan scores
    if disordered.any():
        i = int(disordered.nonzero()[0])
        raise DataError(f"odpo: {int(disordered.sum())} pair(s) of this batch have score_chosen below score_rejected "
                        f"(or not a number), e.g. {float(s_w[i])} vs {float(s_l[i])}: the offset log(score_chosen - "
                        f"score_rejected) is undefined; the chosen response must be scored at least as high as the "
                        f"rejected one (fix or drop those pairs)")
    return _odpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, s_w - s_l, s_w == s_l,
                      beta, alpha)


@PREFERENCE.register("odpo_log_ratio", paper="Direct Preference Optimization with an Offset", arxiv="2402.10571",
                     catalog="preference:8",
                     notes="rycolab/odpo trainers.py::preference_loss, offset branch with ratio=True; ties dropped "
                           "as in `odpo`")
def odpo_log_ratio(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, score_chosen,
                   score_rejected, *, beta: float = 0.1, alpha: float = 1.0):
    """ODPO, ratio offset: −LS(βΔ − α·log(s_w / s_l)), for positive scores.

    The authors' `ratio=True` variant of `odpo` (same defaults; ties dropped from the batch mean in the same way).
    A score that is not positive raises DataError (its log-ratio is undefined)."""
    s_w, s_l = as_float(score_chosen), as_float(score_rejected)
    not_positive = ~((s_w > 0) & (s_l > 0))
    if not_positive.any():
        i = int(not_positive.nonzero()[0])
        raise DataError(f"odpo_log_ratio: {int(not_positive.sum())} pair(s) of this batch have a score that is not "
                        f"positive, e.g. score_chosen {float(s_w[i])}, score_rejected {float(s_l[i])}: the offset "
                        f"log(score_chosen / score_rejected) needs positive scores; use `odpo` (the score "
                        f"difference) for scores that can be 0 or negative")
    return _odpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, s_w / s_l, s_w == s_l,
                      beta, alpha)


@PREFERENCE.register("r_dpo", paper="Disentangling Length from Quality in Direct Preference Optimization",
                     catalog="preference:12",
                     arxiv="2403.19159",
                     notes="form −LS(βΔ + α(|y_w|−|y_l|)) of Park et al. (also SimPO's Table 1 baseline list); "
                           "derived here from the length-penalized reward r − α|y|; sign differs from the "
                           "catalog's (R) entry #12. Used by iLR-DPO (2406.11817) inside iterative DPO.")
def r_dpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths,
          *, beta: float = 0.1, alpha: float):
    """R-DPO (length-regularized DPO): −LS(βΔ + α(|y_w| − |y_l|)).

    The policy optimizes r − α|y| under the KL constraint, so the preference probability on the true reward is
    σ(βΔ + α(|y_w| − |y_l|)): a longer chosen response is credited its length and the policy gains nothing by
    growing it. |y| counts completion tokens. The papers sweep alpha (of order 1e-2 in Park et al.), so it has no
    default and must be set; beta=0.1 is DPO's usual default."""
    lengths = as_float(chosen_lengths) - as_float(rejected_lengths)
    return -F.logsigmoid(beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
                         + alpha * lengths)


@PREFERENCE.register("h_dpo", paper="Entropy Controllable Direct Preference Optimization", arxiv="2411.07595",
                     catalog="preference:17",
                     notes="derived from the paper's objective (entropy term scaled by α, optimum "
                           "π* ∝ (π_ref e^{r/β})^{1/α}); agrees with the catalog and a third-party implementation; "
                           "alpha default not established")
def h_dpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1, alpha: float):
    """H-DPO: −LS(β[(αℓ_w − ℓ_ref,w) − (αℓ_l − ℓ_ref,l)]); α < 1 sharpens (lowers the entropy of) the policy.

    The KL regularizer −H(π) − E log π_ref becomes −αH(π) − E log π_ref, whose optimum gives the implicit reward
    β(α log π − log π_ref). alpha=1 is DPO. The paper's alpha (below 1) was not re-read here, so it must be set."""
    chosen = alpha * as_float(chosen_logps) - as_float(ref_chosen_logps)
    rejected = alpha * as_float(rejected_logps) - as_float(ref_rejected_logps)
    return -F.logsigmoid(beta * (chosen - rejected))


def _unit_scores(name, score_chosen, score_rejected, score_scale):
    """Scores mapped onto [0, 1]: linearly from the scale (lo, hi) they are on, or by the logistic function
    ("logistic") for unbounded reward-model scores. Raises RecipeError for a bad `score_scale` and DataError when
    a mapped score falls outside [0, 1] or the chosen is mapped below the rejected."""
    s_w, s_l = as_float(score_chosen), as_float(score_rejected)
    if score_scale == "logistic":
        r_w, r_l = torch.sigmoid(s_w), torch.sigmoid(s_l)
    else:
        try:
            lo, hi = (float(x) for x in score_scale)
        except (TypeError, ValueError):
            lo = hi = None
        if lo is None or not hi > lo:
            raise RecipeError(f"{name}: score_scale must be two numbers lo < hi, the scale the scores are on, "
                              f"mapped linearly onto [0, 1] (e.g. [0, 10] for a 1-10 judge score), or 'logistic' "
                              f"(unbounded reward-model scores), not {score_scale!r}")
        r_w, r_l = (s_w - lo) / (hi - lo), (s_l - lo) / (hi - lo)
    outside = ~((r_w >= 0) & (r_w <= 1) & (r_l >= 0) & (r_l <= 1))
    if outside.any():
        i = int(outside.nonzero()[0])
        raise DataError(f"{name}: scores must lie in [0, 1] after score_scale={score_scale!r}, but "
                        f"{int(outside.sum())} pair(s) of this batch do not, e.g. score_chosen {float(s_w[i])}, "
                        f"score_rejected {float(s_l[i])}: set score_scale to the scale the scores are on (e.g. "
                        f"[0, 10] for UltraFeedback's 1-10 GPT-4 scores) or to 'logistic' for unbounded reward-model "
                        f"scores")
    if (r_w < r_l).any():
        i = int((r_w < r_l).nonzero()[0])
        raise DataError(f"{name}: {int((r_w < r_l).sum())} pair(s) of this batch have score_chosen below "
                        f"score_rejected, e.g. {float(s_w[i])} vs {float(s_l[i])}: the reward gap must lie in "
                        f"[0, 1] (the chosen response scored at least as high as the rejected one)")
    return r_w, r_l


@PREFERENCE.register("mappo", paper="MaPPO: Maximum a Posteriori Preference Optimization with Prior Knowledge",
                     catalog="preference:24",
                     arxiv="2507.21183",
                     notes="paper v5 Eq. 8 (confidence P); rewards r in [0, 1], obtained in App. D.2.4 by a "
                           "logistic function on the reward models' absolute rewards (score_scale: logistic)")
def mappo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, score_chosen, score_rejected, *,
          beta: float = 0.1, score_scale=(0.0, 1.0)):
    """MaPPO (DPO form): −LS(β·h_w − Δr·β·h_l), Δr = r_w − r_l with the scores mapped onto [0, 1].

    The reward-model prior scales down the push on the rejected response when both are good (small Δr); Δr = 1
    is DPO. `score_scale` says how scores become r ∈ [0, 1]: [lo, hi] maps the scale they are on linearly (the
    default [0, 1] takes them as they are; [0, 10] divides a 1-10 judge score by 10), 'logistic' applies σ to
    unbounded reward-model scores (the paper's choice). A mapped score outside [0, 1], or a chosen below the
    rejected, raises DataError. No new loss hyperparameter; beta=0.1 (paper Table 4). Scores are data (no
    gradient)."""
    r_w, r_l = _unit_scores("mappo", score_chosen, score_rejected, score_scale)
    gap = (r_w - r_l).detach()
    h_w = as_float(chosen_logps) - as_float(ref_chosen_logps)
    h_l = as_float(rejected_logps) - as_float(ref_rejected_logps)
    return -F.logsigmoid(beta * h_w - gap * beta * h_l)


@PREFERENCE.register("tgdpo", paper="TGDPO: Harnessing Token-Level Reward Guidance for Enhancing DPO",
                     catalog="preference:25",
                     trainer_inputs={"token_reward_model": None},  # the DPO-trained model: no default
                     arxiv="2506.14574",
                     notes="checked against dvlab-research/TGDPO src/llamafactory/train/tgdpo/trainer.py "
                           "(sigmoid branch) and examples/llama3_8b_instruct_tgdpo.yaml")
def tgdpo(chosen_token_logps, rejected_token_logps, ref_chosen_token_logps, ref_rejected_token_logps,
          chosen_token_rewards, rejected_token_rewards, chosen_mask, rejected_mask, *,
          beta: float = 0.1, alpha: float = 0.5):
    """TGDPO: −LS(Σ_t β(1 + αβ r̂_w,t) h_w,t − Σ_t β(1 − αβ r̂_l,t) h_l,t), token-level reward guidance.

    h_t = log π(y_t) − log π_ref(y_t); r̂_t = log π_rm(y_t) − log π_ref(y_t) is the token reward from an already
    DPO-trained model (passed as `*_token_rewards`, detached). Sums run over completion tokens (mask).
    Defaults beta=0.1, alpha=0.5 from the authors' Llama-3-8B-Instruct config."""
    def side(logps, ref, rewards, mask, sign):
        weight = beta * (1 + sign * alpha * beta * masked(rewards, mask).detach())
        return (weight * (masked(logps, mask) - masked(ref, mask))).sum(-1)

    chosen = side(chosen_token_logps, ref_chosen_token_logps, chosen_token_rewards, chosen_mask, 1.0)
    rejected = side(rejected_token_logps, ref_rejected_token_logps, rejected_token_rewards, rejected_mask, -1.0)
    return -F.logsigmoid(chosen - rejected)


@PREFERENCE.register("omni_dpo",
                     catalog="preference:26",
                     paper="Omni-DPO: A Dual-Perspective Paradigm for Dynamic Preference Learning of LLMs",
                     arxiv="2506.10054",
                     notes="checked against pspdada/Uni-DPO Textual/train/scripts/uni_dpo_trainer.py::uni_dpo_loss "
                           "and Textual/train/configs/Gemma-2-9B-IT.yaml (all configs use dpo_length_norm=True)")
def omni_dpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
             rejected_lengths, score_chosen, score_rejected, *, beta: float = 10.0, eta: float = 0.7,
             tau_ref: float = 0.8, gamma: float = 3.0, lam: float = 1e-3, tau_good: float = 3.2):
    """Omni-DPO (Uni-DPO): −w_qual·w_perf·LS(βΔ̄) − λ·1[s_w ≥ τ_good]·1[ℓ̄_ref,w > ℓ̄_w]·ℓ̄_w.

    All log-probs are per-token averages (ℓ̄ = ℓ/|y|, policy and reference). w_qual = σ(η(s_w − s_l)) weights by
    the judge-score gap; w_perf = (1 − σ(β(ℓ̄_w − ℓ̄_l) − τ_ref))^γ is a focal weight that fades pairs the policy
    already separates (not detached, as in the authors' code); the NLL term lifts good chosen responses whose
    likelihood fell below the reference. Defaults: the authors' Gemma-2-9B-IT config (τ_good is on the judge's
    score scale)."""
    pol_w, pol_l = as_float(chosen_logps) / as_float(chosen_lengths), as_float(rejected_logps) / as_float(rejected_lengths)
    ref_w, ref_l = as_float(ref_chosen_logps) / as_float(chosen_lengths), as_float(ref_rejected_logps) / as_float(rejected_lengths)
    s_w, s_l = as_float(score_chosen), as_float(score_rejected)
    w_qual = torch.sigmoid(eta * (s_w - s_l))
    w_perf = (1 - torch.sigmoid(beta * (pol_w - pol_l) - tau_ref)) ** gamma
    loss = -w_qual * w_perf * F.logsigmoid(beta * ((pol_w - ref_w) - (pol_l - ref_l)))
    nll_on = ((s_w >= tau_good) & (ref_w > pol_w.detach())).float()
    return loss - lam * nll_on * pol_w


def _gamma_po_margins(gaps, gamma, tau, iters: int = 20, eps: float = 1e-10):
    """γ_i = γ0·N·p_i from exponentiated-gradient steps on min_p Σ p_i ℓ(gap_i − γ0 N p_i) + τ KL(p‖U)."""
    n = gaps.numel()
    p = torch.full_like(gaps, 1.0 / n)
    lr = min(0.5 / tau, 1.0)
    for _ in range(iters):
        # γ is read before the step, so the returned margins are those of the last iterate but one (as in
        # the authors' loop).
        margins = gamma * n * p
        grad = tau * (1 + torch.log(n * (p + eps))) + gamma * n / (1 + torch.exp(gaps - margins)) / n
        step = torch.exp(-lr * grad)
        p = p * step / (p * step).sum()
    return margins


@PREFERENCE.register("gamma_po", paper="Robust Preference Optimization via Dynamic Target Margins",
                     requires=(_GAMMA_PO_BATCH,),
                     catalog="preference:13",
                     arxiv="2506.03690",
                     notes="checked against sunjie279/gammaPO scripts/simpo_trainer.py (gm-simpo branch, "
                           "get_gamma_dq) and training_configs/llama-3-8b-it-gmsimpo-beta10-gm0.4-tau10-lr1e-6.yaml")
def gamma_po(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, queue_gaps=None, *,
             beta: float = 10.0, gamma: float = 4.0, tau: float = 10.0):
    """γ-PO (on SimPO): −LS(gap_i − γ_i), gap_i = β(ℓ̄_w − ℓ̄_l), with per-pair margins γ_i (reference-free).

    The margins solve, by 20 exponentiated-gradient steps (lr = min(0.5/τ, 1)), a KL-regularized reallocation
    of the total margin γ0·N over the N gaps (this batch plus `queue_gaps`), so confident pairs get larger
    margins and ambiguous ones smaller; they are detached. `queue_gaps` (Q,) are detached β-gaps of recent
    batches: the authors keep a deque and pass a random sample of min(len, 256 − B) of them; without it the
    margins are solved over the batch alone. gamma is γ0 (= 0.4·β); defaults: authors' Llama-3-8B-Instruct
    config (β=10, γ0/β=0.4, τ=10)."""
    gaps = beta * (as_float(chosen_logps) / as_float(chosen_lengths) - as_float(rejected_logps) / as_float(rejected_lengths))
    pool = gaps.detach()
    if queue_gaps is not None:
        pool = torch.cat([as_float(queue_gaps).detach().reshape(-1).to(gaps.device), pool])
    margins = _gamma_po_margins(pool, gamma, tau)[-gaps.numel():]
    return -F.logsigmoid(gaps - margins)


@PREFERENCE.register("dr_dpo",
                     requires=(_DR_DPO_BATCH,),
                     catalog="preference:14",
                     paper="Towards Robust Alignment of Language Models: Distributionally Robustifying Direct "
                           "Preference Optimization", arxiv="2407.07880",
                     notes="checked against junkangwu/Dr_DPO trainers.py (mode_loss == 'DrDPO') and README "
                           "(loss.beta=0.1, mode_weight=β'=1.0)")
def dr_dpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1,
           beta_prime: float = 1.0):
    """Dr. DPO: −β′·log mean_i exp(−L_DPO,i / β′), a soft worst case over the batch's pairs.

    Couples the batch: the batch loss is returned at every position (its mean is the paper's loss). β′ → ∞
    gives DPO's mean; small β′ down-weights pairs with high loss (likely label noise). Reduce over the whole
    global batch (all-gather under DDP) to match the paper. Defaults from the authors' README."""
    dpo = -F.logsigmoid(beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps))
    n = dpo.numel()
    batch = -beta_prime * (torch.logsumexp(-dpo / beta_prime, dim=0) - math.log(n))
    return batch.expand(n)


@PREFERENCE.register("beta_dpo", paper="β-DPO: Direct Preference Optimization with Dynamic β", arxiv="2407.08639",
                     requires=(_BETA_DPO_BATCH,),
                     # the trainer's state (postrain.trainers.dpo_state), set beside the hyperparameters: momentum,
                     # the EMA's (authors' gamma 0.9); rho, the fraction of each batch's pairs left out (authors'
                     # mode_weight, README 0.2); 0 keeps every pair (β calibration only)
                     state_settings={"momentum": 0.9, "rho": 0.2},
                     catalog="preference:7",
                     notes="checked against junkangwu/beta-DPO trainers.py::preference_loss (mode_loss beta_DPO) "
                           "and update_and_sync_tensor_mean; README example a=0.6, mode_weight=0.2")
def beta_dpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, margin_ema_mean, margin_ema_std,
             selection_mask=None, selected_margin_mean=None, selected_fraction=None, *, beta: float = 0.1,
             alpha: float = 0.6):
    """β-DPO: −LS(β_b·Δ_i) on the selected pairs, β_b = max(β0·(1 + α(mean_sel Δ − M0)), 1e-3), detached.

    Δ_i is the unscaled implicit margin; M0 = `margin_ema_mean`. The trainer keeps M0 and σ0 =
    `margin_ema_std` as EMAs of the batch mean / std of Δ (momentum 0.9, started at 0) and updates them with the
    current (all-gathered) batch BEFORE calling. Pair selection is random in the paper: sample (1 − ρ)·B pairs
    without replacement with probability ∝ exp(−(Δ_i − M0)²/(2σ0²)), ρ = 0.2, and pass them as
    `selection_mask` (1 = kept). Without a mask every pair is kept (β calibration only; no filtering) and σ0
    is unused. Couples the batch: returns mask·loss/(Σmask/B) so that the mean is the paper's masked average.

    When the batch is split over processes, the trainer passes the whole (gathered) batch's statistics:
    `selected_margin_mean`, the mean Δ of the selected pairs (the authors' β_b is the gathered selection's), and
    `selected_fraction`, Σmask/N over the gathered batch, so that the processes' mean losses average to the
    whole batch's. Left out, both are those of the pairs given (one process)."""
    margins = _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    mask = torch.ones_like(margins) if selection_mask is None else as_float(selection_mask).to(margins.device)
    if selected_margin_mean is None:
        selected_margin_mean = (margins.detach() * mask).sum() / mask.sum()
    if selected_fraction is None:
        selected_fraction = mask.sum() / mask.numel()
    selected_mean = as_float(selected_margin_mean).to(margins.device)
    beta_b = (beta * (1 + alpha * (selected_mean - as_float(margin_ema_mean).to(margins.device)))).clamp(min=1e-3)
    losses = -F.logsigmoid(beta_b.detach() * margins)
    kept = mask > 0
    return torch.where(kept, losses, torch.zeros_like(losses)) / as_float(selected_fraction).to(margins.device)


@PREFERENCE.register("ra_dpo", paper="Risk-aware Direct Preference Optimization under Nested Risk Measure",
                     catalog="preference:15",
                     # the authors' config/loss/ra-dpo.yaml (confidence_level 0.95, is_split_risk_ratio true)
                     trainer_inputs={"confidence_level": 0.95, "split_vocab": True},
                     arxiv="2505.20359",
                     notes="loss checked against zlj123-max/Ra-DPO Ra-DPO/train/trainers.py::Ra_DPOTrainer.loss "
                           "and config/loss/ra-dpo.yaml; the per-token risk ratios (CVaR over the vocabulary, "
                           "calculate_cvar) are inputs, not computed here")
def ra_dpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_token_risk_ratios,
           rejected_token_risk_ratios, chosen_mask, rejected_mask, *, beta: float = 0.1, alpha: float = 0.5,
           ra_dpo2: bool = False):
    """Ra-DPO: −LS(β[Δ − (R_l − R_w)]); Ra-DPO2: −LS(β[Δ − α(R_l − sg(R_w))]).

    R = Σ_t (mask) of the per-token sequential risk ratio, which the trainer computes from the full-vocabulary
    distributions of policy and reference (the authors' `calculate_cvar`: ref-probability-weighted
    (log π_ref − log π) above its VaR at confidence 0.95) and passes as `*_token_risk_ratios`; gradients flow
    through them as in the authors' code. alpha acts only in Ra-DPO2. Defaults from config/loss/ra-dpo.yaml."""
    risk_w = masked(chosen_token_risk_ratios, chosen_mask).sum(-1)
    risk_l = masked(rejected_token_risk_ratios, rejected_mask).sum(-1)
    delta = _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    risk = alpha * (risk_l - risk_w.detach()) if ra_dpo2 else risk_l - risk_w
    return -F.logsigmoid(beta * (delta - risk))


@PREFERENCE.register("modpo", paper="Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct Preference "
                                    "Optimization", arxiv="2310.03708",
                     catalog="preference:49",
                     notes="checked against ZHZisZZ/modpo src/trainer/modpo_trainer.py::modpo_loss (sigmoid) and "
                           "scripts/modpo/beavertails/modpo.py (beta=0.1, w=(0.5, 0.5))")
def modpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, score_chosen, score_rejected, *,
          beta: float = 0.1, w: tuple = (0.5, 0.5)):
    """MODPO: −LS((1/w_0)·[βΔ − w_{1:}ᵀ(r_{1:}(y_w) − r_{1:}(y_l))]).

    Trains the objective with weight w_0 on its preference pairs while the other objectives enter as margin
    rewards from fixed reward models: `score_chosen` / `score_rejected` hold them, shape (B,) for one or
    (B, K) for K margin objectives; `w` = (w_0, w_1, …, w_K). Defaults from the authors' BeaverTails script."""
    weights = torch.as_tensor(w, dtype=torch.float32)
    w0, rest = float(weights[0]), weights[1:]
    s_w, s_l = as_float(score_chosen), as_float(score_rejected)
    if s_w.dim() == 1:
        s_w, s_l = s_w[:, None], s_l[:, None]
    if s_w.shape[-1] != rest.numel():
        raise ValueError(f"modpo: {s_w.shape[-1]} margin reward(s) but w has {rest.numel()} margin weight(s)")
    rest = rest.to(s_w.device)
    margin_rewards = ((s_w - s_l) * rest).sum(-1)
    delta = _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid((beta * delta - margin_rewards) / w0)


@PREFERENCE.register("inpo", paper="Iterative Nash Policy Optimization: Aligning LLMs with General Preferences via "
                                   "No-Regret Learning", arxiv="2407.00617",
                     catalog="preference:39",
                     notes="catalog (3P): matches a third-party train_inpo.py; defaults from the same source, "
                           "not re-read in the paper")
def inpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, prev_chosen_logps,
         prev_rejected_logps, *, eta: float = 0.0075, tau: float = 0.0025):
    """INPO: (Δ_π − (τ/η)Δ_ref − ((η−τ)/η)Δ_t − 1/(2η))², with Δ_• = ℓ_•(y_w) − ℓ_•(y_l).

    Online mirror descent on the preference game: IPO against a geometric mixture of the reference π_ref and the
    previous iterate π_t (`prev_*_logps`, from the policy that generated this round's pairs). η is the inverse
    step size, τ the KL strength (0 < τ < η; defaults η=7.5e-3, τ=η/3)."""
    delta_pi = as_float(chosen_logps) - as_float(rejected_logps)
    delta_ref = as_float(ref_chosen_logps) - as_float(ref_rejected_logps)
    delta_t = as_float(prev_chosen_logps) - as_float(prev_rejected_logps)
    return (delta_pi - (tau / eta) * delta_ref - ((eta - tau) / eta) * delta_t - 1 / (2 * eta)) ** 2


@PREFERENCE.register("rebel", paper="REBEL: Reinforcement Learning via Regressing Relative Rewards",
                     catalog=("preference:81", "rl:64"),
                     arxiv="2404.16767",
                     notes="checked against ZhaolinGao/REBEL src/ultrafeedback/rebel.py (reg_diff, eta=1.0)")
def rebel(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, score_chosen, score_rejected, *,
          eta: float = 1.0):
    """REBEL (pairwise): ((h(y) − h(y′)) − η(r(y) − r(y′)))², h = ℓ_θ − ℓ_old.

    Regresses the relative log-ratio to the previous iterate π_old (passed as `ref_*_logps`) onto the reward
    difference; the two responses need not be ordered. This is the authors' code form; the paper writes
    ((1/η)Δh − Δr)², which is the same up to the factor η². Default eta=1.0 (authors' UltraFeedback script)."""
    delta = _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (delta - eta * (as_float(score_chosen) - as_float(score_rejected))) ** 2


@PREFERENCE.register("reward_aware_po",
                     catalog="preference:82",
                     paper="Reward-aware Preference Optimization: A Unified Mathematical Framework for Model "
                           "Alignment", arxiv="2502.00203",
                     notes="checked against NVIDIA NeMo-Aligner's DPO model preference_loss (rpo_sq, rpo_bwd_kl, "
                           "rpo_fwd_kl; ref_policy_kl_penalty=0.2, gt_reward_scale=1.0 defaults)")
def reward_aware_po(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, score_chosen,
                    score_rejected, *, beta: float = 0.2, eta: float = 1.0, distance: str = "bwd_kl"):
    """Reward-aware PO: D(βΔ ‖ η(r_w − r_l)), matching the implicit reward gap to the scaled score gap.

    distance="sq": (βΔ − ηΔr)²; "bwd_kl": KL(Bern(σ(ηΔr)) ‖ Bern(σ(βΔ))) (the Nemotron-4 form);
    "fwd_kl": KL(Bern(σ(βΔ)) ‖ Bern(σ(ηΔr))). Defaults are NeMo-Aligner's (the authors' framework)."""
    model = beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    target = eta * (as_float(score_chosen) - as_float(score_rejected))
    if distance == "sq":
        return (model - target) ** 2
    if distance not in ("bwd_kl", "fwd_kl"):
        raise ValueError(f"reward_aware_po: distance must be 'sq', 'bwd_kl' or 'fwd_kl', not {distance!r}")
    p, q = (target, model) if distance == "bwd_kl" else (model, target)
    log_p1, log_p0, log_q1, log_q0 = F.logsigmoid(p), F.logsigmoid(-p), F.logsigmoid(q), F.logsigmoid(-q)
    return log_p1.exp() * (log_p1 - log_q1) + log_p0.exp() * (log_p0 - log_q0)


def _dmpo_turn_weights(turn_mask, gamma):
    """a_j = γ^j (1 − γ^{T−j}) / (1 − γ^T) for turn j of T (0-based); (T − j)/T when γ = 1."""
    valid = as_float(turn_mask) > 0
    n_turns = valid.sum(-1, keepdim=True).float()
    j = torch.arange(valid.shape[-1], device=valid.device, dtype=torch.float32).expand_as(n_turns.expand(
        valid.shape))
    if gamma == 1:
        weights = (n_turns - j) / n_turns.clamp(min=1)
    else:
        weights = gamma ** j * (1 - gamma ** (n_turns - j)) / (1 - gamma ** n_turns).clamp(min=1e-12)
    return torch.where(valid, weights, torch.zeros_like(weights))


@PREFERENCE.register("dmpo", paper="Direct Multi-Turn Preference Optimization for Language Agents",
                     catalog="preference:86",
                     arxiv="2406.14868",
                     notes="checked against swt-user/DMPO fastchat/train/dmpo_trainer_efficient.py::"
                           "get_batch_loss_metrics (turn coefficients) and train_dmpo_efficient.py (gamma=0.7)")
def dmpo(chosen_turn_logps, rejected_turn_logps, ref_chosen_turn_logps, ref_rejected_turn_logps,
         chosen_turn_mask, rejected_turn_mask, *, beta: float = 0.1, gamma: float = 0.7):
    """DMPO: −LS(β[Σ_j a_j^w h_w^{(j)} − Σ_j a_j^l h_l^{(j)}]) over the agent turns of two trajectories.

    Inputs are per-turn summed log-probs (B, J) of the agent's turns, left-aligned, with `*_turn_mask` marking
    real turns; a_j = γ^j(1 − γ^{T−j})/(1 − γ^T) ((T−j)/T at γ=1) with T each trajectory's own number of turns,
    so early turns weigh more. Defaults beta=0.1, gamma=0.7 from the authors' training script."""
    def side(logps, ref, mask):
        return (_dmpo_turn_weights(mask, gamma) * (masked(logps, mask) - masked(ref, mask))).sum(-1)

    chosen = side(chosen_turn_logps, ref_chosen_turn_logps, chosen_turn_mask)
    rejected = side(rejected_turn_logps, ref_rejected_turn_logps, rejected_turn_mask)
    return -F.logsigmoid(beta * (chosen - rejected))


@PREFERENCE.register("sdpo_segment", paper="SDPO: Segment-Level Direct Preference Optimization for Social Agents",
                     catalog="preference:87",
                     arxiv="2501.01821",
                     notes="checked against AlibabaResearch/DAMO-ConvAI SDPO/LLaMA-Factory: train/dpo/workflow.py::"
                           "sft_2_dialogue_dpo (the pairs tokenized as SFT conversations, labels on the agent's turns "
                           "only; every label before the first differing agent turn set to -100 in both) and "
                           "train/dpo/trainer.py (CustomDPOTrainer: TRL's sigmoid dpo_loss on log-probs summed over "
                           "the labelled tokens); examples/train_full/dpo.yaml and dpo_m.yaml (pref_beta 0.1)")
def sdpo_segment(chosen_turn_logps, rejected_turn_logps, ref_chosen_turn_logps, ref_rejected_turn_logps,
                 chosen_turn_mask, rejected_turn_mask, *, beta: float = 0.1):
    """SDPO: −LS(β[Σ_j h_w^{(j)} − Σ_j h_l^{(j)}]) over the agent turns of two dialogue segments.

    The two segments share the dialogue before them (the `prompt`, which is context only) and start at the agent
    turn where they first differ; they hold the agent's turns and the partner's in between. Only the agent's turns
    count, each with weight 1 (the partner's turns are context, as the authors' labels leave them out): this is
    DPO on the segments' agent tokens, where `dmpo` weighs turn j by a discount. Inputs are per-turn summed
    log-probs (B, J) of the agent's turns, left-aligned, with `*_turn_mask` marking real turns (padding turns may
    hold anything). beta=0.1 from the authors' configs."""
    def side(logps, ref, mask):
        return (masked(logps, mask) - masked(ref, mask)).sum(-1)

    chosen = side(chosen_turn_logps, ref_chosen_turn_logps, chosen_turn_mask)
    rejected = side(rejected_turn_logps, ref_rejected_turn_logps, rejected_turn_mask)
    return -F.logsigmoid(beta * (chosen - rejected))


@PREFERENCE.register("implicit_prm_ce", paper="Free Process Rewards without Process Labels", arxiv="2412.01981",
                     catalog="preference:101",
                     notes="checked against PRIME's compute_ce_dpo_loss_rm (verl recipe/prime/prime_core_algos.py): "
                           "BCE(σ(β·Σ_t h_t), label); beta=0.05 is PRIME's beta_train")
def implicit_prm_ce(logps, ref_logps, labels, *, beta: float = 0.05):
    """Implicit PRM, cross-entropy form (unpaired): −l·LS(βh) − (1 − l)·LS(−βh), h = ℓ − ℓ_ref.

    Trains an outcome reward r = βh on response-level labels l ∈ [0, 1] (1 = correct); its partial sums over
    tokens are then free process rewards. beta=0.05 as in PRIME's implicit-PRM training."""
    z = beta * (as_float(logps) - as_float(ref_logps))
    labels = as_float(labels).to(z.device)
    return -labels * F.logsigmoid(z) - (1 - labels) * F.logsigmoid(-z)


def _mrpo_combined_reference(main, extra, alpha, eps):
    """log π̃ of one side: the further reference's log-prob clipped to within ε (relative) of the main one, then
    log π̃ = ℓ_c + ℓ_main − log(α e^{ℓ_c} + (1 − α) e^{ℓ_main}), i.e. 1/π̃ = α/π_main + (1 − α)/π_c."""
    clipped = torch.minimum(torch.maximum(extra, main * (1 + eps)), main * (1 - eps))
    top = torch.maximum(clipped, main)
    log_mix = top + torch.log(alpha * torch.exp(clipped - top) + (1 - alpha) * torch.exp(main - top))
    return clipped + main - log_mix


@PREFERENCE.register("mrpo", paper="Multi-Reference Preference Optimization for Large Language Models",
                     arxiv="2405.16388", catalog="preference:48",
                     notes="checked against the authors' code, thaihungle/MRPO src/llmtuner/train/dpo/trainer_mref.py "
                           "(MRefDPOTrainer.get_batch_loss_metrics, MRPO branch) and its defaults in "
                           "hparams/finetuning_args.py (eta=0.1 adaptive clipping, alpha=-1 adaptive weights, "
                           "dpo_beta=0.1); the paper text beyond its abstract was not available. The authors' code "
                           "(and so this entry) handles K=2 references: the main one (the policy's starting model) "
                           "and one further reference; a closed form for K>2 is not established, so K>1 further "
                           "references is refused. In that code the adaptive weight α = |a_extra|/(|a_extra|+|a_main|) "
                           "multiplies 1/π_main (α = 1 gives DPO against the main reference), as reproduced here")
def mrpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, extra_ref_chosen_logps,
         extra_ref_rejected_logps, *, references: list, beta: float = 0.1, epsilon: float = 0.1,
         adaptive_epsilon: bool = True, alpha: float | None = None):
    """MRPO: DPO, −LS(β[(ℓ_w − log π̃_w) − (ℓ_l − log π̃_l)]), against a reference π̃ combining two models.

    π_main is the main reference (`ref_*_logps`, the policy's starting model); the further reference
    (`extra_ref_*_logps`, shape (B, 1): the `logp_models` entry named in `references`) is clipped to
    [(1 + ε)ℓ_main, (1 − ε)ℓ_main] (CTRO: the policy is not pulled far from its own starting point), then
    1/π̃ = α/π_main + (1 − α)/π_c. `adaptive_epsilon` (the authors' default) splits ε between the two responses:
    ε_w = ε·|b_w|/(|b_w| + |b_l|), ε_l = ε·|b_l|/(|b_w| + |b_l|), b the two references' mean log-prob of each
    response; false clips both by ε. `alpha: null` (ARWC, the authors' default) takes, per pair,
    α = |a_extra| / (|a_extra| + |a_main| + 1e-6), a = ℓ_ref(y_w) − ℓ_ref(y_l) (how confidently a reference
    separates the pair); a number fixes it (α = 1: DPO against the main reference). Defaults beta=0.1,
    epsilon=0.1 as in the authors' code."""
    extra_w, extra_l = as_float(extra_ref_chosen_logps), as_float(extra_ref_rejected_logps)
    if extra_w.dim() == 1:
        extra_w, extra_l = extra_w.unsqueeze(-1), extra_l.unsqueeze(-1)
    k = extra_w.shape[-1]
    if len(references) != k:
        raise ValueError(f"mrpo: `references` names {len(references)} model(s) ({', '.join(map(str, references))}) "
                         f"but the batch carries log-probs of {k} further reference(s)")
    if k != 1:
        raise RecipeError(f"mrpo: {k} further references ({', '.join(map(str, references))}); MRPO's combination is "
                          f"established (authors' code) for one further reference besides the main one, so "
                          f"`references` must name exactly one `logp_models` entry")
    if alpha is not None and not 0 <= alpha <= 1:
        raise RecipeError(f"mrpo: alpha must be in [0, 1] (or null for the adaptive weights), got {alpha!r}")
    if epsilon < 0:
        raise RecipeError(f"mrpo: epsilon (the clipping range) must be >= 0, got {epsilon!r}")
    main_w, main_l = as_float(ref_chosen_logps), as_float(ref_rejected_logps)
    extra_w, extra_l = extra_w[..., 0].to(main_w.device), extra_l[..., 0].to(main_w.device)
    if alpha is None:
        confidence_extra, confidence_main = (extra_w - extra_l).abs(), (main_w - main_l).abs()
        weight = confidence_extra / (confidence_extra + confidence_main + 1e-6)
    else:
        weight = torch.full_like(main_w, float(alpha))
    if adaptive_epsilon:
        mean_w, mean_l = ((main_w + extra_w) / 2).abs(), ((main_l + extra_l) / 2).abs()
        share_w = mean_w / (mean_w + mean_l).clamp(min=1e-12)
        eps_w, eps_l = epsilon * share_w, epsilon * (1 - share_w)
    else:
        eps_w = eps_l = epsilon
    combined_w = _mrpo_combined_reference(main_w, extra_w, weight, eps_w)
    combined_l = _mrpo_combined_reference(main_l, extra_l, weight, eps_l)
    return -F.logsigmoid(beta * _margin(chosen_logps, rejected_logps, combined_w, combined_l))
