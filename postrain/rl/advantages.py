"""Advantage estimators: rewards of a generation batch -> one advantage per completion (N,) or per token (N, T).

Rows are grouped by prompt: N = num_prompts × group_size, each group's completions contiguous. Entries see the
whole gathered batch (TRL gathers rewards from every process before it forms advantages), so group and batch
statistics are global; an entry that also reads per-token tensors (`mask`, `entropies`, log-probs) needs them for
the same rows. Rewards must be finite. Computation is in float32 (float64 stays float64), whatever the input dtype.

Stateful entries (`dcpo_smooth`, `spo_tracker`) take their per-prompt history as the optional data tensor `state`
(one row per completion, gathered by the caller from its per-prompt store) and return `(advantages, new_state)`;
`prompt_state=(width, first-visit value)` on the entry tells the GRPO trainer to keep that history. `unsupported=`
says why the GRPO trainer cannot run an entry; `reads_if_nonzero={data: hyperparameter}`, that the entry reads a
data input only where that hyperparameter is not 0.

Conventions shared by all entries, matching TRL where it has the estimator:
  - group std is the unbiased (Bessel) std, as torch.std and TRL's `nanstd`; a group of one has std 0 (TRL's
    `num_generations == 1` branch);
  - a group whose rewards are all equal gets exactly zero centred rewards and std (no 1e-17 rounding residue that
    a std-division could blow up).
"""

from __future__ import annotations

from typing import Any

import torch

from postrain.registry import Requirement
from postrain.rl.registry import ADVANTAGES
from postrain.tensors import masked_row_mean, token_counts

# TRL's GRPOTrainer: advantages / (std + 1e-4).
_TRL_EPS = 1e-4

# What the estimators' defining steps need from the batch layout (postrain.jobs.liveness).
_GROUP = Requirement("group_size", "the group baseline (each completion measured against the other completions of "
                                   "its prompt)")


def _batch(step: str) -> Requirement:
    return Requirement("groups_per_batch", step)


def _float(x) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x if x.dtype == torch.float64 else x.float()


def _groups(rewards, group_size: int) -> torch.Tensor:
    """Rewards as a (num_prompts, group_size) float view."""
    r = _float(rewards)
    if r.dim() != 1:
        raise ValueError(f"rewards must have shape (N,), got {tuple(r.shape)}")
    if int(group_size) < 1 or r.numel() % int(group_size):
        raise ValueError(f"{r.numel()} rewards do not split into groups of group_size={group_size}")
    return r.view(-1, int(group_size))


def _all_equal(g: torch.Tensor) -> torch.Tensor:
    """(P, 1) bool: every value of the row equals its first (groups of one included)."""
    return (g == g[:, :1]).all(dim=-1, keepdim=True)


def _center(g: torch.Tensor) -> torch.Tensor:
    """g − row mean, exactly 0 on rows whose values are all equal."""
    return torch.where(_all_equal(g), torch.zeros_like(g), g - g.mean(dim=-1, keepdim=True))


def _std(g: torch.Tensor) -> torch.Tensor:
    """(P, 1) unbiased row std; 0 for rows of one value or of equal values."""
    if g.shape[-1] < 2:
        return torch.zeros_like(g[:, :1])
    return torch.where(_all_equal(g), torch.zeros_like(g[:, :1]), g.std(dim=-1, keepdim=True))


def _valid(mask) -> torch.Tensor:
    return torch.as_tensor(mask) > 0


# ---------------------------------------------------------------------------------------------------------------
# Group baselines (TRL's own estimators)


@ADVANTAGES.register(
    "grpo", paper="DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
    requires=(_GROUP,),
    catalog="rl:1",
    arxiv="2402.03300", trl="scale_rewards=group",
    notes="TRL 1.16 grpo_trainer.py _generate_and_score_completions: unbiased nanstd, + 1e-4")
def grpo(rewards, group_size):
    """GRPO group z-score: (r_i − mean_group) / (std_group + 1e-4).

    std is the unbiased group std and 1e-4 TRL's epsilon, exactly as TRL's `scale_rewards="group"`. All-equal groups
    and groups of one get 0."""
    g = _groups(rewards, group_size)
    return (_center(g) / (_std(g) + _TRL_EPS)).view(-1)


