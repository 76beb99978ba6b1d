"""Samplers and filters: which groups / completions / prompts go into the batch, or with what weight.

Calling convention `fn(rewards (N,), group_size, <data>; *, params)`, N = num_groups * group_size with each group's
rows contiguous. Each entry documents what it returns:
  - a group keep mask (num_groups,) bool: expand to rows with `.repeat_interleave(group_size)`;
  - a row keep mask (N,) bool;
  - sampling weights / probabilities.
Refilling a batch after filtering (generating more groups) is the trainer's job; `max_num_gen_batches`, where an
entry has it, is the trainer's limit on generation rounds per batch (the entry itself ignores it). Randomness
(exploration draws) and per-prompt history come in as data tensors, so every entry is a pure function.

How the GRPO trainer applies an entry is metadata on the entry (postrain.rl.section reads it): `stage=`, where in a
training step it acts (group, subset, row, reweight, replay, prompt); `refill=True`, the trainer generates more
groups while too few are kept; `recovers=True`, the entry returns the groups for this batch and for a buffer, which
the trainer carries to the next step; `unsupported=`, why the GRPO trainer cannot run it; `check=`, the entry's
load-time check of its parameters against the batch and of the parts it can run with (postrain.rl.section calls it).
"""

from __future__ import annotations

import itertools
import math

import torch

from postrain.errors import RecipeError
from postrain.registry import Requirement
from postrain.rl.registry import SAMPLERS
from postrain.tensors import grouped


# What the samplers' defining steps need from the batch layout (postrain.jobs.liveness).
def _refill_rounds(params: dict, layout) -> float:
    """Generation rounds per step a refilling sampler may use (max_num_gen_batches; 0: no limit)."""
    rounds = params["max_num_gen_batches"]
    return math.inf if rounds == 0 else rounds


def _kept_per_group(params: dict, layout) -> tuple[int, int]:
    return params["k"], layout.num_generations


def _kept_after_pruning(params: dict, layout) -> tuple[int, int]:
    return int(layout.generation_batch_size * (1 - params["pruning_rate"])), layout.generation_batch_size


def _replay_visits(params: dict, layout) -> int:
    """A prompt replays once its buffer holds min_buffer_size samples; each visit adds num_generations."""
    return 1 + math.ceil(params["min_buffer_size"] / max(layout.num_generations, 1))


_REFILL = Requirement("refill", "the refill of the batch with more kept groups", amount=_refill_rounds)
_GRESO = (Requirement("revisits", "the skip of prompts by their streak of all-correct / all-wrong epochs", amount=2),
          Requirement("refill", "the replacement of skipped prompts (without refill batches they are rolled out after "
                                "all)", amount=lambda params, layout: 1 + params["max_num_gen_batches"]))
_GFPO = Requirement("selection", "the filter to k completions of each group", amount=_kept_per_group)
_PRUNE = Requirement("selection", "the pruning of the completions with the smallest |advantage|",
                     amount=_kept_after_pruning)
_REPLAY = Requirement("revisits", "the off-policy term over each prompt's replayed samples", amount=_replay_visits)


def _not_all_equal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    r = grouped(rewards.float(), group_size)
    # A group of one is kept: it has no spread to lose (verl's DAPO keeps `len(vals) == 1` groups too).
    return (r.amax(-1) > r.amin(-1)) | (group_size == 1)


def _top_k_rows(score: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """Row keep mask: the k highest scores of each group (ties broken by row order)."""
    if not 1 <= k <= group_size:
        raise ValueError(f"k={k} must be in 1..group_size={group_size}")
    s = grouped(score, group_size)
    order = torch.argsort(s, dim=-1, descending=True, stable=True)[:, :k]
    keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, order, True)
    return keep.reshape(-1)


# Load-time checks of how the GRPO trainer runs an entry (`check=` on the entry): postrain.rl.section calls each with
# the part (its recipe parameters `params`, its place `where`, its entry `variant`), every part of the `rl:` section
# and the recipe's `trainer:` mapping, and the check raises RecipeError naming the key.
def _key(part) -> str:
    return part.where.split(",")[0]


