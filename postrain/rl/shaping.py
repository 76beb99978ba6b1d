"""Reward shaping: `fn(rewards (N,), group_size, <data>; *, params) -> shaped rewards (N,)`.

Applied after rewards are gathered across processes, so every entry sees whole groups (rows g*G .. g*G+G-1).
Shaped rewards are returned in float32 (the dtype the advantage step works in). Lengths are `mask.sum(-1)`.
Padding positions of `old_logps` may hold garbage (nan/inf): they are excluded with torch.where.
"""

from __future__ import annotations

import torch

from postrain.errors import RecipeError
from postrain.registry import Requirement
from postrain.rl.registry import SHAPING
from postrain.tensors import grouped, token_counts


def _overlong_budget(params: dict, layout) -> float:
    """The longest completion dapo_overlong leaves unpunished: L_max - L_cache."""
    return params["max_completion_length"] - params["overlong_buffer_len"]


def _curriculum_end_budget(params: dict, layout) -> float | None:
    """The smallest budget of the run: B at its last step where trainer.max_steps says which; else unknown, unless
    the budget never decays (decay_factor 1)."""
    if params["decay_factor"] >= 1:
        return float(params["initial_budget"])
    if layout.max_steps is None:
        return None
    return curriculum_budget(layout.max_steps - 1, initial_budget=params["initial_budget"],
                             decay_factor=params["decay_factor"], decay_interval=params["decay_interval"],
                             min_budget=params["min_budget"])


# What the entries' defining steps need from the batch layout (postrain.jobs.liveness).
_OVERLONG = Requirement("length_budget", "the soft overlong punishment (over the last overlong_buffer_len tokens "
                                         "before max_completion_length)", amount=_overlong_budget)
_CURRICULUM = Requirement("length_budget", "the length-efficiency term against the shrinking budget",
                          amount=_curriculum_end_budget)


# Load-time checks of how the GRPO trainer runs an entry (`check=` on the entry): postrain.rl.section calls each with
# the part (its recipe parameters `params`, its place `where`, its entry `variant`), every part of the `rl:` section
# and the recipe's `trainer:` mapping.
def _check_overlong(part, parts, trainer: dict) -> None:
    """The soft punishment's buffer must fit in the completion length."""
    buffer = part.params.get("overlong_buffer_len", part.variant.params["overlong_buffer_len"])
    limit = part.params.get("max_completion_length", int(trainer.get("max_completion_length") or 512))
    if not 0 < buffer <= limit:
        raise RecipeError(f"{part.where.split(',')[0]}.overlong_buffer_len ({buffer}, {part.where}) must lie "
                          f"in 1..max_completion_length ({limit}, trainer.max_completion_length unless the "
                          f"part sets its own)")