@ADVANTAGES.register(
    "dr_grpo", paper="Understanding R1-Zero-Like Training: A Critical Perspective", arxiv="2503.20783",
    requires=(_GROUP,),
    catalog="rl:2",
    trl="scale_rewards=none",
    notes="sail-sg/understand-r1-zero train_zero_math.py (std only for critic_type=grpo); TRL scale_rewards=none")
def dr_grpo(rewards, group_size):
    """Dr. GRPO: r_i − mean_group, no std division (it biases updates by question difficulty)."""
    return _center(_groups(rewards, group_size)).view(-1)


@ADVANTAGES.register(
    "lite_ppo", paper="Part I: Tricks or Traps? A Deep Dive into RL for LLM Reasoning", arxiv="2508.08221",
    requires=(_GROUP, _batch("the batch-level std (over one group it is that group's own std, and the advantage "
                             "is GRPO's z-score)")),
    catalog="rl:5",
    trl="scale_rewards=batch",
    notes="TRL 1.16 scale_rewards='batch' (cites this paper): std of the raw rewards of the whole batch, + 1e-4; the "
          "authors' ROLL framework computes the same with + 1e-6")
def lite_ppo(rewards, group_size):
    """Lite PPO: group-mean baseline, batch-level std: (r_i − mean_group) / (std_batch(r) + 1e-4).

    std_batch is the unbiased std of all N raw rewards (TRL; the authors' ROLL framework uses the same std with
    epsilon 1e-6 instead of TRL's 1e-4)."""
    g = _groups(rewards, group_size)
    return (_center(g) / (_std(g.reshape(1, -1)) + _TRL_EPS)).view(-1)


@ADVANTAGES.register(
    "rloo", paper="Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs",
    requires=(_GROUP,),
    catalog="rl:trl",
    arxiv="2402.14740", trl="RLOOTrainer(beta=0.0, normalize_advantages=False)",
    notes="TRL 1.16 rloo_trainer.py; verl compute_rloo_outcome_advantage")
def rloo(rewards, group_size):
    """RLOO: leave-one-out baseline, r_i − (1/(G−1)) Σ_{j≠i} r_j; 0 for a group of one (TRL)."""
    g = _groups(rewards, group_size)
    if g.shape[-1] < 2:
        return torch.zeros_like(g).view(-1)
    loo = (g.sum(dim=-1, keepdim=True) - g) / (g.shape[-1] - 1)
    return torch.where(_all_equal(g), torch.zeros_like(g), g - loo).view(-1)


# ---------------------------------------------------------------------------------------------------------------
# REINFORCE++ (token-level, globally whitened)