def _check_gfpo(part, parts, trainer: dict) -> None:
    group = int(trainer.get("num_generations") or 8)
    if not 1 <= int(part.params["k"]) <= group:
        raise RecipeError(f"{_key(part)}.k ({part.params['k']}, {part.where}) must lie in 1..trainer.num_generations "
                          f"({group}): GFPO keeps k of each group's completions")


def _check_cppo(part, parts, trainer: dict) -> None:
    rate = part.params.get("pruning_rate", part.variant.params["pruning_rate"])
    if not 0 <= rate < 1:
        raise RecipeError(f"{_key(part)}.pruning_rate ({rate}, {part.where}) must lie in [0, 1)")


def _check_greso(part, parts, trainer: dict) -> None:
    """Probabilities and ratios in range."""
    value = {**part.variant.params, **part.params}
    unit = (lambda v: 0 <= v <= 1, "in [0, 1]")
    rules = {"p_easy": unit, "p_hard": unit, "min_keep_prob": unit, "target_zero_variance": unit,
             "min_p": unit, "max_p": (lambda v: value["min_p"] <= v <= 1, f"in [min_p ({value['min_p']}), 1]"),
             "adapt_step": (lambda v: v >= 0, ">= 0"),
             "max_num_gen_batches": (lambda v: isinstance(v, int) and v >= 0,
                                     "an integer >= 0 (refill batches drawn per step to replace skipped prompts)")}
    for name, (ok, what) in rules.items():
        v = value[name]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not ok(v):
            raise RecipeError(f"{_key(part)}.{name} ({v!r}, {part.where}) must be {what}")


