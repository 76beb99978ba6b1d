"""Policy losses (POLICY_LOSSES) and loss aggregations (AGGREGATIONS) for online RL.

Shapes (see `postrain.rl.registry`): N completions, groups of `group_size` contiguous rows, T completion tokens,
right-padded; `mask` (N, T) is 1.0 on completion tokens. Padding positions of `logps` / `old_logps` may hold
garbage (nan, inf): every entry removes them with `torch.where` before any arithmetic.

Contract of a policy-loss entry: returns `(per_token_loss (N, T), metrics)`; `per_token_loss` is 0 at padding, and
`metrics` holds detached scalars (clip fractions, ratio statistics over the valid tokens of this call).
A sequence-level objective (GSPO, GMPO, GVPO, A*-PO, DisCO) puts its per-sequence loss on every valid token of that
row, so `seq_mean_token_mean` turns it back into the paper's mean over sequences (TRL broadcasts its
sequence-level ratio the same way). Entries that need whole groups (GVPO, DisCO) must see group-aligned rows.

Contract of an aggregation entry: `(per_token_loss, mask, <optional global normalizer>) -> scalar`. When rows are
split over processes, pass the global normalizer (total tokens / sequences over all processes): then the sum of
the processes' losses equals the loss of the whole batch on one process.

    loss, metrics = policy_loss("ppo_clip", logps=lp, old_logps=old, advantages=adv, mask=mask,
                                aggregation="seq_mean_token_mean", epsilon=0.2)
"""

from __future__ import annotations

import math

import torch

from postrain.errors import RecipeError
from postrain.registry import Convention, Requirement
from postrain.rl.registry import AGGREGATIONS, POLICY_LOSSES
from postrain.tensors import grouped, masked, token_counts


# ---------------------------------------------------------------------------------------------------------------
# what the losses need to act, and the conventions of their hyperparameters
# ---------------------------------------------------------------------------------------------------------------

def off_policy_requirement(step: str) -> Requirement:
    """A step acting on the ratio pi / pi_old, which is 1 on every token until an optimizer step moves the policy
    away from the one that generated the batch (postrain.jobs.liveness)."""
    return Requirement("off_policy", step)


GROUP = Requirement("group_size", "the comparison of the completions of a group")

# A clip range is a distance from 1: the ratio is clipped to [1 - epsilon, 1 + epsilon_high].
CLIP_LOW = Convention(
    "epsilon", lambda v, p: 0 < v < 1,
    "epsilon is the clip range's distance below 1 (the ratio is clipped to [1 - epsilon, 1 + epsilon_high]), so it "
    "lies in (0, 1): from 1 on there is no lower bound (1 - epsilon <= 0). A bound written as a ratio (1.2 for the "
    "range 0.2) belongs here as 0.2")
CLIP_HIGH = Convention(
    "epsilon_high", lambda v, p: 0 < v <= 1,
    "epsilon_high is the clip range's distance above 1 (the ratio is clipped at 1 + epsilon_high: DAPO's "
    "clip-higher 0.28 bounds it at 1.28), so it lies in (0, 1]. A bound written as a ratio (1.28) belongs here as "
    "0.28; an absolute cap on the ratio such as TRL's cispo epsilon_high (ScaleRL's 5.0) is policy loss cispo's")
# An absolute bound on the ratio (not a distance from 1) must lie above 1, or it caps ratios of unchanged tokens.
_DUAL_CLIP = Convention(
    "dual_clip_c", lambda v, p: v > 1,
    "dual_clip_c is an absolute bound on the ratio pi / pi_old (verl's clip_ratio_c: 3 in Ye et al., 10 in DAPO-"
    "style scripts), not a distance from 1: the loss of a negative-advantage token is capped at -c A once its ratio "
    "passes c, so c must exceed 1 (and the clip's 1 + epsilon)")


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------

def _valid(mask: torch.Tensor) -> torch.Tensor:
    return mask.bool()


def masked_log_ratio(logps, old_logps, mask):
    # on-policy call without old_logps: ratio 1 with the gradient of logps (TRL's per_token_logps.detach())
    old = logps.detach() if old_logps is None else old_logps
    return masked(logps, mask) - masked(old, mask)