def _whiten_tokens(returns: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """OpenRLHF's global advantage normalisation over every valid token: biased variance clamped at 1e-8."""
    n = valid.sum()
    if n == 0:
        return torch.zeros_like(returns)
    mean = torch.where(valid, returns, 0.0).sum() / n
    var = torch.where(valid, (returns - mean) ** 2, 0.0).sum() / n
    return torch.where(valid, (returns - mean) * var.clamp(min=1e-8).rsqrt(), 0.0)


@ADVANTAGES.register(
    "reinforce_pp", paper="REINFORCE++: Stabilizing Critic-Free Policy Optimization with Global Normalization",
    requires=(_batch("the global whitening over every token of the batch (over one group it normalises "
                     "within the group, as a group baseline would)"),),
    returns="per_token",
    reads_if_nonzero={"old_logps": "beta", "ref_logps": "beta"},  # the KL term vanishes at beta 0
    catalog="rl:extra",
    arxiv="2501.03262",
    notes="OpenRLHF experience_maker.py compute_advantages_and_returns (estimator 'reinforce'), models/utils.py "
          "compute_reward, default KL estimator k1 and --algo.kl.init_coef 0.01; paper Eq. 8-10")
def reinforce_pp(rewards, mask, old_logps=None, ref_logps=None, *, beta: float = 0.01):
    """REINFORCE++: per-token return r − β Σ_{s≥t} KL_s, whitened over every token of the batch. Returns (N, T).

    KL_s = old_logps − ref_logps (k1 on the sampling policy, paper Eq. 9); r sits on the last completion token,
    so the return at t is r minus the KL still to come. The normalisation (paper Eq. 10) is global over all valid
    tokens of the batch, as in the authors' OpenRLHF: token-weighted mean, biased variance clamped at 1e-8; so
    longer completions weigh more. `mask` must cover the whole (gathered) batch. β=0.01 is OpenRLHF's default
    `--algo.kl.init_coef`; with β=0 (or no reference model) the log-probs are not needed. Padding positions are 0."""
    valid = _valid(mask)
    r = _float(rewards)
    returns = r[:, None].expand(valid.shape).clone()
    if beta != 0.0:
        if old_logps is None or ref_logps is None:
            raise ValueError("reinforce_pp with beta != 0 needs old_logps and ref_logps (or set beta=0)")
        kl = torch.where(valid, _float(old_logps) - _float(ref_logps), 0.0).to(r.dtype)
        returns = returns - beta * kl.flip(-1).cumsum(-1).flip(-1)
    return _whiten_tokens(returns, valid)


@ADVANTAGES.register(
    "reinforce_pp_baseline", paper="REINFORCE++: Stabilizing Critic-Free Policy Optimization with Global "
    "Normalization", arxiv="2501.03262",
    requires=(_GROUP, _batch("the global whitening over every token of the batch (over one group it is the "
                             "group's own normalisation)")),
    returns="per_token",
    catalog="rl:extra",
    notes="OpenRLHF experience_maker.py (estimator 'reinforce_baseline', KL as a k2 loss per "
          "examples/scripts/train_reinforce_baseline_hybrid_engine.sh); verl "
          "compute_reinforce_plus_plus_baseline_outcome_advantage")
def reinforce_pp_baseline(rewards, group_size, mask):
    """REINFORCE++-baseline: r − mean_group, then whitened over every token of the batch. Returns (N, T).

    The group mean removes the prompt's difficulty; the normalisation is the global token-level one of
    `reinforce_pp` (OpenRLHF: token-weighted mean, biased variance clamped at 1e-8). The authors put the KL in the
    loss (k2) for this variant, not in the reward, so it reads no log-probs. `mask` must cover the whole batch."""
    centered = _center(_groups(rewards, group_size)).view(-1)
    valid = _valid(mask)
    return _whiten_tokens(centered[:, None].expand(valid.shape), valid)


# ---------------------------------------------------------------------------------------------------------------
# Other baselines and normalisations


@ADVANTAGES.register(
    "opo", paper="On-Policy RL with Optimal Reward Baseline", arxiv="2505.23585",
    requires=(_GROUP,),
    catalog="rl:extra",
    notes="verl core_algos.py compute_opo_outcome_advantage (contributed with the paper, docs/algo/opo.md)")
def opo(rewards, group_size, mask):
    """OPO: length-weighted group baseline, r_i − Σ_j |o_j| r_j / Σ_j |o_j|; no std division.

    The optimal (variance-minimising) baseline when a completion's squared gradient norm grows with its length.
    |o| = mask.sum(-1). A group whose completions are all empty falls back to the plain mean. A group of one gets
    0 (its own baseline); verl's port instead uses a baseline of 0 there, which never occurs in its training."""
    g = _groups(rewards, group_size)
    lengths = _valid(mask).sum(dim=-1).to(g.dtype).view_as(g)
    total = lengths.sum(dim=-1, keepdim=True)
    baseline = torch.where(total > 0, (lengths * g).sum(dim=-1, keepdim=True) / total.clamp(min=1),
                           g.mean(dim=-1, keepdim=True))
    return torch.where(_all_equal(g), torch.zeros_like(g), g - baseline).view(-1)


@ADVANTAGES.register(
    "bnpo_beta", paper="BNPO: Beta Normalization Policy Optimization", arxiv="2506.02864",
    requires=(_GROUP, _batch("the Beta density fitted to the batch's success rates (for one prompt alpha = beta "
                             "= 1: weight 1)")),
    catalog="rl:7",
    notes="changyi7231/BNPO recipe/bnpo/src/bnpo_ray_trainer.py::compute_bnpo_outcome_advantage. Not TRL's "
          "loss_type='bnpo' (an unrelated token-mean aggregation)")
def bnpo_beta(rewards, group_size, *, r_min: float = 0.0, r_max: float = 1.0):
    """BNPO: (s_i − p_q) / f_Beta(p_q; α, β), Beta fitted by moments to the batch's success rates.

    s = (r − r_min)/(r_max − r_min), p_q = group mean of s; over the prompts m = mean(p), v = var(p) (unbiased);
    c = m(1−m)/v − 1, α = max(1 + c·m/3, 1), β = max(1 + c·(1−m)/3, 1); the weight 1/f is clamped to [0, 1e6].
    As in the authors' code a single prompt uses m=0, v=1 (so α=β=1: weight 1). Where all prompts share one
    success rate (v=0) the code divides by zero (nan); here α=β=1 (weight 1). A group of one has p = s, so 0 (the
    code's verl template uses p=0 there). Defaults r_min=0, r_max=1 (binary rewards), from the code."""
    s = (_groups(rewards, group_size) - r_min) / (r_max - r_min)
    p = s.mean(dim=-1, keepdim=True)
    if bool(((p < 0) | (p > 1)).any()):
        raise ValueError("bnpo_beta: group success rates must lie in [0, 1]; set r_min / r_max to the reward range")
    p64 = p.double()
    m, v = (p64.mean(), p64.var()) if p64.numel() > 1 else (p64.new_tensor(0.0), p64.new_tensor(1.0))
    if v > 0:
        c = m * (1 - m) / v - 1
        a, b = torch.clamp(1 + c * m / 3, min=1.0), torch.clamp(1 + c * (1 - m) / 3, min=1.0)
    else:
        a = b = p64.new_tensor(1.0)
    log_pdf = (torch.xlogy(a - 1, p64) + torch.xlogy(b - 1, 1 - p64)
               - (torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)))
    weight = torch.exp(-log_pdf).clamp(0.0, 1e6).to(s.dtype)
    return (weight * torch.where(_all_equal(s), torch.zeros_like(s), s - p)).view(-1)


