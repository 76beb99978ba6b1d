"""List-wise and batch-coupled preference losses.

K-response lists: `list_logps`, `list_ref_logps` (SUMMED completion log-probs, (B, K)), `list_scores` (higher is
better), `list_mask` (1 where the slot holds a response; lists may be ragged, and masked slots may hold
garbage that must not change the loss). Returns one loss per prompt (B,). Entries that couple the batch
(`group_robust_po`) return the batch loss at every position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from postrain.preference.registry import PREFERENCE
from postrain.registry import Requirement

# Fill for masked slots inside softmax-like sums: exp() of it is exactly 0, yet unlike -inf it keeps
# (-inf) - (-inf) = nan out of the backward pass.
_NEG = -1e30


def _lists(list_logps, list_ref_logps, list_scores, list_mask):
    """Float32 log-ratios h and scores with masked slots zeroed (so garbage, even nan, cannot leak), and the mask."""
    h = torch.as_tensor(list_logps).float() - torch.as_tensor(list_ref_logps).float()
    valid = (torch.ones_like(h, dtype=torch.bool) if list_mask is None
             else torch.as_tensor(list_mask, device=h.device) > 0)
    scores = torch.as_tensor(list_scores, device=h.device).float()
    return torch.where(valid, h, 0.0), torch.where(valid, scores, 0.0), valid


@PREFERENCE.register(
    "lipo_lambda", paper="LiPO: Listwise Preference Optimization through Learning-to-Rank", arxiv="2402.01878",
    catalog="preference:60",
    notes="formula from the paper's LiPO-λ section as given in the methods catalog (P) with the LambdaLoss / "
          "TF-Ranking DCG Lambda weight |1/D(τi) − 1/D(τj)|; no public code by the authors found")
def lipo_lambda(list_logps, list_ref_logps, list_scores, list_mask=None, *, beta: float = 0.05):
    """LiPO-λ: Σ_{ψi>ψj} Δij·log(1 + e^{−(si − sj)}), si = β·hi, with LambdaLoss DCG weights Δij.

    Δij = |Gi − Gj|·|1/D(τ(i)) − 1/D(τ(j))|, gain G = 2^ψ − 1 (ψ = `list_scores`, e.g. win rates in [0, 1] or
    graded labels), discount D(τ) = log(1 + τ), τ(i) the 1-based rank of response i under the current model
    scores s (descending; the weights carry no gradient). Summed over the pairs of one prompt. The log base of D
    only rescales the loss (natural log here). Default β=0.05 (paper).
    """
    h, psi, valid = _lists(list_logps, list_ref_logps, list_scores, list_mask)
    s = beta * h
    with torch.no_grad():
        order = torch.where(valid, s, float("-inf")).argsort(dim=-1, descending=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(1, s.shape[-1] + 1, device=s.device)
                                                .expand_as(order).contiguous())
        inv_discount = 1.0 / torch.log1p(rank.float())
        pairs = (psi[:, :, None] > psi[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        # |G_i − G_j| = |2^ψi − 2^ψj| = 2^max(ψ)·(1 − 2^−|ψi − ψj|), in log space: 2^ψ overflows float32 from ψ = 128
        # on (reward-model scores can be that large), and two equal overflowed gains would give inf − inf = nan
        # where the weight is 0. Only the ordered pairs' weights are used; the others are set to 0 so that no
        # non-finite factor reaches the backward pass of the product below.
        psi64 = psi.double()
        high, gap = torch.maximum(psi64[:, :, None], psi64[:, None, :]), (psi64[:, :, None] - psi64[:, None, :]).abs()
        log_gain_gap = high * math.log(2.0) + torch.log(-torch.expm1(-gap * math.log(2.0)))
        discount_gap = (inv_discount[:, :, None] - inv_discount[:, None, :]).abs().double()
        delta = torch.where(pairs, torch.exp(log_gain_gap + torch.log(discount_gap)), 0.0).to(s.dtype)
    # −log σ(s_i − s_j) = softplus(−(s_i − s_j)), written with logsigmoid: softplus's backward multiplies the
    # incoming gradient (here the weight, up to ~1e38) by e^x before dividing, which overflows for large weights.
    pair_loss = -F.logsigmoid(s[:, :, None] - s[:, None, :])
    return torch.where(pairs, delta * pair_loss, 0.0).sum(dim=(-2, -1))


@PREFERENCE.register(
    "plackett_luce_dpo", paper="Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
    catalog="preference:1",
    arxiv="2305.18290",
    notes="the Plackett-Luce objective of the DPO paper (Sec. 5 / Appendix A.3); the K=2 case is DPO")
def plackett_luce_dpo(list_logps, list_ref_logps, list_scores, list_mask=None, *, beta: float = 0.1):
    """DPO's Plackett–Luce form: −Σ_k log[exp(β h_τ(k)) / Σ_{j≥k} exp(β h_τ(j))], τ the ranking by `list_scores`.

    h = ℓ − ℓ_ref; τ(1) is the best response. With two responses this is DPO. Ties in `list_scores` are broken
    by slot order. Default β=0.1 (the DPO paper's usual value).
    """
    h, scores, valid = _lists(list_logps, list_ref_logps, list_scores, list_mask)
    # Masked slots sort last, so the ranked prefix holds exactly the valid responses.
    order = torch.where(valid, scores, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    z = torch.where(valid, beta * h, _NEG).gather(-1, order)
    keep = valid.gather(-1, order)
    # Σ_{j≥k} exp(z_j) as a reversed cumulative logsumexp.
    tail = torch.logcumsumexp(z.flip(-1), dim=-1).flip(-1)
    return -torch.where(keep, z - tail, 0.0).sum(dim=-1)


@PREFERENCE.register(
    "exo_k", paper="Towards Efficient Exact Optimization of Language Model Alignment", arxiv="2402.00856",
    catalog="preference:19",
    notes="checked against haozheji/exact-optimization src/align_stage/loss.py::exact_loss (loss_type exo-rw) "
          "and exp/*/train_exo.sh")
def exo_k(list_logps, list_ref_logps, list_scores, list_mask=None, *, beta: float = 0.5, beta_r: float = 0.5):
    """EXO (K-wise, reward targets): KL(softmax_i(β·h_i) ‖ softmax_i(r_i/β_r)) over the K responses of a prompt.

    h = ℓ − ℓ_ref, r = `list_scores` (reward-model scores). The reverse KL from the policy's induced
    distribution over the candidates to the reward's, which is what makes EXO mode-seeking. `beta` is the
    authors' β_π. Defaults β_π = β_r = 0.5 (HH and TL;DR scripts; IMDB uses 0.1). The authors also divide
    the logits by a sampling temperature (0.8) before taking log-probs; that belongs to how `list_logps` are
    computed, not to this loss.
    """
    h, r, valid = _lists(list_logps, list_ref_logps, list_scores, list_mask)
    log_p = torch.where(valid, beta * h, _NEG).log_softmax(dim=-1)
    log_q = torch.where(valid, r / beta_r, _NEG).log_softmax(dim=-1)
    return torch.where(valid, log_p.exp() * (log_p - log_q), 0.0).sum(dim=-1)


@PREFERENCE.register(
    "selm", paper="Self-Exploring Language Models: Active Preference Elicitation for Online Alignment",
    arxiv="2405.19332",
    catalog="preference:67",
    ranges={"alpha": ">= 0"},  # the optimism term's weight: below 0 it would pull toward the model's own answers
    notes="checked against shenao-zhang/SELM scripts/selm_trainer.py::optimistic_dpo_loss (summed log-probs of "
          "chosen, rejected and reference_response), scripts/online_feedback.py (candidates [the round's greedy "
          "response, the data's chosen, its rejected] ranked by PairRM: chosen the best-ranked, rejected the "
          "worst, reference_response the greedy one) and recipes/zephyr-selm/selm_config_full.yaml (beta 0.01, "
          "alpha 0.001)")
def selm(list_logps, list_ref_logps, list_scores, list_mask=None, *, beta: float = 0.01, alpha: float = 0.001):
    """SELM: −log σ(β(h_c − h_r)) + α·β·h_0 over a list whose slot 0 is the model's own response.

    A row is the authors' candidate list: slot 0 the response the round's starting model (the reference) generated
    for the prompt, the other slots the data's responses; c is the best-scored slot and r the worst (the first of
    equals, as numpy's argmax / argmin over the authors' ranks), and may be slot 0 itself. h = ℓ − ℓ_ref. The
    second term is the optimism bonus as the authors' code adds it: minimising it lowers the policy's
    log-ratio on its reference's own response, so the policy moves away from what it already generates. Defaults
    β=0.01, α=0.001 from the authors' Zephyr config.
    """
    h, scores, valid = _lists(list_logps, list_ref_logps, list_scores, list_mask)
    # Masked slots can never be the best or the worst response.
    chosen = torch.where(valid, scores, float("-inf")).argmax(dim=-1, keepdim=True)
    rejected = torch.where(valid, scores, float("inf")).argmin(dim=-1, keepdim=True)
    margin = h.gather(-1, chosen)[:, 0] - h.gather(-1, rejected)[:, 0]
    return -F.logsigmoid(beta * margin) + alpha * beta * h[:, 0]


@PREFERENCE.register(
    "relative_po",
    requires=(Requirement("rows_per_batch", "the contrasts with the rejected responses of the batch's other "
                                            "prompts", amount=2, scope="process"),),
    catalog="preference:53",
    paper="Relative Preference Optimization: Enhancing LLM Alignment through Contrasting Responses across "
          "Identical and Diverse Prompts", arxiv="2402.10958",
    notes="checked against yinyueqin/relative-preference-optimization trainers.py::RPOTrainer.loss and "
          "config/loss/rpo-paired.yaml")
def relative_po(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, prompt_embeddings=None, *,
                beta: float = 0.1, tau: float = 0.5):
    """Relative PO: L_i = mean_j −log σ(β·w_ij·(h_w,i − h_l,j)) over every rejected response j of the batch.

    w_ij = softmax_j(−(1 − cos(e_i, e_j))/τ) from the prompt embeddings e (B, D) (the authors use
    all-MiniLM-L6-v2 sentence embeddings), so contrasts with similar prompts weigh more; without embeddings
    every pair weighs 1 (the authors' fallback). Defaults β=0.1, τ=0.5 (`distance_temperature`, paired config).
    """
    hw = torch.as_tensor(chosen_logps).float() - torch.as_tensor(ref_chosen_logps).float()
    hl = torch.as_tensor(rejected_logps).float() - torch.as_tensor(ref_rejected_logps).float()
    logits = hw[:, None] - hl[None, :]
    if prompt_embeddings is None:
        weights = torch.ones_like(logits)
    else:
        e = F.normalize(torch.as_tensor(prompt_embeddings, device=hw.device).float(), dim=-1)
        weights = torch.softmax(-(1.0 - e @ e.T) / tau, dim=-1)
    return -F.logsigmoid(beta * weights * logits).mean(dim=-1)


@PREFERENCE.register(
    "group_robust_po", paper="Group Robust Preference Optimization in Reward-free RLHF", arxiv="2405.20304",
    catalog="preference:51",
    # the trainer's state (postrain.trainers.dpo_state), set beside the hyperparameters: group_column, the dataset
    # column holding each pair's group (required); step_size, η of the exponentiated-gradient update (authors'
    # config 0.01); group_fractions, divide each pair's loss by its group's share of the training set (the
    # authors' divide_by_totalcount, True by default)
    state_settings={"group_column": None, "step_size": 0.01, "group_fractions": True},
    notes="checked against rsshyam/Group-robust-preference-optimization src/trainers/grouptrainer.py "
          "(compute_group_metric, compute_robust_loss) and scripts/run_multi_robust.sh")
def group_robust_po(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, group_ids,
                    group_weights, group_fractions=None, group_counts=None, *, beta: float = 0.01, ipo: bool = True):
    """Group robust PO: Σ_g α_g·L_g, the α-weighted sum of per-group DPO (or IPO) losses; a batch-level loss.

    α = `group_weights` (G,) are the adversary's group weights; the trainer updates them outside the loss by
    exponentiated gradient, α_g ← α_g·exp(η·L_g) then normalization (η = `step_size`, 0.01 in the authors'
    config), and passes them in; they are detached here. `group_ids` (B,) are integer groups in [0, G).
    L_g: without `group_fractions`, the mean loss of group g's pairs in the batch (absent groups add 0);
    with `group_fractions` p_g = N_g/N (each group's share of the dataset) the unbiased estimate
    (1/B)·Σ_i ℓ_i/p_{g_i}, the authors' `divide_by_totalcount` option up to the constant 1/B. Per-pair loss:
    IPO (Δ − 1/(2β))² when `ipo` (GR-IPO, the paper's LLM experiments, β=0.01 in the authors' script), else
    −log σ(βΔ) (GR-DPO), Δ = h_w − h_l on summed log-probs.

    When the batch is split over processes, the trainer passes `group_counts` (G,), each group's number of pairs in
    the whole (gathered) batch: L_g's mean is then over the whole batch's pairs of g, and the value is scaled by
    N/B so that the processes' losses average (as DDP averages gradients) to the whole batch's. Left out, the
    counts are those of the pairs given (one process). With `group_fractions` the loss is a per-pair mean already.
    """
    hw = torch.as_tensor(chosen_logps).float() - torch.as_tensor(ref_chosen_logps).float()
    hl = torch.as_tensor(rejected_logps).float() - torch.as_tensor(ref_rejected_logps).float()
    margin = hw - hl
    losses = (margin - 1.0 / (2.0 * beta)) ** 2 if ipo else -F.logsigmoid(beta * margin)
    alpha = torch.as_tensor(group_weights, device=hw.device).float().detach()
    g = torch.as_tensor(group_ids, device=hw.device).long()
    if group_fractions is not None:
        p = torch.as_tensor(group_fractions, device=hw.device).float()
        total = (alpha[g] * losses / p[g]).mean()
    else:
        onehot = F.one_hot(g, num_classes=alpha.shape[0]).float()  # (B, G)
        counts = onehot.sum(dim=0) if group_counts is None else torch.as_tensor(group_counts, device=hw.device).float()
        group_loss = (onehot * losses[:, None]).sum(dim=0) / counts.clamp(min=1)
        total = (alpha * group_loss).sum() * (counts.sum() / g.numel())  # N / B: 1 on one process
    return total.expand_as(losses)