def advantages_2d(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Advantages as (N, 1) or (N, T) float32; padding of (N, T) advantages zeroed."""
    a = advantages.float()
    if a.dim() == 1:
        return a.unsqueeze(1)
    return masked(a, mask)


def seq_adv(advantages: torch.Tensor) -> torch.Tensor:
    a = advantages.float()
    if a.dim() == 2 and a.shape[1] == 1:
        a = a.squeeze(1)
    if a.dim() != 1:
        raise ValueError("this loss needs one advantage per sequence: shape (N,) or (N, 1)")
    return a


def seq_mean(x, mask):
    """Per-row mean over valid tokens of an already-cleaned (N, T) tensor; empty rows give 0."""
    return x.sum(-1) / token_counts(mask).clamp(min=1.0)


def spread_over_tokens(per_seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put a per-sequence loss (N,) on every valid token of its row (0 at padding)."""
    return torch.where(_valid(mask), per_seq.unsqueeze(1).expand(mask.shape), torch.zeros((), device=mask.device))


def masked_mean(x, mask):
    m = mask.float()
    return ((x.float() * m).sum() / m.sum().clamp(min=1.0)).detach()


def ratio_metrics(ratio, mask, **fractions):
    valid = _valid(mask) & torch.ones_like(ratio, dtype=torch.bool)
    r = ratio.detach()
    out = {"ratio/mean": masked_mean(r, valid),
           "ratio/max": r[valid].max() if valid.any() else torch.tensor(1.0),
           "ratio/min": r[valid].min() if valid.any() else torch.tensor(1.0)}
    for key, flags in fractions.items():
        out[key] = masked_mean(flags.float(), valid)
    return out


def clip_metrics(ratio, mask, low, high):
    """Ratio statistics and TRL's clip fractions (low, high, either) from the clip flags."""
    return ratio_metrics(ratio, mask, **{"clip_ratio/low_mean": low, "clip_ratio/high_mean": high,
                                          "clip_ratio/region_mean": low | high})


def ppo_terms(ratio, adv, low, high):
    """-min(r A, clip(r, low, high) A) and the TRL-style clip flags."""
    clipped = torch.clamp(ratio, low, high)
    loss = -torch.min(ratio * adv, clipped * adv)
    low_clipped = (ratio < low) & (adv < 0)
    high_clipped = (ratio > high) & (adv > 0)
    return loss, low_clipped, high_clipped




# ---------------------------------------------------------------------------------------------------------------
# token-ratio PPO family
# ---------------------------------------------------------------------------------------------------------------

@POLICY_LOSSES.register(
    "ppo_clip", paper="DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
    requires=(off_policy_requirement("the clip of the ratio pi / pi_old to [1 - epsilon, 1 + epsilon_high]"),),
    conventions=(CLIP_LOW, CLIP_HIGH),
    catalog="rl:1",
    arxiv="2402.03300", trl="importance_sampling_level=token (per-token loss of loss_type grpo/dapo/dr_grpo/bnpo)",
    notes="GRPO's token-level PPO clip; epsilon_high = DAPO clip-higher (2503.14476, recommends 0.28). "
          "Checked against TRL 1.16 grpo_trainer._compute_loss.")
def ppo_clip(logps, old_logps, advantages, mask, *, epsilon: float = 0.2, epsilon_high: float | None = None):
    """Token-level PPO clip (GRPO): l = -min(r A, clip(r, 1-epsilon, 1+epsilon_high) A), r = pi/pi_old per token.

    epsilon = 0.2 (DeepSeekMath); epsilon_high defaults to epsilon (DAPO's clip-higher uses 0.28). Advantages (N,)
    or (N, T). Identical to TRL's per-token loss for importance_sampling_level="token" without `delta`."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(masked_log_ratio(logps, old_logps, mask))
    adv = advantages_2d(advantages, mask)
    loss, low, high = ppo_terms(ratio, adv, 1 - epsilon, 1 + eps_high)
    metrics = clip_metrics(ratio, mask, low, high)
    return masked(loss, mask), metrics


@POLICY_LOSSES.register(
    "dual_clip", paper="Mastering Complex Control in MOBA Games with Deep Reinforcement Learning",
    requires=(off_policy_requirement("the clip and the dual clip (the cap -c A of negative-advantage tokens whose ratio "
                          "passes c)"),),
    conventions=(CLIP_LOW, CLIP_HIGH, _DUAL_CLIP),
    catalog="rl:extra",
    arxiv="1912.09729",
    notes="Dual-clip PPO as in verl compute_policy_loss_vanilla (clip_ratio_c=3). Not TRL's `delta`, which caps "
          "the ratio for every advantage sign.")
def dual_clip(logps, old_logps, advantages, mask, *, epsilon: float = 0.2, epsilon_high: float | None = None,
              dual_clip_c: float = 3.0):
    """Dual-clip PPO: the PPO clip loss, and for A < 0 also capped at -c A: l = min(l_ppo, -c A) where A < 0.

    Bounds the loss of negative-advantage tokens whose ratio has grown past c (default c = 3, Ye et al. 2020 /
    verl's clip_ratio_c); c must be > 1."""
    if dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(masked_log_ratio(logps, old_logps, mask))
    adv = advantages_2d(advantages, mask)
    loss, low, high = ppo_terms(ratio, adv, 1 - epsilon, 1 + eps_high)
    capped = (adv < 0) & (loss > -dual_clip_c * adv)
    loss = torch.where(adv < 0, torch.min(loss, -dual_clip_c * adv), loss)
    metrics = ratio_metrics(ratio, mask, **{"clip_ratio/low_mean": low, "clip_ratio/high_mean": high,
                                              "clip_ratio/dual_mean": capped})
    return masked(loss, mask), metrics


@POLICY_LOSSES.register(
    "simple_po", paper="Simple Policy Optimization", arxiv="2401.16025",
    requires=(off_policy_requirement("the quadratic penalty on the ratio's distance from 1 (its gradient is 0 at ratio 1, "
                          "where the loss is the plain policy gradient)"),),
    conventions=(Convention(
        "epsilon", lambda v, p: 0 < v < 1,
        "epsilon is a distance from 1 (the penalty's optimum sits at the ratio 1 + sign(A) epsilon, PPO's clip "
        "boundary), so it lies in (0, 1): from 1 on a negative advantage's optimum is a ratio <= 0. A bound written "
        "as a ratio (1.2 for the range 0.2) belongs here as 0.2"),),
    catalog="rl:67",
    notes="checked against MyRepositories-hub/Simple-Policy-Optimization atari/trainer.py compute_policy_loss "
          "('spo' branch) and atari/main.py (epsilon=0.2). Paper is for control; applied per token here.")
def simple_po(logps, old_logps, advantages, mask, *, epsilon: float = 0.2):
    """SPO: the clip is replaced by a quadratic penalty, l = -(r A - |A| (r - 1)^2 / (2 epsilon)).

    Its optimum in r sits exactly at the clip boundary r = 1 + sign(A) epsilon, and the gradient pulls r back
    beyond it instead of vanishing. epsilon = 0.2 (authors' code)."""
    ratio = torch.exp(masked_log_ratio(logps, old_logps, mask))
    adv = advantages_2d(advantages, mask)
    loss = -(ratio * adv - adv.abs() * (ratio - 1) ** 2 / (2 * epsilon))
    outside = (ratio - 1).abs() > epsilon
    return masked(loss, mask), ratio_metrics(ratio, mask, **{"ratio/outside_epsilon": outside})


@POLICY_LOSSES.register(
    "ce_gppo", paper="CE-GPPO: Controlling Entropy via Gradient-Preserving Clipping Policy Optimization in "
                     "Reinforcement Learning", arxiv="2509.20712",
    requires=(off_policy_requirement("the bounded gradients of clipped tokens (beta1, beta2) and the dual clip"),),
    conventions=(CLIP_LOW, CLIP_HIGH, _DUAL_CLIP),
    catalog="rl:16",
    notes="checked against Kwai-Klear/CE-GPPO verl/trainer/ppo/core_algos.py compute_gppo_loss_general_beta and "
          "recipe/dapo/1_5B_perf_run_gppo_v1_beta1_05_beta2_1_ours_math.sh (beta1=0.5, beta2=1, eps 0.2/0.2, "
          "clip_ratio_c=10). 7B recipe uses beta1=0.75.")
def ce_gppo(logps, old_logps, advantages, mask, *, epsilon: float = 0.2, epsilon_high: float | None = None,
            beta1: float = 0.5, beta2: float = 1.0, dual_clip_c: float | None = 10.0):
    """CE-GPPO: clipped tokens keep a bounded gradient; l = -beta1 (1-eps) (r/sg(r)) A if r < 1-eps and A < 0,
    -beta2 (1+eps_high) (r/sg(r)) A if r > 1+eps_high and A > 0, else -r A; then dual clip min(l, -c A) for A < 0.

    The value of a clipped token equals the clipped PPO value times beta; its gradient is beta (1 +/- eps) A
    grad log pi instead of PPO's zero. beta1 = beta2 = 1 is GPPO (Klear-Reasoner). Defaults: the authors'
    1.5B recipe; dual_clip_c=None disables the dual clip (verl applies it by default)."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(masked_log_ratio(logps, old_logps, mask))
    adv = advantages_2d(advantages, mask)
    kept = ratio / ratio.detach()  # value 1, gradient of r
    low = (ratio < 1 - epsilon) & (adv < 0)
    high = (ratio > 1 + eps_high) & (adv > 0)
    loss = torch.where(low, -beta1 * (1 - epsilon) * kept * adv,
                       torch.where(high, -beta2 * (1 + eps_high) * kept * adv, -ratio * adv))
    if dual_clip_c is not None:
        loss = torch.where(adv < 0, torch.min(loss, -dual_clip_c * adv), loss)
    metrics = clip_metrics(ratio, mask, low, high)
    return masked(loss, mask), metrics


@POLICY_LOSSES.register(
    "dcpo_clip", paper="DCPO: Dynamic Clipping Policy Optimization", arxiv="2509.02333",
    requires=(off_policy_requirement("the clip of the ratio to bounds that widen for unlikely tokens, and the dual clip"),),
    conventions=(CLIP_LOW, CLIP_HIGH, _DUAL_CLIP),
    catalog="rl:17",
    notes="checked against lime-RL/DCPO verl/trainer/ppo/core_algos.py get_clip_low_high + "
          "compute_policy_loss_dcpo (clip_type=dynamic) and recipe/dcpo/run_dcpo.sh (eps_high 0.28, "
          "clip_ratio_c 10). Only the clip; DCPO's smooth advantage standardisation is an advantage entry.")
def dcpo_clip(logps, old_logps, advantages, mask, *, epsilon: float = 0.2, epsilon_high: float = 0.28,
              dual_clip_c: float = 10.0):
    """DCPO dynamic clip: bounds depend on the old token probability q: r in [(1+sqrt(max(0, 1-4 eps/q)))/2,
    min((1+sqrt(1+4 eps_high/q))/2, max(c, 10))], then PPO clip and dual clip min(l, -c A) for A < 0.

    Rare tokens (small q) get wide bounds, likely tokens tight ones. Deviation: where q underflows to 0 the
    authors' code sets the lower bound to 1; we use the q -> 0 limit (0.5), continuous with nearby q."""
    old = logps.detach() if old_logps is None else old_logps
    q = torch.exp(masked(old, mask)).clamp(min=torch.finfo(torch.float32).tiny)
    low = (1 + torch.sqrt(torch.clamp(1 - 4 * epsilon / q, min=0.0))) / 2
    high = torch.clamp((1 + torch.sqrt(1 + 4 * epsilon_high / q)) / 2, max=max(dual_clip_c, 10.0))
    ratio = torch.exp(masked_log_ratio(logps, old_logps, mask))
    adv = advantages_2d(advantages, mask)
    loss, low_c, high_c = ppo_terms(ratio, adv, low, high)
    loss = torch.where(adv < 0, torch.min(loss, -dual_clip_c * adv), loss)
    metrics = clip_metrics(ratio, mask, low_c, high_c)
    return masked(loss, mask), metrics


@POLICY_LOSSES.register(
    "cispo", paper="MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention",
    requires=(off_policy_requirement("the cap of the importance weight pi / pi_old at epsilon_high (with the ratio 1 on every "
                          "token it is on-policy REINFORCE with a token mean)"),),
    conventions=(Convention(
        "epsilon_high", lambda v, p: v >= 1,
        "epsilon_high is an absolute cap on the importance weight pi / pi_old (TRL's meaning: ScaleRL's eps_max, "
        "which TRL recommends at 5.0), not a distance from 1: below 1 it caps every weight, those of tokens whose "
        "probability did not move (ratio 1) included, at that value. verl's and the MiniMax-M1 paper's 0.28 is "
        "relative, a cap at 1 + 0.28: write epsilon_high: 1.28"),),
    catalog="rl:trl",
    arxiv="2506.13585", trl="loss_type=cispo",
    notes="J = sum sg(clip(r, 1-eps_low, 1+eps_high)) A log pi / sum|o| (MiniMax-M1 eq.; no lower bound used). "
          "Identical to TRL 1.16's cispo per-token loss; epsilon_high keeps TRL's meaning (the absolute cap on r, "
          "ScaleRL's eps_max, 2510.13786, recommended 5.0); MiniMax-M1 does not publish its value.")
def cispo(logps, old_logps, advantages, mask, *, epsilon_high: float = 5.0):
    """CISPO: REINFORCE with a clipped, stop-gradient IS weight: l = -sg(min(r, epsilon_high)) A log pi.

    Every token keeps a gradient (only its weight is capped). epsilon_high is the cap on r itself (TRL's meaning,
    default 5.0 from ScaleRL as TRL recommends). The paper aggregates with token_mean."""
    ratio = torch.exp(masked_log_ratio(logps, old_logps, mask))
    weight = torch.clamp(ratio, max=epsilon_high).detach()
    loss = -weight * advantages_2d(advantages, mask) * masked(logps, mask)
    return masked(loss, mask), ratio_metrics(ratio, mask, **{"clip_ratio/high_mean": ratio > epsilon_high})


@POLICY_LOSSES.register(
    "gpg_pg", paper="GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning",
    catalog="rl:8",
    arxiv="2504.02546",
    notes="checked against AMAP-ML/GPG open-r1 gpg_trainer.py and verl compute_policy_loss_gpg (-log_prob * A, "
          "token-mean). GPG's alpha = B/(B-M) correction belongs to the advantage.")
def gpg_pg(logps, advantages, mask):
    """Plain policy gradient: l = -A log pi (no ratio, no clip, no KL).

    Same gradient as ppo_clip on-policy; the loss value differs (A log pi instead of A)."""
    loss = -advantages_2d(advantages, mask) * masked(logps, mask)
    return masked(loss, mask), {}


# ---------------------------------------------------------------------------------------------------------------
# sequence-ratio family (per-sequence loss spread over the row's tokens)
# ---------------------------------------------------------------------------------------------------------------

@POLICY_LOSSES.register(
    "gspo", paper="Group Sequence Policy Optimization", arxiv="2507.18071",
    requires=(off_policy_requirement("the clip of the sequence ratio to [1 - epsilon, 1 + epsilon_high]"),),
    conventions=(CLIP_LOW, CLIP_HIGH),
    advantages="per_sequence",
    per_token_advantages="its one ratio per sequence multiplies the sum of the row's advantages, so the loss value is "
                         "right but every token's gradient is weighted by the whole row's advantages, spread evenly "
                         "over the row. Use policy loss gspo_token (GSPO-token, paper sec. 4.3: the sequence ratio's "
                         "value with per-token gradients) or an advantage with one value per sequence",
    catalog="rl:3",
    trl="importance_sampling_level=sequence",
    notes="checked against TRL 1.16 _compute_loss (sequence branch); eps 3e-4/4e-4 from GSPO v2 sec. 5.1 via TRL's "
          "paper index. Use aggregation=seq_mean_token_mean for the paper's (1/G) sum_i.")
def gspo(logps, old_logps, advantages, mask, *, epsilon: float = 3e-4, epsilon_high: float | None = 4e-4):
    """GSPO: sequence ratio s = exp(mean_t log(pi/pi_old)), l = -min(s A, clip(s, 1-epsilon, 1+epsilon_high) A).

    The per-sequence loss sits on every valid token of its row (as TRL broadcasts it); with (N, T) advantages
    each token uses its own A with the shared s, as TRL does."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    s = torch.exp(seq_mean(masked_log_ratio(logps, old_logps, mask), mask)).unsqueeze(1)
    adv = advantages_2d(advantages, mask)
    loss, low, high = ppo_terms(s.expand(mask.shape), adv, 1 - epsilon, 1 + eps_high)
    metrics = clip_metrics(s.expand(mask.shape), mask, low, high)
    return masked(loss, mask), metrics


@POLICY_LOSSES.register(
    "gspo_token", paper="Group Sequence Policy Optimization", arxiv="2507.18071",
    requires=(off_policy_requirement("the clip of the sequence ratio to [1 - epsilon, 1 + epsilon_high]"),),
    conventions=(CLIP_LOW, CLIP_HIGH),
    catalog="rl:3",
    notes="GSPO-token (paper sec. 4.3): s_it = sg[s_i] pi/sg[pi]; checked against TRL's "
          "trl.experimental.gspo_token (importance_sampling_level='sequence_token'), not shipped in TRL 1.16.")
def gspo_token(logps, old_logps, advantages, mask, *, epsilon: float = 3e-4, epsilon_high: float | None = 4e-4):
    """GSPO-token: s_it = sg[s_i] * pi_t / sg[pi_t], l = -min(s_it A_it, clip(s_it, 1-eps, 1+eps_high) A_it).

    Value of s_it is the sequence ratio s_i, its gradient is s_i grad log pi_t, so per-token advantages can differ
    along the sequence; with one advantage per sequence its gradient equals GSPO's."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    lp = masked(logps, mask)
    seq_log = seq_mean(masked_log_ratio(logps, old_logps, mask), mask).detach().unsqueeze(1)
    ratio = torch.exp(lp - lp.detach() + seq_log)
    adv = advantages_2d(advantages, mask)
    loss, low, high = ppo_terms(ratio, adv, 1 - epsilon, 1 + eps_high)
    metrics = clip_metrics(ratio, mask, low, high)
    return masked(loss, mask), metrics


@POLICY_LOSSES.register(
    "gmpo", paper="Geometric-Mean Policy Optimization", arxiv="2507.20673",
    requires=(off_policy_requirement("the geometric mean of the log-space clipped token ratios (with every ratio 1 its "
                          "gradient is GRPO's sequence-mean policy gradient)"),),
    advantages="per_sequence",
    catalog="rl:4",
    trl="trl.experimental.gmpo (with aggregation=seq_mean_token_mean)",
    notes="checked against TRL 1.16 experimental/gmpo/gmpo_trainer.py and verl compute_policy_loss_geo_mean "
          "(log-space clip (0.4, 0.4), paper sec. 4).")
def gmpo(logps, old_logps, advantages, mask, *, epsilon: float = 0.4, epsilon_high: float | None = None):
    """GMPO: geometric mean of sign-aware log-space clipped token ratios, l_i = -A_i exp(mean_t d*_it).

    d = log r clamped to [-epsilon, epsilon_high] only on the side that would increase the objective
    (min for A > 0, max for A < 0), i.e. ratio range (e^-0.4, e^0.4) by default. Needs one advantage per
    sequence; the per-sequence loss is spread over the row's tokens (use seq_mean_token_mean)."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    adv = seq_adv(advantages)
    lr = masked_log_ratio(logps, old_logps, mask)
    clamped = torch.clamp(lr, -epsilon, eps_high)
    clipped = torch.where(adv.unsqueeze(1) > 0, torch.min(lr, clamped), torch.max(lr, clamped))
    rho = torch.exp(seq_mean(masked(clipped, mask), mask))
    ratio = torch.exp(lr)
    metrics = ratio_metrics(ratio, mask, **{"clip_ratio/region_mean": clipped != lr})
    metrics["ratio/geo_mean"] = rho.detach().mean()
    return spread_over_tokens(-adv * rho, mask), metrics


@POLICY_LOSSES.register(
    "gvpo", paper="GVPO: Group Variance Policy Optimization for Large Language Model Post-Training",
    requires=(GROUP, off_policy_requirement("the implicit reward beta sum log(pi / pi_old) regressed onto the centred "
                                  "rewards (0 on-policy: the gradient is Dr. GRPO's, on centred rewards)")),
    catalog="rl:13",
    arxiv="2504.19599",
    notes="checked against jszkc/GVPO GVPO/gvpo_core_algos.py compute_policy_loss_gvpo and "
          "run_qwen2-7b_math_gvpo.sh (gvpo_beta=0.1, norm_adv_by_std_in_grpo=False). The authors' loss is the SUM "
          "of the per-row terms; seq_mean_token_mean gives that sum / N.")
def gvpo(logps, old_logps, rewards, mask, group_size: int, *, beta: float = 0.1):
    """GVPO: l_i = 1/2 [(rho_i - sg(mean_g rho)) - (R_i - mean_g R)]^2 / (G - 1), rho_i = beta sum_t log(pi/pi_old).

    A regression of centred implicit rewards onto centred rewards (no IS weight, no clip); its gradient is
    -beta/(G-1) sum_i w_i grad log pi(y_i), w_i = (R_i - R_bar) - (rho_i - rho_bar). Reads raw `rewards` (N,)
    and centres them per group itself. Rows must be whole groups; a group of one gives 0."""
    lr = masked_log_ratio(logps, old_logps, mask)
    rho = grouped(beta * lr.sum(-1), group_size)
    r = grouped(rewards.float(), group_size)
    resid = (rho - rho.detach().mean(1, keepdim=True)) - (r - r.mean(1, keepdim=True))
    per_seq = 0.5 * resid**2 / max(group_size - 1, 1)
    return spread_over_tokens(per_seq.reshape(-1), mask), {"gvpo/implicit_reward_mean": rho.detach().mean()}


@POLICY_LOSSES.register(
    "a_star_po", paper="Accelerating RL for LLM Reasoning with Optimal Advantage Regression", arxiv="2505.20686",
    advantages="per_sequence",
    catalog="rl:63",
    trl="trl.experimental.a2po (stage-2 loss, with aggregation=seq_mean_token_mean)",
    notes="checked against TRL 1.16 experimental/a2po/a2po_trainer.py compute_loss (beta2=1e-3). `advantages` "
          "must be r - V*(x), V* from the stage-1 estimate (an advantage entry).")
def a_star_po(logps, ref_logps, advantages, mask, *, beta2: float = 1e-3):
    """A*-PO stage 2: l_i = (beta2 sum_t log(pi/pi_ref) - A_i)^2 with A_i = r_i - V*(x) (one sample per prompt).

    Least-squares regression of the implicit reward onto the optimal advantage; no ratio to pi_old, no clip."""
    implicit = beta2 * (masked(logps, mask) - masked(ref_logps, mask)).sum(-1)
    per_seq = (implicit - seq_adv(advantages)) ** 2
    return spread_over_tokens(per_seq, mask), {"a_star_po/implicit_reward_mean": implicit.detach().mean()}


@POLICY_LOSSES.register(
    "disco", paper="DisCO: Reinforcing Large Reasoning Models with Discriminative Constrained Optimization",
    requires=(GROUP, off_policy_requirement("the KL constraint (its squared hinge on KL(pi_old || pi) - delta: the KL is 0 "
                                  "before the policy moves)")),
    catalog="rl:14",
    arxiv="2505.12366",
    notes="checked against Optimization-AI/DisCO verl/verl/trainer/ppo/core_algos.py "
          "compute_policy_loss_disco_logL / _Lratio and scripts/train/run_disco_logL_1.5b_8k.sh (tau=10, "
          "beta=1e3, delta=1e-4). Built for aggregation=seq_mean_token_mean; the authors all-gather the batch.")
def disco(logps, old_logps, rewards, mask, group_size: int, kl_stats=None, *, score: str = "logL",
          tau: float = 10.0, beta: float = 1e3, delta: float = 1e-4):
    """DisCO: L = -(1/Q) sum_q [mean_{o+} s(o+) - tau log mean_{o-} exp(s(o-)/tau)] + sg(max(beta (KL-delta), 0)) KL.

    s = mean_t log pi ('logL') or mean_t pi/pi_old ('Lratio'); o+ / o- are rows with reward 1 / 0 (binary
    rewards); groups without both count in Q but add nothing. KL = token mean of k3(pi_old || pi) over the batch.
    The authors write the negative term as a gradient-equivalent surrogate of value 1; we return the
    log-mean-exp itself (same gradient). Rows are spread so that seq_mean_token_mean gives exactly L: row i
    carries -J_q(i) G / (non-empty rows of q) + c (N / tokens) sum_t kl_it. Rows must be whole groups; an empty
    completion scores 0.

    The KL and its N / tokens are the call's own unless `kl_stats` is given: the sums of `disco_kl_stats` over
    every process (KL sum, valid tokens, rows), which makes the constraint the batch's, not the process' (the
    authors all-gather the batch). N must then be the aggregation's `num_sequences`."""
    if score not in ("logL", "Lratio"):
        raise ValueError(f"score must be 'logL' or 'Lratio', got {score!r}")
    lr = masked_log_ratio(logps, old_logps, mask)
    ratio = torch.exp(lr)
    s = seq_mean(masked(logps, mask) if score == "logL" else masked(ratio, mask), mask)
    sg, rg = grouped(s, group_size), grouped(rewards.float(), group_size)
    pos, neg = rg == 1, rg == 0
    valid = pos.any(1) & neg.any(1)
    pos_mean = torch.where(pos, sg, 0.0).sum(1) / pos.sum(1).clamp(min=1)
    # rows without negatives get finite fillers: an all -inf logsumexp would send nan into the backward pass
    neg_scores = torch.where(neg.any(1, keepdim=True), torch.where(neg, sg / tau, -math.inf), 0.0)
    neg_lme = tau * (torch.logsumexp(neg_scores, 1) - neg.sum(1).clamp(min=1).log())
    objective = torch.where(valid, pos_mean - torch.where(valid, neg_lme, 0.0), 0.0)
    kl_tok = masked(ratio - lr - 1, mask)
    if kl_stats is None:
        kl_sum, tokens, rows = kl_tok.sum(), mask.float().sum(), mask.shape[0]
    else:
        kl_sum, tokens, rows = (torch.as_tensor(v, dtype=kl_tok.dtype, device=kl_tok.device) for v in kl_stats)
    tokens = tokens.clamp(min=1.0)
    kl = kl_sum / tokens
    coef = torch.clamp(beta * (kl - delta), min=0.0).detach()
    # the group's -J_q goes to its non-empty rows (an empty row's tokens never reach the aggregation)
    filled = grouped(token_counts(mask) > 0, group_size)
    share = torch.where(filled, group_size / filled.sum(1, keepdim=True).clamp(min=1), 0.0)
    per_seq = (-objective.unsqueeze(1) * share).reshape(-1) + coef * kl_tok.sum(-1) * rows / tokens
    metrics = {"disco/kl": kl.detach(), "disco/constraint_coef": coef,
               "disco/valid_group_fraction": valid.float().mean()}
    return spread_over_tokens(per_seq, mask), metrics


def disco_kl_stats(logps, old_logps, mask) -> torch.Tensor:
    """This process' (sum of k3(pi_old || pi) over valid tokens, valid tokens, rows), detached: all-reduce it
    (sum) and pass it to `disco` as `kl_stats` when a batch is split over processes."""
    lr = masked_log_ratio(logps, old_logps, mask).detach()
    kl_sum = masked(torch.exp(lr) - lr - 1, mask).sum()
    return torch.stack([kl_sum, mask.float().sum().to(kl_sum.dtype), kl_sum.new_tensor(float(mask.shape[0]))])


# ---------------------------------------------------------------------------------------------------------------
# supervised loss with an implicit negative policy (NFT)
# ---------------------------------------------------------------------------------------------------------------

# NFT's prompt weight w(r_q), by name: the authors' `normalize` 1 / 2 / 0.
NFT_PROMPT_WEIGHTS = ("dr_grpo", "grpo", "none")
# r_q = rewards - advantages within this distance of 0 or 1 counts as an all-wrong / all-correct group (float32
# group means of 0/1 rewards are off by ~1e-7); beyond it outside [0, 1], the advantage is not r - r_q.
_NFT_RATE_TOL = 1e-4


def _check_nft(part, parts, trainer: dict) -> None:
    """The load-time check of `nft` in the GRPO trainer (`check=`, called by postrain.rl.section): it reads the
    prompt's accuracy as rewards - advantages, so the advantage must be dr_grpo's r - group mean and the rewards
    binary (no shaping); its parameters in range."""
    if parts.advantage.name != "dr_grpo":
        raise RecipeError(f"policy loss 'nft' ({part.where}) reads each row's group accuracy r_q as rewards - "
                          f"advantages, which holds for the dr_grpo advantage (r - group mean) only: set "
                          f"rl.advantage: dr_grpo (now {parts.advantage.name!r}, {parts.advantage.where})")
    if parts.shaping:
        raise RecipeError(f"policy loss 'nft' ({part.where}) needs binary 0 / 1 rewards, and shaping "
                          f"{parts.shaping[0].name!r} ({parts.shaping[0].where}) changes them: remove rl.shaping")
    key, value = part.where.split(",")[0], {**part.variant.params, **part.params}
    number = (int, float)
    rules = {"prompt_weight": (lambda v: v in NFT_PROMPT_WEIGHTS, f"one of {', '.join(NFT_PROMPT_WEIGHTS)}"),
             "negative_weight": (lambda v: isinstance(v, number) and v >= 0, "a number >= 0 (0: RFT)"),
             "negative_clamp": (lambda v: isinstance(v, number) and v > 0, "a number > 0"),
             "positive_clamp": (lambda v: isinstance(v, number) and v >= 0, "a number >= 0"),
             "log_ratio_max": (lambda v: isinstance(v, number) and v > 0, "a number > 0"),
             "accuracy_clamp": (lambda v: isinstance(v, number) and 0 <= v < 0.5, "a number in [0, 0.5)")}
    for name, (ok, what) in rules.items():
        if isinstance(value[name], bool) or not ok(value[name]):
            raise RecipeError(f"{key}.{name} ({value[name]!r}, {part.where}) must be {what}")


def _clamp_min_keep_grad(x, low):
    """Value max(x, low), gradient of x everywhere (the authors' `clamp_preserve_grad`)."""
    return x + (torch.clamp(x, min=low) - x).detach()


@POLICY_LOSSES.register(
    "nft", paper="Bridging Supervised Learning and Reinforcement Learning in Math Reasoning", arxiv="2505.18116",
    check=_check_nft,
    requires=(off_policy_requirement("the implicit negative policy's ratio (1 - r_q R) / (1 - r_q) (with R = 1 the gradient "
                          "is ppo_clip's on Dr. GRPO's advantage)"),),
    advantages="per_sequence",
    catalog="rl:79",
    notes="checked against NVlabs/NFT dp_actor.py DataParallelPPOActor.update_policy (neg_weight >= 0, "
          "ratio_type='token' branch), ray_nft_trainer.py compute_dapo_nft_outcome_advantage (correct_rate = group "
          "accuracy) and train_7B.sh / train_32B.sh (neg_weight 1.0, clamp_negative 1.0, clamp_positive 0.0, "
          "normalize 1, ppo_epochs 1, filter_groups on). The authors reduce sum_{i,t} l / 1000 per micro-batch "
          "(a constant normaliser: seq_mean_token_sum_norm, whose constant differs). r_q is read as "
          "rewards - advantages, so the advantage must be dr_grpo (checked at recipe load). ratio_type='sequence' "
          "is not registered.")
def nft(logps, old_logps, advantages, mask, rewards, *, negative_weight: float = 1.0,
        prompt_weight: str = "dr_grpo", negative_clamp: float = 1.0, positive_clamp: float = 0.0,
        log_ratio_max: float = 10.0, accuracy_clamp: float = 0.02):
    """NFT: -w(r_q) [r log R + (1-r) lambda log((1 - r_q R) / (1 - r_q))], R = pi/pi_old per token, r in {0, 1}.

    The authors' code (NVlabs/NFT dp_actor.py, update_policy, ratio_type='token'), per valid token:
      R = exp(min(log pi - log pi_old, log_ratio_max))              log-ratio cap 10, no gradient above it
      q = clamp(r_q, accuracy_clamp, 1 - accuracy_clamp)            r_q = the prompt's accuracy, clamp 0.02
      l+ = -log(max(R, c+))       on correct rows (r = 1): the positive policy's likelihood ratio
      l- = -log(max((1 - q R) / (1 - q), c-))   on wrong rows: the ratio of the implicit negative policy
                                                pi- = (pi - r_q pi_old) / (1 - r_q) to pi-_old = pi_old
      l = w(q) [r l+ + (1 - r) lambda l-],  w = 1 - q (prompt_weight dr_grpo, normalize=1), sqrt((1 - q) / q)
          (grpo, normalize=2) or 1 (none, normalize=0)
    max(., c) clamps the value only and keeps the gradient (clamp_preserve_grad): the gradient of l- is
    q R / ((1 - q) max(proxy, c-)) grad log pi, so c- = 1 caps it at GRPO's linear one where pi- has fallen,
    and the log never sees proxy <= 0. Defaults: lambda = negative_weight 1.0 (0 is RFT), c- = 1.0, c+ = 0.0
    (l+ = -log R: maximum likelihood on the positives), normalize=1.

    Strictly on-policy (R = 1) the gradient is -(r - r_q) grad log pi: ppo_clip's on Dr. GRPO's advantage
    r - r_q (prompt_weight dr_grpo) or on GRPO's (r - r_q) / sqrt(r_q (1 - r_q)) (prompt_weight grpo,
    the population std), as the authors' README states.

    Reads binary `rewards` r in {0, 1} and `advantages` = r - r_q (advantage dr_grpo): r_q = r - A is the group
    accuracy carried per row, so micro-batches need not hold whole groups. Groups that are all correct or all
    wrong (r_q = 0 or 1, groups of one included) get 0: the authors' dynamic sampling drops them, and 0 is also
    the loss's limit there (w = 0 at r_q = 1, no gradient at r_q = 0). l+ is computed in log space (the same
    value and gradient; R may underflow)."""
    if prompt_weight not in NFT_PROMPT_WEIGHTS:
        raise ValueError(f"prompt_weight must be one of {', '.join(NFT_PROMPT_WEIGHTS)}, got {prompt_weight!r}")
    if not negative_clamp > 0:
        raise ValueError(f"negative_clamp must be > 0 (the log's floor), got {negative_clamp}")
    if not negative_weight >= 0:
        raise ValueError(f"negative_weight must be >= 0 (0: RFT; the authors' -1 selects their DAPO branch, which "
                         f"is ppo_clip here), got {negative_weight}")
    if not 0 <= accuracy_clamp < 0.5:
        raise ValueError(f"accuracy_clamp must lie in [0, 0.5), got {accuracy_clamp}")
    r = rewards.float().to(mask.device)
    if not bool(((r == 0) | (r == 1)).all()):
        raise ValueError(f"nft needs binary rewards 0 / 1 (correct / wrong), got values {sorted(set(r.tolist()))[:6]}")
    rate = r - seq_adv(advantages).to(r.device)
    if bool(((rate < -_NFT_RATE_TOL) | (rate > 1 + _NFT_RATE_TOL)).any()):
        raise ValueError("nft reads the prompt's accuracy as rewards - advantages, which must lie in [0, 1]: the "
                         "advantages must be dr_grpo's r - group mean (rl.advantage: dr_grpo)")
    mixed = ((rate > _NFT_RATE_TOL) & (rate < 1 - _NFT_RATE_TOL)).unsqueeze(1)
    q = rate.clamp(accuracy_clamp, 1 - accuracy_clamp).unsqueeze(1)
    lr = torch.clamp(masked_log_ratio(logps, old_logps, mask), max=log_ratio_max)
    ratio = torch.exp(lr)
    # l+ = -log(max(R, c+)) with gradient -(R / max(R, c+)) grad log R, written with m = sg(max(log R, log c+))
    m = lr.detach() if positive_clamp <= 0 else torch.clamp(lr.detach(), min=math.log(positive_clamp))
    positive = -(m + torch.exp(lr.detach() - m) * (lr - lr.detach()))
    proxy = (1 - q * ratio) / (1 - q)
    negative = -torch.log(_clamp_min_keep_grad(proxy, negative_clamp))
    weight = {"dr_grpo": 1 - q, "grpo": torch.sqrt((1 - q) / q), "none": torch.ones_like(q)}[prompt_weight]
    correct = r.unsqueeze(1)
    loss = weight * (correct * positive + (1 - correct) * negative_weight * negative)
    loss = torch.where(mixed, loss, torch.zeros((), device=loss.device))
    wrong = mixed & (correct == 0)
    metrics = ratio_metrics(ratio, mask, **{"nft/negative_clamped": wrong & (proxy < negative_clamp),
                                             "nft/ratio_capped": lr.detach() >= log_ratio_max})
    metrics["nft/mixed_group_fraction"] = mixed.float().mean().detach()
    return masked(loss, mask), metrics


# ---------------------------------------------------------------------------------------------------------------
# aggregations
# ---------------------------------------------------------------------------------------------------------------

@AGGREGATIONS.register(
    "token_mean", paper="DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arxiv="2503.14476",
    catalog="rl:trl",
    trl="loss_type=dapo",
    notes="with global_tokens = TRL's num_items_in_batch this is loss_type=dapo; without it, the local token mean "
          "(TRL's loss_type=bnpo).")
def token_mean(per_token_loss, mask, global_tokens=None):
    """Token-level mean: sum_{i,t} l_it m_it / sum_{i,t} m_it (DAPO).

    Pass `global_tokens` (valid tokens over all processes) when rows are split over processes."""
    total = mask.float().sum() if global_tokens is None else torch.as_tensor(global_tokens, dtype=torch.float32)
    return masked(per_token_loss, mask).sum() / total.clamp(min=1.0)


@AGGREGATIONS.register(
    "seq_mean_token_mean", paper="DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
    catalog="rl:1",
    arxiv="2402.03300", trl="loss_type=grpo")
def seq_mean_token_mean(per_token_loss, mask, num_sequences=None):
    """Original GRPO: mean over sequences of each sequence's token mean, (1/N) sum_i (1/|o_i|) sum_t l_it.

    Empty completions count in N and add 0 (TRL clamps |o_i| >= 1). Pass `num_sequences` (rows over all
    processes) when rows are split over processes."""
    n = mask.shape[0] if num_sequences is None else num_sequences
    return seq_mean(masked(per_token_loss, mask), mask).sum() / max(float(n), 1.0)


@AGGREGATIONS.register(
    "seq_mean_token_sum",
    catalog="rl:extra",
    paper="Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs",
    arxiv="2402.14740", notes="the whole completion as one action (sequence log-likelihood); verl's seq-mean-token-sum.")
def seq_mean_token_sum(per_token_loss, mask, num_sequences=None):
    """Mean over sequences of each sequence's token sum: (1/N) sum_i sum_t l_it.

    Pass `num_sequences` (rows over all processes) when rows are split over processes."""
    n = mask.shape[0] if num_sequences is None else num_sequences
    return masked(per_token_loss, mask).sum() / max(float(n), 1.0)


@AGGREGATIONS.register(
    "seq_mean_token_sum_norm", paper="Understanding R1-Zero-Like Training: A Critical Perspective",
    catalog="rl:2",
    arxiv="2503.20783", trl="loss_type=dr_grpo",
    notes="TRL divides by (local rows * max_completion_length); pass the configured max_completion_length.")
def seq_mean_token_sum_norm(per_token_loss, mask, num_sequences=None, *, max_completion_length: int | None = None):
    """Dr. GRPO: token sum over a constant, sum_{i,t} l_it / (N * max_completion_length).

    No per-sequence length normalisation (removes GRPO's length bias). max_completion_length=None falls back
    to the padded width T of this batch (verl's behaviour), which is only constant if padding is to the max."""
    n = mask.shape[0] if num_sequences is None else num_sequences
    length = mask.shape[1] if max_completion_length is None else max_completion_length
    return masked(per_token_loss, mask).sum() / (max(float(n), 1.0) * float(length))


@AGGREGATIONS.register(
    "delta_l", paper="ΔL Normalization: Rethink Loss Aggregation in RLVR", arxiv="2509.07558",
    catalog="rl:18",
    notes="checked against zerolllin/Delta-L-Normalization verl/trainer/ppo/core_algos.py (use_grpopp: A_i * "
          "L_i^-a / mean_j L_j^-a, then masked_mean_allavg = sum / (B * T_max)). alpha=1 is the paper's "
          "minimum-variance choice (CountDown); the math recipes use 0.75.")
def delta_l(per_token_loss, mask, length_weight_sum=None, *, alpha: float = 1.0,
            max_completion_length: int | None = None):
    """ΔL: sum_i [L_i^-alpha / sum_j L_j^-alpha] sum_t l_it / max_completion_length (unbiased, min variance at 1).

    alpha = 0 is Dr. GRPO's constant normaliser. Empty completions get weight 0. Pass `length_weight_sum`
    (sum_j L_j^-alpha over all processes) when rows are split; max_completion_length=None uses the padded
    width T, as the authors' verl code does."""
    lengths = token_counts(mask)
    weights = torch.where(lengths > 0, lengths.clamp(min=1.0) ** -alpha, torch.zeros_like(lengths))
    total = weights.sum() if length_weight_sum is None else torch.as_tensor(length_weight_sum, dtype=torch.float32)
    length = mask.shape[1] if max_completion_length is None else max_completion_length
    per_seq = masked(per_token_loss, mask).sum(-1)
    return (weights * per_seq).sum() / (total.clamp(min=torch.finfo(torch.float32).tiny) * float(length))


# ---------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------

# Data inputs shared by the RL axes: passed to an entry that reads them, silently skipped by one that does not
# (so a trainer can hand every loss the same batch); anything else in kwargs is a hyperparameter and is checked.
DATA_NAMES = frozenset({"logps", "old_logps", "ref_logps", "advantages", "mask", "rewards", "group_size",
                        "entropies", "prompt_ids", "global_tokens", "num_sequences", "length_weight_sum",
                        "completion_ids", "vocab_logps"})


def _split(variant, base: dict, kwargs: dict) -> tuple[dict, dict]:
    """Data the entry reads (from `base` and `kwargs`) and hyperparameters (the rest of `kwargs`)."""
    data = {k: v for k, v in {**base, **kwargs}.items() if k in variant.data}
    return data, {k: v for k, v in kwargs.items() if k not in variant.data and k not in DATA_NAMES}


def policy_loss(name: str, *, logps, old_logps=None, advantages=None, mask, aggregation: str = "token_mean",
                aggregation_params: dict | None = None, **kwargs):
    """Per-token loss of policy-loss entry `name`, aggregated by `aggregation` -> (loss scalar, metrics dict).

    `kwargs` holds the entry's hyperparameters and any extra data it reads (`ref_logps`, `rewards`,
    `group_size`); `aggregation_params` holds the aggregation's hyperparameters and global normalizers
    (`global_tokens`, `num_sequences`, `length_weight_sum`, `max_completion_length`, `alpha`).
    old_logps=None means on-policy (ratio 1, as TRL with num_iterations=1)."""
    variant = POLICY_LOSSES.get(name)
    data, params = _split(variant, {"logps": logps, "old_logps": old_logps, "advantages": advantages,
                                    "mask": mask}, kwargs)
    if "old_logps" in variant.data and data.get("old_logps") is None:
        data["old_logps"] = logps.detach()
    per_token, metrics = POLICY_LOSSES.call(name, data, params)
    agg = AGGREGATIONS.get(aggregation)
    agg_data, agg_params = _split(agg, {}, dict(aggregation_params or {}))
    loss = AGGREGATIONS.call(aggregation, {"per_token_loss": per_token, "mask": mask, **agg_data}, agg_params)
    return loss, metrics