@ADVANTAGES.register(
    "gpg", paper="GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning",
    requires=(_GROUP, _batch("the B / (B - M) correction for groups without signal (over one group it is 1, "
                             "or the batch has no signal at all)")),
    catalog="rl:8",
    arxiv="2504.02546",
    notes="AMAP-ML/GPG open-r1/src/open_r1/gpg_trainer.py (loss /= inverse_alpha, inverse_alpha = valid groups / "
          "groups; std only if scale_rewards) and README ablation (best: F_norm=1, α=B/(B−M)). verl's port counts "
          "M with count_nonzero(scores), which differs")
def gpg(rewards, group_size, *, scale_rewards: bool = False):
    """GPG: α·(r_i − mean_group)/F_norm with α = B/(B − M), M = completions in all-equal-reward groups.

    α corrects the gradient shrinkage caused by groups that carry no signal (B completions in the batch).
    F_norm = 1 by default (the paper's best ablation row); scale_rewards=True divides by (std_group + 1e-4) as the
    authors' TRL-based trainer does. Their resampling of extra batches until enough valid groups is not part of
    this estimator. A batch with no valid group gives 0."""
    g = _groups(rewards, group_size)
    adv = _center(g)
    if scale_rewards:
        adv = adv / (_std(g) + _TRL_EPS)
    informative = (~_all_equal(g)).expand_as(g).sum()
    if informative == 0:
        return torch.zeros_like(g).view(-1)
    return (adv * (g.numel() / informative)).view(-1)


@ADVANTAGES.register(
    "ngrpo", paper="NGRPO: Negative-enhanced Group Relative Policy Optimization", arxiv="2509.18851",
    catalog="rl:10",
    notes="nangongrui-ngr/NGRPO verl/trainer/ppo/core_algos.py::compute_ngrpo_outcome_advantage "
          "(max_reward=1.0, add_max_reward_num=1, epsilon 1e-6)")
def ngrpo(rewards, group_size, *, max_reward: float = 1.0, num_virtual: int = 1):
    """NGRPO: z-score whose group statistics include `num_virtual` virtual samples of reward `max_reward`.

    Â_i = (r_i − μ')/(σ' + 1e-6), μ', σ' (unbiased) over r_1..r_G plus the virtual samples, so an all-wrong group
    still gets negative advantages; an all-max group gets 0. Defaults from the code (1 virtual sample, reward 1).
    For a group of one the same formula applies (the code's verl template would return r there)."""
    g = _groups(rewards, group_size)
    aug = torch.cat([g, g.new_full((g.shape[0], int(num_virtual)), float(max_reward))], dim=-1)
    return (_center(aug)[:, : g.shape[1]] / (_std(aug) + 1e-6)).reshape(-1)