def _check_curriculum(part, parts, trainer: dict) -> None:
    """Train Long, Think Short's budget schedule must shrink from a positive budget: B0 > 0, 0 < gamma <= 1,
    T >= 1 steps, 0 < B_min."""
    key = part.where.split(",")[0]
    value = {**part.variant.params, **part.params}
    rules = {"initial_budget": (lambda v: v > 0, "> 0 tokens"),
             "decay_factor": (lambda v: 0 < v <= 1, "in (0, 1] (1: a fixed budget)"),
             "decay_interval": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1 (optimizer steps)"),
             "min_budget": (lambda v: v > 0, "> 0 tokens")}
    for name, (ok, what) in rules.items():
        v = value.get(name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not ok(v):
            raise RecipeError(f"{key}.{name} ({v!r}, {part.where}) must be {what}")


@SHAPING.register("dapo_overlong", paper="DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
                  requires=(_OVERLONG,),
                  check=_check_overlong,
                  catalog="rl:extra",
                  arxiv="2503.14476",
                  trl="reward_funcs += trl.rewards.get_soft_overlong_punishment(max_completion_length, "
                      "overlong_buffer_len) (penalty_factor=1)",
                  notes="DAPO Eq. 13; same piecewise form as TRL's _SoftOverlongPunishment and verl's DAPO reward "
                        "manager (overlong_buffer.len / penalty_factor)")
def dapo_overlong(rewards, group_size, mask, *, max_completion_length: int = 20480,
                  overlong_buffer_len: int = 4096, penalty_factor: float = 1.0):
    """Soft overlong punishment: r + R_length, R_length = -penalty_factor * clip((|y| - (L_max - L_cache)) / L_cache, 0, 1).

    DAPO Eq. 13: no penalty up to L_max - L_cache tokens, a linear ramp down to -1 across the last L_cache tokens,
    -1 beyond L_max (the clip makes the "-1 past L_max" branch the ramp's end, as in the paper and TRL; verl's
    version keeps falling past L_max, which cannot happen when generation stops at L_max).
    Defaults are the paper's: 16,384 expected tokens + a 4,096-token soft punish cache = 20,480 max tokens.
    `penalty_factor` is verl's `overlong_buffer.penalty_factor` (1.0 = the paper)."""
    expected = max_completion_length - overlong_buffer_len
    over = ((token_counts(mask) - expected) / overlong_buffer_len).clamp(0.0, 1.0)
    return rewards.float() - penalty_factor * over


@SHAPING.register("grpo_lead_length", paper="GRPO-LEAD: A Difficulty-Aware Reinforcement Learning Approach for "
                  "Concise Mathematical Reasoning in Language Models", arxiv="2504.09696",
                  requires=(Requirement("group_size", "the length z-score among the group's correct completions"),),
                  catalog="rl:23",
                  notes="checked against aeroplanepaper/GRPO-LEAD verl/verl/trainer/main_ppo.py "
                        "get_reweight_rewards; the repo's extra gate (skip groups whose 3 shortest completions "
                        "average <= 4000 tokens) is not in the paper and is left out")
def grpo_lead_length(rewards, group_size, mask, *, alpha: float = 0.05):
    """Length-dependent accuracy reward: a correct completion (r > 0) gets r * exp(-alpha * z), z its length z-score
    among the group's correct completions; other rows are unchanged.

    z_i = (L_i - mean_correct(L)) / (std_correct(L) + 1e-6), std the unbiased (n-1) std over the group's correct
    completions, taken as 1 when fewer than two are correct (so a lone correct answer keeps r). alpha = 0.05 as in
    the authors' code. The paper's penalty for wrong answers (-1) belongs in the reward function itself."""
    r = grouped(rewards.float(), group_size)
    length = grouped(token_counts(mask), group_size)
    correct = r > 0
    n = correct.sum(-1, keepdim=True).float()
    mean = torch.where(correct, length, 0.0).sum(-1, keepdim=True) / n.clamp(min=1)
    var = torch.where(correct, (length - mean) ** 2, 0.0).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
    std = torch.where(n > 1, var.sqrt(), torch.ones_like(var))
    z = (length - mean) / (std + 1e-6)
    return torch.where(correct, r * torch.exp(-alpha * z), r).reshape(-1)


@SHAPING.register("unlikeliness", paper="Rewarding the Unlikely: Lifting GRPO Beyond Distribution Sharpening",
                  requires=(Requirement("group_size", "the likelihood ranks within the group"),),
                  catalog="rl:27",
                  arxiv="2506.02355",
                  notes="checked against AndreHe02/rewarding-unlikely-release ray_lean_trainer.py "
                        "_compute_advantages (rank_penalty) and examples/lean/grpo.sh (rank_penalty=0.25)")
def unlikeliness(rewards, group_size, old_logps, mask, *, beta_rank: float = 0.25):
    """Unlikeliness reward: r_i * (1 - beta_rank * rank_i / G), rank_i the ascending rank (0 = least likely) of the
    completion's mean-token log-prob under the sampling policy within its group.

    So the least likely completion keeps its full reward and the most likely loses beta_rank*(G-1)/G of it; GRPO's
    z-score is then taken on the shaped rewards. Ties are ranked by row order. An empty completion has mean
    log-prob 0 (as verl's masked_mean gives). beta_rank = 0.25 from the authors' script."""
    valid = mask.bool()
    total = torch.where(valid, old_logps.float(), 0.0).sum(-1)
    mean_logp = total / valid.sum(-1).clamp(min=1)
    seq = grouped(mean_logp, group_size)
    order = torch.argsort(seq, dim=-1, stable=True)
    rank = torch.argsort(order, dim=-1, stable=True).float()
    r = grouped(rewards.float(), group_size)
    return (r * (1 - beta_rank * rank / group_size)).reshape(-1)


@SHAPING.register("dra_diversity", paper="DRA-GRPO: Exploring Diversity-Aware Reward Adjustment for R1-Zero-Like "
                  "Training of Large Language Models", arxiv="2505.09655",
                  catalog="rl:26",
                  notes="checked against xiwenc1/DRA-GRPO src/open_r1/trl/trainer/grpo_trainer.py "
                        "(SMI_reweighting); there the similarity matrix spans the local process batch, here the "
                        "group, as the paper defines it")
def dra_diversity(rewards, group_size, embeddings):
    """Diversity-aware reward: r_i / (sum_j s_ij + 1e-6), s_ij the cosine similarity of completions i and j in the
    group (j = i included, so the divisor is 1 + the similarity to the others).

    `embeddings` (N, D) are sentence embeddings of the completions (the paper uses jina / nomic embedders); they
    are L2-normalised here. A completion unlike the rest of its group keeps more of its reward."""
    e = torch.nn.functional.normalize(embeddings.float(), p=2, dim=-1)
    e = grouped(e, group_size)
    similarity = (e @ e.transpose(-1, -2)).sum(-1)
    r = grouped(rewards.float(), group_size)
    return (r / (similarity + 1e-6)).reshape(-1)


@SHAPING.register("redit", paper="ReDit: Reward Dithering for Improved LLM Policy Optimization",
                  catalog="rl:34",
                  arxiv="2506.18631",
                  notes="r + zero-mean noise (paper abstract and §method); the noise draws are a data input so the "
                        "entry stays pure; the paper's per-task noise scales were not verified, so sigma has no "
                        "default")
def redit(rewards, group_size, noise, *, sigma: float):
    """Reward dithering: r + sigma * noise, `noise` (N,) zero-mean, unit-variance draws supplied by the caller.

    Pass standard-normal draws for the paper's Gaussian dithering (uniform draws on [-sqrt(3), sqrt(3)] for its
    uniform variant), drawn fresh each step; sigma is then the noise's standard deviation. Dithering also breaks
    ties in all-equal groups, so with group z-scores such groups get (noise-only) non-zero advantages."""
    return rewards.float() + sigma * noise.float()


@SHAPING.register("win_rate", paper="A Minimaximalist Approach to Reinforcement Learning from Human Feedback",
                  catalog=("rl:39", "preference:37"),
                  arxiv="2401.04056",
                  notes="SPO's reward: the sample's win rate against the other samples under a preference "
                        "function; self-comparisons are excluded (including them with P=0.5 is an affine map of "
                        "the same value per group, so group-normalised advantages are identical)")
def win_rate(rewards, group_size, preferences):
    """Win-rate reward: replaces r_i by (1 / (G-1)) * sum_{j != i} P(o_i beats o_j) over the other members of its group.

    `preferences` (N, G): row i, column j = probability (or 0/1 judgment) that completion i beats the j-th
    completion of its group; the diagonal (self) is ignored. A group of one has no opponent: its reward is 0.5
    (a tie). The incoming `rewards` are not used."""
    p = grouped(preferences.float(), group_size)
    other = ~torch.eye(group_size, dtype=torch.bool, device=p.device)
    wins = torch.where(other, p, 0.0).sum(-1)
    if group_size == 1:
        return torch.full_like(wins, 0.5).reshape(-1)
    return (wins / (group_size - 1)).reshape(-1)


@SHAPING.register("rm_ensemble_worst_case", paper="Reward Model Ensembles Help Mitigate Overoptimization",
                  catalog="rl:40",
                  arxiv="2310.02743", notes="WCO, Eq. 4 of the paper")
def rm_ensemble_worst_case(rewards, group_size, ensemble_rewards):
    """Worst-case optimisation (WCO): r = min_m R_m over the M reward-model ensemble members.

    `ensemble_rewards` (N, M): each member's score of each completion. No hyperparameters. The incoming
    `rewards` are not used."""
    return ensemble_rewards.float().min(-1).values


@SHAPING.register("rm_ensemble_uncertainty", paper="Reward Model Ensembles Help Mitigate Overoptimization",
                  catalog="rl:40",
                  arxiv="2310.02743",
                  notes="UWO, Eq. 5 of the paper (population variance); the paper shows lam=0.5 for best-of-n "
                        "and lam=0.1 in its PPO variance analysis, so no single default")
def rm_ensemble_uncertainty(rewards, group_size, ensemble_rewards, *, lam: float):
    """Uncertainty-weighted optimisation (UWO): r = mean_m R_m - lam * (1/M) * sum_m (R_m - mean_m R_m)^2.

    `ensemble_rewards` (N, M). The variance is the intra-ensemble (population, 1/M) variance, not the std.
    The incoming `rewards` are not used."""
    scores = ensemble_rewards.float()
    mean = scores.mean(-1)
    return mean - lam * ((scores - mean.unsqueeze(-1)) ** 2).mean(-1)


def curriculum_budget(step: int, *, decay_interval: int, initial_budget: float = 256.0, decay_factor: float = 0.7,
                      min_budget: float = 1.0) -> float:
    """The token budget at optimizer step `step` of Train Long, Think Short's curriculum:
    B(t) = max(min_budget, initial_budget * decay_factor ** floor(t / decay_interval)).

    A step function: the budget shrinks by `decay_factor` every `decay_interval` steps, from the first step on
    (t = 0 gives initial_budget); min_budget = 1 is the paper's floor. Pure (the trainer logs it as
    rl/shaping/budget)."""
    if decay_interval < 1:
        raise ValueError(f"decay_interval must be >= 1 steps, got {decay_interval}")
    return max(float(min_budget), float(initial_budget) * float(decay_factor) ** (int(step) // int(decay_interval)))


def curriculum_budget_log(data: dict, params: dict) -> dict[str, float]:
    """What a trainer logs of a batch curriculum_budget_length shaped: the budget it was scored against."""
    schedule = {k: v for k, v in params.items() if k != "length_weight"}
    return {"rl/shaping/budget": curriculum_budget(data["step"], **schedule)}


@SHAPING.register("curriculum_budget_length", paper="Train Long, Think Short: Curriculum Learning for Efficient "
                  "Reasoning", arxiv="2508.08940",
                  requires=(_CURRICULUM,),
                  check=_check_curriculum,
                  logs=curriculum_budget_log,  # a hook: the trainer logs what it returns
                  catalog="rl:32",
                  notes="budget schedule B(t) = max(1, B0 * gamma^floor(t/T)) (exponential decay every T steps; "
                        "the paper's overview figure uses gamma = 0.7, its runs B0 = 256), as the paper states it; "
                        "the authors' code (hammoudhasan/curriculum_grpo) and the paper's length-reward formula and "
                        "weights could not be read here, so the efficiency term's shape is postrain's (full credit "
                        "within the budget, a linear ramp to 0 at twice the budget), and length_weight and the "
                        "decay interval T have no default; the length counted is the whole completion's, not only the thinking trace")
def curriculum_budget_length(rewards, group_size, mask, step, *, length_weight: float, decay_interval: int,
                             initial_budget: float = 256.0, decay_factor: float = 0.7, min_budget: float = 1.0):
    """Shrinking-budget length reward: r + length_weight * e(L, B(step)), B(step) = `curriculum_budget`.

    e(L, B) = clip(1 - max(L - B, 0) / B, 0, 1): 1 for a completion of at most B tokens (an empty one included),
    falling linearly to 0 at 2B. `rewards` are the recipe's weighted reward functions (the paper's correctness
    and format terms: weight them with rewards[i].weight); `step` is the optimizer step the batch was generated
    at (the trainer's global_step: 0 for the first batch), so the budget starts generous and tightens over
    training. Paper: initial budget 256 tokens, decay factor 0.7 in its overview; decay_interval and
    length_weight have no default (see notes): pick the interval so that the budget reaches the final one you
    want within the run, e.g. 256 * 0.7^4 = 61.5 tokens after 4 intervals."""
    budget = curriculum_budget(int(step), initial_budget=initial_budget, decay_factor=decay_factor,
                               decay_interval=decay_interval, min_budget=min_budget)
    over = (token_counts(mask) - budget).clamp(min=0.0)
    efficiency = (1.0 - over / budget).clamp(0.0, 1.0)
    return rewards.float() + length_weight * efficiency