def _check_repo_replay(part, parts, trainer: dict) -> None:
    """Parameters in range, and parts its off-policy term can run (postrain.trainers.grpo_replay)."""
    key, value = _key(part), {**part.variant.params, **part.params}
    rules = {"strategy": (lambda v: v in REPO_REPLAY_STRATEGIES, f"one of {', '.join(REPO_REPLAY_STRATEGIES)}"),
             "num_replays": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
             "min_buffer_size": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
             "max_buffer_size": (lambda v: isinstance(v, int) and v >= value["min_buffer_size"],
                                 f"an integer >= min_buffer_size ({value['min_buffer_size']}), or nothing is ever "
                                 f"replayed"),
             "off_policy_loss_coef": (lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0")}
    for name, (ok, what) in rules.items():
        if isinstance(value[name], bool) or not ok(value[name]):
            raise RecipeError(f"{key}.{name} ({value[name]!r}, {part.where}) must be {what}")
    if value["strategy"] == "max_variance_k" and math.comb(value["max_buffer_size"], value["num_replays"]) > 200_000:
        raise RecipeError(f"{key}.strategy max_variance_k ({part.where}) searches every subset of num_replays "
                          f"({value['num_replays']}) of max_buffer_size ({value['max_buffer_size']}) samples, "
                          f"{math.comb(value['max_buffer_size'], value['num_replays'])} subsets per prompt: keep it "
                          f"under 200000 (the paper's 8 of 16: 12870)")
    other = next((p for p in parts.samplers if p.refills), None)
    if other is not None:
        raise RecipeError(f"sampler {part.name!r} ({part.where}) cannot be combined with {other.name!r} "
                          f"({other.where}): a refilled batch is assembled from several generation rounds, and the "
                          f"replayed samples are attached to the rows of the batch that was generated")
    if parts.shaping:
        raise RecipeError(f"sampler {part.name!r} ({part.where}) stores each completion's reward to replay it at "
                          f"later steps, and shaping {parts.shaping[0].name!r} ({parts.shaping[0].where}) would "
                          f"not be applied again to the stored raw rewards: remove rl.shaping")
    advantage = parts.advantage
    extra = [n for n in advantage.variant.data if n not in ("rewards", "group_size")]
    if extra:
        raise RecipeError(f"sampler {part.name!r} ({part.where}) normalises the replayed samples' rewards with "
                          f"advantage {advantage.name!r} ({advantage.where}), which reads {', '.join(extra)}; "
                          f"the buffer keeps rewards only: use an advantage on rewards alone (grpo, the paper's "
                          f"'split' normalisation, dr_grpo, rloo, ...)")
    loss = parts.policy_loss
    extra = [n for n in loss.variant.data if n not in ("logps", "old_logps", "advantages", "mask")]
    if extra:
        raise RecipeError(f"sampler {part.name!r} ({part.where}) computes its off-policy loss with policy loss "
                          f"{loss.name!r} ({loss.where}), which reads {', '.join(extra)}; the replayed samples carry "
                          f"their log-probs, behaviour log-probs, advantages and masks only: use ppo_clip (the "
                          f"paper's) or another per-token loss")


@SAMPLERS.register("dynamic_sampling", paper="DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
                   requires=(_REFILL,),
                   stage="group", refill=True,
                   catalog="rl:extra",
                   arxiv="2503.14476",
                   notes="DAPO Eq. 11 constraint 0 < |correct| < G, as implemented in verl's DAPO recipe "
                         "(keep groups whose metric std > 0, or groups of one); not supported in TRL")
def dynamic_sampling(rewards, group_size, *, max_num_gen_batches: int = 10):
    """Dynamic sampling filter: keep the groups whose rewards are not all equal. Returns a group keep mask (num_groups,).

    For 0/1 accuracy rewards this is the paper's 0 < #correct < G. The trainer over-samples and refills the batch
    with kept groups, generating at most `max_num_gen_batches` batches per step (0: no limit; 10 as in verl's
    DAPO run scripts)."""
    return _not_all_equal(rewards, group_size)


@SAMPLERS.register("reinforce_rej", paper="A Minimalist Approach to LLM Reasoning: from Rejection Sampling to "
                   "Reinforce", arxiv="2504.11343",
                   stage="group",
                   catalog="rl:9",
                   notes="checked against RLHFlow/Minimal-RL verl/trainer/ppo/core_algos.py "
                         "compute_reinforce_rej_outcome_advantage (groups with std == 0 get zero advantage; a group "
                         "of one is kept)")
def reinforce_rej(rewards, group_size):
    """Reinforce-Rej filter: drop the groups whose completions are all correct or all wrong. Returns a group keep mask.

    The authors' code tests the group's reward std > 0, so for the paper's +-1 rewards it is the same filter as
    `dynamic_sampling`; Reinforce-Rej then uses the raw reward (no mean/std normalisation) as the advantage."""
    return _not_all_equal(rewards, group_size)


@SAMPLERS.register("raft_pp", paper="A Minimalist Approach to LLM Reasoning: from Rejection Sampling to Reinforce",
                   stage="row",
                   catalog="rl:9",
                   arxiv="2504.11343",
                   notes="checked against RLHFlow/Minimal-RL compute_raft_outcome_advantage (advantage max(r, 0))")
def raft_pp(rewards, group_size):
    """RAFT++ sample selection: keep only the positive (r > 0) completions. Returns a row keep mask (N,).

    The authors' code realises this as the advantage max(r, 0), leaving rejected rows in the token-mean
    denominator; dropping the rows instead changes only that normaliser."""
    grouped(rewards, group_size)
    return rewards > 0


@SAMPLERS.register("online_difficulty", paper="Online Difficulty Filtering for Reasoning Oriented Reinforcement "
                   "Learning", arxiv="2504.03380",
                   requires=(_REFILL,),
                   stage="group", refill=True,
                   catalog="rl:44",
                   notes="balanced filtering: keep prompts of intermediate on-the-fly accuracy; the paper's "
                         "thresholds were not verified, so low/high have no default")
def online_difficulty(rewards, group_size, *, low: float, high: float, max_num_gen_batches: int = 10):
    """Balanced online difficulty filter: keep the groups whose pass rate p = mean(r > 0) satisfies low <= p <= high.

    Returns a group keep mask. low > 0 and high < 1 drop all-wrong and all-correct groups. The pass rate is the
    current rollout's (no history across steps). The trainer refills the batch as for `dynamic_sampling`."""
    passed = grouped(rewards > 0, group_size).float().mean(-1)
    return (passed >= low) & (passed <= high)


@SAMPLERS.register("greso", paper="Act Only When It Pays: Efficient Reinforcement Learning for LLM Reasoning via "
                   "Selective Rollouts", arxiv="2506.02177",
                   requires=_GRESO,
                   check=_check_greso,
                   stage="prompt",
                   catalog="rl:45",
                   notes="checked against Infini-AI-Lab/GRESO verl/trainer/ttis/presampling_selector.py "
                         "(easy_/hard_probabilistic_skip) and train-scripts/*greso.sh (p_easy = p_hard = 0.5)")
def greso(easy_streak, hard_streak, uniform, *, p_easy: float = 0.5, p_hard: float = 0.5,
          min_keep_prob: float = 0.01, target_zero_variance: float = 0.25, adapt_step: float = 0.01,
          min_p: float = 0.05, max_p: float = 0.95, max_num_gen_batches: int = 10):
    """GRESO pre-rollout skip: roll out prompt q unless u_q < 1 - max(p^k_q, min_keep_prob). Returns a prompt keep mask.

    Runs before generation, so it reads no rewards: `easy_streak` / `hard_streak` (P,) count the most recent
    consecutive epochs in which the prompt's group was all-correct / all-wrong (update them after each rollout
    with `greso_streaks`), `uniform` (P,) are U[0, 1) draws. At most one streak is non-zero, so the keep
    probability is max(p_easy^k_easy, 0.01) * max(p_hard^k_hard, 0.01). In the paper p_easy / p_hard adapt every
    step (-0.01 when the observed easy / hard zero-variance ratio reaches its target, 1/3 / 2/3 of 0.25, else +0.01,
    within [0.05, 0.95]); pass the current values as the parameters. `target_zero_variance`, `adapt_step`,
    `min_p`, `max_p` are `greso_adapt`'s (the trainer adapts p_easy / p_hard with it after each rollout, from the
    second epoch on, as the authors' ray_trainer.py); `max_num_gen_batches` is the trainer's limit on refill
    batches drawn per step to replace skipped prompts. The entry itself ignores these."""
    keep_easy = torch.clamp(p_easy ** easy_streak.float(), min=min_keep_prob)
    keep_hard = torch.clamp(p_hard ** hard_streak.float(), min=min_keep_prob)
    return uniform >= 1 - keep_easy * keep_hard


def greso_streaks(rewards, group_size, easy_streak, hard_streak, *, easy_threshold: float = 0.98,
                  hard_threshold: float = 0.11):
    """GRESO history update for the prompts just rolled out: returns (easy_streak, hard_streak) (num_groups,) each.

    A group whose mean reward is >= easy_threshold extends its easy streak (else resets it to 0); <= hard_threshold
    extends its hard streak (else 0). Thresholds from the authors' presampling_selector.py."""
    mean = grouped(rewards.float(), group_size).mean(-1)
    easy = torch.where(mean >= easy_threshold, easy_streak + 1, torch.zeros_like(easy_streak))
    hard = torch.where(mean <= hard_threshold, hard_streak + 1, torch.zeros_like(hard_streak))
    return easy, hard


def greso_adapt(p_easy: float, p_hard: float, easy_ratio: float, hard_ratio: float, *,
                target_zero_variance: float = 0.25, adapt_step: float = 0.01, min_p: float = 0.05,
                max_p: float = 0.95) -> tuple[float, float]:
    """GRESO's per-step adaptation of the skip bases (Infini-AI-Lab/GRESO ray_trainer.py, after generation):
    p <- max(p - adapt_step, min_p) when the step's observed easy (hard) zero-variance ratio reaches its target,
    else min(p + adapt_step, max_p); targets target_zero_variance / 3 (easy) and 2 * target_zero_variance / 3
    (hard: more exploration where outcomes are likelier to change). A smaller p skips more. Returns (p_easy,
    p_hard)."""
    def step(p: float, ratio: float, target: float) -> float:
        return max(p - adapt_step, min_p) if ratio >= target else min(p + adapt_step, max_p)

    return (step(p_easy, easy_ratio, target_zero_variance / 3),
            step(p_hard, hard_ratio, target_zero_variance * 2 / 3))


@SAMPLERS.register("gfpo_length", paper="Sample More to Think Less: Group Filtered Policy Optimization for Concise "
                   "Reasoning", arxiv="2508.09726",
                   requires=(_GFPO,),
                   check=_check_gfpo,
                   stage="subset",
                   catalog="rl:28",
                   notes="TRL v1.7 trl/experimental/gfpo/gfpo_trainer.py (top num_remains_in_group by score); "
                         "the paper sweeps k and G, so k has no default")
def gfpo_length(rewards, group_size, mask, *, k: int):
    """GFPO length filter: keep the k shortest completions of each group of G. Returns a row keep mask (N,).

    Advantages are then computed over the kept rows of each group only (mean/std of the kept subset); the
    filtered-out rows get no gradient. Ties go to the earlier row."""
    grouped(rewards, group_size)
    return _top_k_rows(-mask.float().sum(-1), group_size, k)


@SAMPLERS.register("gfpo_reward_per_token", paper="Sample More to Think Less: Group Filtered Policy Optimization "
                   "for Concise Reasoning", arxiv="2508.09726",
                   requires=(_GFPO,),
                   check=_check_gfpo,
                   stage="subset",
                   catalog="rl:28",
                   notes="token efficiency = reward / length (paper abstract, TRL v1.7 GFPO filter hook); "
                         "k has no default")
def gfpo_reward_per_token(rewards, group_size, mask, *, k: int):
    """GFPO token-efficiency filter: keep the k completions of each group with the highest r / length. Returns a row mask.

    Length is clamped to >= 1 so an empty completion has a finite score."""
    efficiency = rewards.float() / mask.float().sum(-1).clamp(min=1)
    return _top_k_rows(efficiency, group_size, k)


@SAMPLERS.register("cppo_prune", paper="CPPO: Accelerating the Training of Group Relative Policy Optimization-Based "
                   "Reasoning Models", arxiv="2503.22342",
                   requires=(_PRUNE,),
                   check=_check_cppo,
                   stage="row",
                   catalog="rl:77",
                   notes="checked against lzhxmu/CPPO cppo_verl/recipe/cppo/src/cppo_ray_trainer.py (metric="
                         "'smallest' prunes the smallest |A|) and math/gsm8k_cppo.sh (pruning_rate=0.5)")
def cppo_prune(rewards, group_size, advantages, *, pruning_rate: float = 0.5):
    """CPPO completion pruning: keep the int(N * (1 - pruning_rate)) completions of the batch with the largest |advantage|.

    Returns a row keep mask (N,). The selection is over the whole batch, not per group; ties go to the earlier
    row. `advantages` (N,) are computed before pruning. The authors' scripts use 0.5; the paper also reports
    0.75-0.9375 on GSM8K."""
    keep_n = int(advantages.shape[0] * (1 - pruning_rate))
    order = torch.argsort(advantages.float().abs(), descending=True, stable=True)[:keep_n]
    return torch.zeros(advantages.shape[0], dtype=torch.bool, device=advantages.device).scatter_(0, order, True)


@SAMPLERS.register("pf_ppo", paper="Policy Filtration for RLHF to Mitigate Noise in Reward Models", arxiv="2409.06957",
                   stage="reweight",
                   catalog="rl:43",
                   notes="checked against verl core_algos.compute_pf_ppo_reweight_data (the authors' verl port; "
                         "weights over the whole batch, defaults reweight_method='pow', weight_pow=2.0)")
def pf_ppo(rewards, group_size, *, reweight_method: str = "pow", weight_pow: float = 2.0):
    """PF-PPO policy filtration weights (N,) for resampling the batch with replacement (torch.multinomial).

    'pow': |r|^weight_pow; 'max_min': 1 for the batch's highest- and lowest-reward samples, else 0 (best-worst);
    'max_random': 0.4 for the highest-reward samples, 0.1 for the rest (best-random). Weights are then
    clamp(w + 1e-8, min=1e-8), so every sample keeps a tiny probability."""
    r = rewards.float()
    if reweight_method == "pow":
        w = r.abs() ** weight_pow
    elif reweight_method == "max_min":
        w = ((r == r.max()) | (r == r.min())).float()
    elif reweight_method == "max_random":
        w = torch.where(r == r.max(), 0.4, 0.1)
    else:
        raise ValueError(f"unknown reweight_method {reweight_method!r}: pow, max_min, max_random")
    return torch.clamp(w + 1e-8, min=1e-8)


@SAMPLERS.register("spo_prioritized", paper="Single-stream Policy Optimization", arxiv="2509.13232",
                   unsupported="it chooses which prompts the next batch draws, from each prompt's SPO tracker; the "
                               "tracker is single-stream (see spo_tracker) and TRL's RepeatSampler draws an epoch's "
                               "prompt order up front, while accelerate's dataloader fetches one batch ahead and "
                               "transformers' resume replays the sampler to skip batches, so a state-dependent draw "
                               "would neither see the latest state nor resume identically",
                   catalog="rl:19",
                   notes="checked against verl-project/verl-recipe spo/spo_ray_trainer.py (EXPLORATION_EPSILON=0.05)")
def spo_prioritized(p_hat, *, exploration_epsilon: float = 0.05):
    """SPO prioritized prompt sampling: probabilities proportional to sqrt(p_hat (1 - p_hat)) + exploration_epsilon.

    `p_hat` (P,) is each prompt's tracked success probability alpha / (alpha + beta) from SPO's Beta tracker.
    Returns probabilities (P,) summing to 1 (uniform if all weights are 0); the trainer draws the batch from them
    (with replacement when it needs more prompts than there are)."""
    p = p_hat.float()
    w = (p * (1 - p)).clamp(min=0).sqrt() + exploration_epsilon
    total = w.sum()
    if total <= 0:
        return torch.full_like(w, 1.0 / w.numel())
    return w / total


@SAMPLERS.register("recent_sample_recovery", paper="Confucius3-Math: A Lightweight High-Performance Reasoning LLM "
                   "for Chinese K-12 Mathematics Learning", arxiv="2506.18330",
                   requires=(_REFILL,),
                   stage="group", refill=True, recovers=True,
                   catalog="rl:22",
                   notes="Recent Sample Recovery, Algorithm 1 of the paper (netease-youdao/Confucius3-Math pdf): "
                         "valid groups beyond the batch are kept for the next step, no importance correction")
def recent_sample_recovery(rewards, group_size, buffer_rewards=None, *, batch_groups: int,
                           max_num_gen_batches: int = 10):
    """RSR batch builder: with dynamic sampling, take the first `batch_groups` valid groups of [buffer, new] for
    the batch and keep the remaining valid ones as the next step's buffer.

    Candidates are the buffered groups (`buffer_rewards`, rows of previously kept groups, first) followed by this
    step's new groups (`rewards`); valid = rewards not all equal. Returns a dict of LongTensors indexing candidate
    groups (0 .. num_buffered + num_new - 1): `batch` (at most batch_groups, in order) and `buffer`. When `batch`
    is short, the trainer generates more groups (at most `max_num_gen_batches` batches per step) and calls again
    with every valid group so far as the buffer."""
    pool = rewards if buffer_rewards is None else torch.cat([buffer_rewards.to(rewards), rewards])
    valid = torch.nonzero(_not_all_equal(pool, group_size)).flatten()
    return {"batch": valid[:batch_groups], "buffer": valid[batch_groups:]}


# RePO's replay strategies (SihengLi99/RePO src/replay_grpo.py `replay_strategy`; `none` = no sampler).
REPO_REPLAY_STRATEGIES = ("all", "random_k", "highest_k", "recent_k", "max_variance_k")


def _max_variance_subset(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (k,) of the k-subset of `scores` with the largest population variance; ties go to the larger sum,
    then to the first subset in itertools.combinations order (the authors' strict `>` over that order)."""

    subsets = torch.tensor(list(itertools.combinations(range(scores.numel()), k)), dtype=torch.long)
    values = scores.double()[subsets]
    var = ((values - values.mean(-1, keepdim=True)) ** 2).mean(-1)
    total = values.sum(-1)
    best = (var == var.max()).nonzero().flatten()
    best = best[total[best] == total[best].max()]
    return subsets[best[0]]


@SAMPLERS.register("repo_replay", paper="RePO: Replay-Enhanced Policy Optimization", arxiv="2506.09340",
                   requires=(_REPLAY,),
                   check=_check_repo_replay,
                   stage="replay",
                   catalog="rl:46",
                   notes="checked against SihengLi99/RePO src/replay_grpo_trainer.py _replay_step (strategies, "
                         "k = min(len(buffer), num_replays), replay only once len(buffer) >= min_cache_to_replay), "
                         "_update_cache (every on-policy sample enters its prompt's deque after the selection), "
                         "the 'split' advantage and _compute_loss (L_on + c L_off), and "
                         "scripts/train_replay_grpo.slurm (highest_k, 8 replays, buffer 16/16, c = 1.0)")
def repo_replay(buffer_rewards, draws=None, *, strategy: str = "highest_k", num_replays: int = 8,
                min_buffer_size: int = 16, max_buffer_size: int = 16, off_policy_loss_coef: float = 1.0):
    """RePO replay selection: which buffered samples of each prompt are replayed. Returns a slot mask (P, M) bool.

    `buffer_rewards` (P, M): each prompt's buffered rewards, oldest first, NaN in the empty slots after them.
    A prompt with fewer than `min_buffer_size` samples replays nothing; otherwise k = min(size, num_replays)
    samples (`all`: every one) by `strategy`: `highest_k` the k highest rewards (ties: the older), `recent_k` the
    k newest, `random_k` a uniform k-subset (the k smallest of `draws` (P, M), U[0, 1) draws), `max_variance_k`
    the k-subset of largest population variance (ties: larger sum, then the first in combination order).
    The trainer keeps each prompt's last `max_buffer_size` samples and adds `off_policy_loss_coef` x L_off over
    the replayed samples to the loss (the entry itself ignores these two)."""
    if strategy not in REPO_REPLAY_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: {', '.join(REPO_REPLAY_STRATEGIES)}")
    rewards = torch.as_tensor(buffer_rewards).float()
    if rewards.dim() != 2:
        raise ValueError(f"buffer_rewards must have shape (prompts, slots), got {tuple(rewards.shape)}")
    if strategy == "random_k" and draws is None:
        raise ValueError("strategy 'random_k' needs `draws` (prompts, slots), U[0, 1) draws")
    filled = ~torch.isnan(rewards)
    if bool((filled[:, 1:] & ~filled[:, :-1]).any()):
        raise ValueError("buffer_rewards: each prompt's samples must fill its first slots (NaN after them only)")
    chosen = torch.zeros_like(filled)
    for p in range(rewards.size(0)):
        size = int(filled[p].sum())
        if size < min_buffer_size or size == 0:
            continue
        k = size if strategy == "all" else min(size, num_replays)
        scores = rewards[p, :size]
        if strategy == "all":
            index = torch.arange(size)
        elif strategy == "highest_k":
            index = torch.argsort(-scores, stable=True)[:k]
        elif strategy == "recent_k":
            index = torch.arange(size - k, size)
        elif strategy == "random_k":
            index = torch.argsort(torch.as_tensor(draws)[p, :size].float(), stable=True)[:k]
        else:
            index = _max_variance_subset(scores, k)
        chosen[p, index.to(chosen.device)] = True
    return chosen