@ADVANTAGES.register(
    "mapo", paper="MAPO: Mixed Advantage Policy Optimization", arxiv="2509.18849",
    requires=(_GROUP,),
    catalog="rl:11",
    notes="WenkeHuang/MAPO code/verl/trainer/ray_trainer.py (GRPOMIXPRO) and core_algos.py "
          "compute_grpo_outcome_advantage / compute_grpo_mean_outcome_advantage (epsilon 1e-6)")
def mapo(rewards, group_size):
    """MAPO: λ·(r−μ)/(σ+ε) + (1−λ)·(r−μ)/(μ+ε), λ = 4p(1−p), p = share of rewards equal to 1.

    Uncertain groups (p near ½) use the z-score; near-certain ones the "advantage percent deviation" relative to
    the mean. For binary {0, 1} rewards (p counts rewards == 1.0 exactly, as the code does); σ unbiased, ε = 1e-6."""
    g = _groups(rewards, group_size)
    p = (g == 1.0).to(g.dtype).mean(dim=-1, keepdim=True)
    lam = 4 * p * (1 - p)
    mu, centered = g.mean(dim=-1, keepdim=True), _center(g)
    return (lam * centered / (_std(g) + 1e-6) + (1 - lam) * centered / (mu + 1e-6)).view(-1)


@ADVANTAGES.register(
    "aapo", paper="AAPO: Enhance the Reasoning Capabilities of LLMs with Advantage Momentum", arxiv="2505.14264",
    requires=(_GROUP,),
    catalog="rl:12",
    notes="JianxXiong/AAPO open-r1/trainer/AAPOTrainer.py (advantage_constrain = rewards − ref_rewards, clamped "
          "to [−0.2, 0.28] in compute_loss); open-r1/train.sh passes --scale_rewards False (open-rs keeps TRL's "
          "then-default True)")
def aapo(rewards, group_size, ref_rewards, *, scale_rewards: bool = False, clip_low: float = 0.2,
         clip_high: float = 0.28):
    """AAPO: group advantage + clip(r_i − r_i^ref, −clip_low, clip_high), the "advantage momentum".

    r_i^ref is the reward of a completion sampled from the frozen reference model for the same prompt, paired
    with row i (`ref_rewards`, (N,)). The group part is r − mean (scale_rewards=False, the authors' open-r1
    train.sh) or the GRPO z-score with + 1e-4 (scale_rewards=True). Clip bounds from the code. Meant for a plain
    policy-gradient (cross-entropy) loss without ratio or clip."""
    g = _groups(rewards, group_size)
    base = _center(g)
    if scale_rewards:
        base = base / (_std(g) + _TRL_EPS)
    momentum = (g.reshape(-1) - _float(ref_rewards).to(g)).clamp(-clip_low, clip_high)
    return base.view(-1) + momentum


@ADVANTAGES.register(
    "pshw", paper="Confucius3-Math: A Lightweight High-Performance Reasoning LLM for Chinese K-12 Mathematics "
    "Learning", arxiv="2506.18330",
    requires=(_GROUP,),
    catalog="rl:21",
    notes="paper §6.2 Eq. 2-3 (netease-youdao/Confucius3-Math Confucius3-Math.pdf)")
def pshw(rewards, group_size, *, alpha: float = -0.256, offset: float = 1.256):
    """Policy-Specific Hardness Weighting: (R_i − μ)·D(q), D(q) = α·μ + offset, μ = group mean.

    Rewards R ∈ {+1, −1} as in the paper, so D runs from 1 (all solved) to 1.512 (none solved): prompts hard for
    the current policy weigh more. No std division. α = −0.256 and the offset 1.256 are the paper's."""
    g = _groups(rewards, group_size)
    return (_center(g) * (alpha * g.mean(dim=-1, keepdim=True) + offset)).view(-1)


@ADVANTAGES.register(
    "grpo_lead", paper="GRPO-LEAD: A Difficulty-Aware Reinforcement Learning Approach for Concise Mathematical "
    "Reasoning in Language Models", arxiv="2504.09696",
    requires=(_GROUP,),
    catalog="rl:23",
    notes="aeroplanepaper/GRPO-LEAD verl/verl/trainer/ppo/core_algos.py::logistic_reweight and "
          "compute_grpo_outcome_advantage (epsilon 1e-6)")
def grpo_lead(rewards, group_size, *, weight_min: float = 0.4, weight_max: float = 1.5, x0: float = 0.75,
              k: float = 10.0):
    """GRPO-LEAD difficulty weighting: z_i·w(ρ) if z_i > 0 else z_i·w(1 − ρ), w logistic in the solve rate ρ.

    z = (r − μ)/(σ + 1e-6) (unbiased σ), ρ = share of rewards > 0 in the group,
    w(x) = weight_min + (weight_max − weight_min)/(1 + exp(k(x − x0))): correct answers on hard prompts and wrong
    answers on easy prompts are amplified. Defaults (A=0.4, B=1.5, x0=0.75, k=10) from the code. The
    length-penalised correctness reward of the paper is reward shaping, not part of this estimator."""
    g = _groups(rewards, group_size)
    z = _center(g) / (_std(g) + 1e-6)
    rho = (g > 0).to(g.dtype).mean(dim=-1, keepdim=True)
    x = torch.where(z > 0, rho, 1 - rho)
    return (z * (weight_min + (weight_max - weight_min) / (1 + torch.exp(k * (x - x0))))).view(-1)


@ADVANTAGES.register(
    "edge_grpo", paper="EDGE-GRPO: Entropy-Driven GRPO with Guided Error Correction for Advantage Diversity",
    requires=(_GROUP,),
    catalog="rl:25",
    arxiv="2507.21848",
    notes="ZhangXJ199/EDGE-GRPO trl_edge/trainer/grpo_aha_trainer.py (EDA: advantages / per_entropy_mean * "
          "gathered batch mean); the code averages entropy over padded positions too and lets gradient flow "
          "through it, here the mean is over completion tokens and detached")
def edge_grpo(rewards, group_size, mask, entropies, mean_entropy=None):
    """EDGE-GRPO entropy-driven advantage: A_i · P̄ / P_i, A the GRPO z-score, P_i the mean token entropy of o_i.

    P̄ is the mean of P over the batch's non-empty completions; a caller that holds only its own process' rows
    passes the global value as `mean_entropy` (a scalar) so every process scales alike. Confident completions
    (low P_i) get larger updates. Entropies are treated as constants (detached). Rows with P_i = 0 (empty
    completions) get 0. A = (r − μ)/(σ + 1e-4) (their TRL-based trainer)."""
    base = grpo(rewards, group_size)
    p = masked_row_mean(torch.as_tensor(entropies).detach(), mask).to(base)
    if mean_entropy is None:
        nonempty = token_counts(mask) > 0
        mean_entropy = p[nonempty].mean() if bool(nonempty.any()) else p.new_tensor(0.0)
    mean_entropy = _float(mean_entropy).to(base)
    return torch.where(p > 0, base * mean_entropy / torch.where(p > 0, p, 1.0), torch.zeros_like(base))


# ---------------------------------------------------------------------------------------------------------------
# Stateful estimators (history in, new history out)


@ADVANTAGES.register(
    "dcpo_smooth", paper="DCPO: Dynamic Clipping Policy Optimization", arxiv="2509.02333",
    requires=(_GROUP, Requirement("revisits", "the smoothing with the prompt's reward history (the statistics "
                                              "of its earlier visits)", amount=2)),
    catalog="rl:17",
    prompt_state=(3, 0.0),  # the trainer keeps one row per prompt: [visits, cumulative mean, cumulative std]
    notes="lime-RL/DCPO verl/trainer/ppo/core_algos.py::compute_dcpo_outcome_advantage and get_mean_std "
          "(user_old_mean_ratio=1); note its run scripts leave reward_model.use_old_mean.enable=False by default, "
          "which makes every visit a first visit (plain z-score)")
def dcpo_smooth(rewards, group_size, state=None):
    """DCPO smooth advantage standardisation: mix the z-scores under the current group's and the prompt's
    cumulative reward statistics, keep the smaller. Returns (advantages (N,), new_state (N, 3)).

    `state` (N, 3), identical on the rows of a group: [visits so far, cumulative mean, cumulative std]; None means
    a first visit (zeros, as the code initialises its dataset). With i = visits + 1:
    cumulative (μ_c, σ_c) = (μ_new, σ_new) on the first visit, else μ_c = (μ_old·(i−1) + μ_new)/i,
    σ_c² = ((i−1)σ_old² + σ_new² + ((i−1)/i)(μ_new − μ_old)²)/i (the code's pooled update);
    A_new = (r − μ_new)/σ_new, A_old = (r − μ_c)/σ_c (0 where the std is 0, no epsilon);
    SA1 = A_old/i + (1 − 1/i)A_new, SA2 = A_new/i + (1 − 1/i)A_old; Â = SA1 if |SA1| < |SA2| else SA2.
    So an all-equal group can still learn from its history. new_state = [i, μ_c, σ_c]. The code rejects groups of
    one; here their σ_new is 0."""
    g = _groups(rewards, group_size)
    if state is None:
        state = torch.zeros(g.numel(), 3, dtype=g.dtype, device=g.device)
    st = _float(state).to(g).view(g.shape[0], g.shape[1], 3)[:, 0, :]
    visits, mu_old, sd_old = st[:, :1], st[:, 1:2], st[:, 2:3]
    i = visits + 1
    mu_new, sd_new = g.mean(dim=-1, keepdim=True), _std(g)
    first = visits == 0
    mu_c = torch.where(first, mu_new, (mu_old * visits + mu_new) / i)
    var_c = (visits * sd_old ** 2 + sd_new ** 2 + visits / i * (mu_new - mu_old) ** 2) / i
    sd_c = torch.where(first, sd_new, var_c.sqrt())
    centered = _center(g)
    a_new = torch.where(sd_new > 0, centered / torch.where(sd_new > 0, sd_new, 1.0), torch.zeros_like(g))
    a_old = torch.where(sd_c > 0, (g - mu_c) / torch.where(sd_c > 0, sd_c, 1.0), torch.zeros_like(g))
    sa1 = a_old / i + (1 - 1 / i) * a_new
    sa2 = a_new / i + (1 - 1 / i) * a_old
    adv = torch.where(sa1.abs() < sa2.abs(), sa1, sa2)
    new_state = torch.cat([i, mu_c, sd_c], dim=-1).repeat_interleave(g.shape[1], dim=0)
    return adv.view(-1), new_state


def spo_initial_state(successes, num_samples, *, rho_min: float = 0.875) -> torch.Tensor:
    """SPO's tracker initialisation from offline samples: (N, 2) [α, β] from `successes` of `num_samples` tries.

    α = N_init(s + ½)/(n + 1), β = N_init(n − s + ½)/(n + 1), N_init = 1/(1 − rho_min) (verl-recipe spo); with
    n = 0 (no offline estimate) α = β = ½."""
    s, n = _float(successes), _float(num_samples).expand_as(_float(successes))
    n_init = 1.0 / (1.0 - rho_min)
    alpha = torch.where(n > 0, n_init * (s + 0.5) / (n + 1), torch.full_like(s, 0.5))
    beta = torch.where(n > 0, n_init * (n - s + 0.5) / (n + 1), torch.full_like(s, 0.5))
    return torch.stack([alpha, beta], dim=-1)


@ADVANTAGES.register(
    "spo_tracker", paper="Single-stream Policy Optimization", arxiv="2509.13232",
    unsupported="it is single-stream (one completion per prompt, group_size 1) and TRL 1.16's GRPOConfig requires "
                "num_generations >= 2",
    catalog="rl:19",
    notes="verl-project/verl-recipe spo/spo_ray_trainer.py (advantage, batch normalisation + 1e-8, α/β update, "
          "_get_spo_rho with D_half=0.06, clip [rho.clip_lower=0.875, 0.96]) and spo/config/spo_trainer.yaml")
def spo_tracker(rewards, group_size, state=None, divergence=None, *, d_half: float = 0.06,
                rho_min: float = 0.875, rho_max: float = 0.96):
    """SPO: r − p̂ with p̂ = α/(α+β) a per-prompt Beta tracker, normalised over the batch; one completion per
    prompt (group_size must be 1). Returns (advantages (N,), new_state (N, 2)).

    `state` (N, 2) = [α, β] of each row's prompt before this step (None: α = β = ½; see `spo_initial_state` for
    the offline initialisation). Â = (a − mean(a))/(std(a) + 1e-8), a = r − p̂, std unbiased over the batch.
    Update: α ← ρα + r, β ← ρβ + (1 − r), rewards in [0, 1]; ρ = clip(2^(−D/d_half), rho_min, rho_max) where D
    (`divergence`, (N,)) is the mean |log π_then − log π_now| over the tokens of the prompt's previous response
    (0 on a first visit); without D, ρ = rho_min (the code's constant mode, value 0.875). Defaults from the code."""
    if int(group_size) != 1:
        raise ValueError(f"spo_tracker is single-stream: group_size must be 1, got {group_size}")
    r = _groups(rewards, 1).view(-1)
    st = (torch.full((r.numel(), 2), 0.5, dtype=r.dtype, device=r.device) if state is None
          else _float(state).to(r))
    alpha, beta = st[:, 0], st[:, 1]
    a = (r - alpha / (alpha + beta)).view(1, -1)
    adv = (_center(a) / (_std(a) + 1e-8)).view(-1)
    if divergence is None:
        rho = torch.full_like(r, rho_min)
    else:
        rho = torch.pow(2.0, -_float(divergence).to(r) / d_half).clamp(rho_min, rho_max)
    return adv, torch.stack([rho * alpha + r, rho * beta + (1 - r)], dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# Rejection-sampling family


@ADVANTAGES.register(
    "reinforce_rej", paper="A Minimalist Approach to LLM Reasoning: from Rejection Sampling to Reinforce",
    requires=(_GROUP,),
    catalog="rl:9",
    arxiv="2504.11343",
    notes="RLHFlow/Minimal-RL verl/trainer/ppo/core_algos.py::compute_reinforce_rej_outcome_advantage, rewards "
          "±1; a group of one is all-same here (the code keeps it with std set to 1)")
def reinforce_rej(rewards, group_size):
    """Reinforce-Rej: A_i = r_i (no baseline) in groups with mixed rewards, 0 in all-correct / all-wrong groups.

    The paper's rewards are ±1. Dropping the all-same groups is what the paper finds explains most of GRPO's gain
    over plain REINFORCE; pair with a PPO-clip loss."""
    g = _groups(rewards, group_size)
    return torch.where(_all_equal(g), torch.zeros_like(g), g).view(-1)


@ADVANTAGES.register(
    "raft_pp", paper="A Minimalist Approach to LLM Reasoning: from Rejection Sampling to Reinforce",
    catalog="rl:9",
    arxiv="2504.11343",
    notes="RLHFlow/Minimal-RL core_algos.py::compute_raft_outcome_advantage (scores < 0 set to 0), "
          "scripts/run_raftpp.sh")
def raft_pp(rewards):
    """RAFT++: A_i = max(r_i, 0): train on the positive samples only (with a PPO-clip loss for RAFT++)."""
    return _float(rewards).clamp(min=0)


# ---------------------------------------------------------------------------------------------------------------


def data_names() -> set[str]:
    """Every data input some advantage estimator reads (a trainer may pass them all; each entry takes its own)."""
    return {name for variant in ADVANTAGES for name in variant.data}


def compute_advantages(name: str, rewards, group_size: int, mask=None, **kwargs: Any):
    """Advantages of the registered estimator `name`: (N,), or (N, T) for the token-level ones.

    `kwargs` are the entry's further data tensors (those it does not read are ignored, so a trainer can pass all
    it has) and its hyperparameters (unknown ones raise a RecipeError naming the valid ones). Stateful entries
    (`dcpo_smooth`, `spo_tracker`) return `(advantages, new_state)`.
    """
    variant = ADVANTAGES.get(name)
    known = data_names()
    data = {"rewards": rewards, "group_size": group_size, "mask": mask}
    data.update({k: v for k, v in kwargs.items() if k in variant.data or k in known})
    params = {k: v for k, v in kwargs.items() if k not in data}
    return ADVANTAGES.call(name, data, params)
