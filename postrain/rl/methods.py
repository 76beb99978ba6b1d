"""Named methods: `method: dapo` in a GRPO recipe expands to the paper's combination of registered parts.

Each entry is a function whose keyword-only arguments are the method's own knobs (paper defaults) and which
returns the `rl:` section it stands for (postrain.rl.section). The expansion is a recipe layer just below the
recipe's own `rl:` keys, so a recipe overrides it part by part:

    method: dapo
    rl: {shaping: [{name: dapo_overlong, overlong_buffer_len: 64}]}   # replaces the shaping list only

A part the recipe names differently replaces the method's part whole; the same name merges parameter by
parameter. `postrain config` prints the expansion. `method: {name: dapo, epsilon_high: 0.3}` passes the
method's own arguments.

Only the RL parts are set: no method here forces TRL trainer fields (group size, learning rate, lengths), which
stay the recipe's choice. Where a part has a `max_completion_length` parameter the trainer fills in
trainer.max_completion_length. Paper and arXiv id are those of the registered part the method is named after.
"""

from __future__ import annotations

from typing import Any

from postrain.errors import RecipeError
from postrain.registry import Registry
from postrain.rl.registry import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES, REGULARIZERS, SAMPLERS, SHAPING
from postrain.rl.section import SINGLE_PARTS, normalize_part, normalize_section, parse_rl_section


def _expansion_reads(variant, data_name: str) -> bool | None:
    """Whether a method's parts, at the method's defaults, read `data_name` (None for a method with an argument
    without default: its parts are not known until the recipe sets it)."""
    if any(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in variant.signature.parameters.values()):
        return None
    return parse_rl_section(variant.fn()).reads(data_name)


def _expansion_requirements(variant, params: dict | None) -> list:
    """The requirements of a method's parts at the method's arguments `params` (its defaults where None); none for a
    method with an argument it has no default for and `params` does not give (its parts depend on it)."""
    kwargs = {k: v for k, v in (params or {}).items() if k in variant.params}
    if any(p.kind is p.KEYWORD_ONLY and p.default is p.empty and p.name not in kwargs
           for p in variant.signature.parameters.values()):
        return []
    return [found for _, part in parse_rl_section(variant.fn(**kwargs)).all()
            for found in part.variant.requirements(part.params)]


# A method passes these to its parts (postrain.rl.registry's ranges): refused here too, naming `method:`.
METHODS = Registry("method", what="named method", reads=_expansion_reads, requirements=_expansion_requirements,
                   ranges={"epsilon": "> 0", "epsilon_high": "> 0", "beta": ">= 0", "kl_beta": ">= 0",
                           "entropy_coef": ">= 0"})


def _paper(registry: Registry, name: str) -> dict[str, str]:
    """The paper metadata of a registered part, so a method and its defining part cannot disagree."""
    v = registry.entries[name]
    return {"paper": v.paper, "arxiv": v.arxiv, **({"catalog": v.extra["catalog"]} if "catalog" in v.extra else {})}


def _rl(advantage: str | dict, policy_loss: str | dict, aggregation: str | dict, *, regularizers=(), shaping=(),
        samplers=()):
    out: dict[str, Any] = {"advantage": advantage, "policy_loss": policy_loss, "aggregation": aggregation}
    if regularizers:
        out["regularizers"] = list(regularizers)
    if shaping:
        out["shaping"] = list(shaping)
    if samplers:
        out["samplers"] = list(samplers)
    return normalize_section(out)


def _kl(beta: float, estimator: str = "kl_k3") -> list[dict]:
    return [{"name": estimator, "beta": beta}] if beta else []


# --- the GRPO baseline and its aggregation / clipping variants --------------------------------------------------

@METHODS.register("grpo", **_paper(ADVANTAGES, "grpo"),
                  notes="DeepSeekMath: group z-score, token PPO clip 0.2, per-sequence token mean, k3 KL beta 0.04")
def grpo(*, epsilon: float = 0.2, beta: float = 0.04):
    """GRPO as in DeepSeekMath: z-score advantage, PPO clip, sequence-mean aggregation, k3 KL (beta=0 drops it;
    a KL needs the reference model's log-probs)."""
    return _rl("grpo", {"name": "ppo_clip", "epsilon": epsilon}, "seq_mean_token_mean", regularizers=_kl(beta))


@METHODS.register("dr_grpo", **_paper(ADVANTAGES, "dr_grpo"))
def dr_grpo(*, epsilon: float = 0.2):
    """Dr. GRPO: r - mean (no std), token sum over the constant max_completion_length, no KL."""
    return _rl("dr_grpo", {"name": "ppo_clip", "epsilon": epsilon}, "seq_mean_token_sum_norm")


@METHODS.register("dapo", **_paper(AGGREGATIONS, "token_mean"),
                  notes="dynamic sampling refills the batch for at most max_num_gen_batches generation rounds "
                        "(verl's DAPO scripts: 10), then trains on the kept groups there are (verl raises instead)")
def dapo(*, epsilon: float = 0.2, epsilon_high: float = 0.28, overlong_buffer_len: int = 4096,
         max_num_gen_batches: int = 10):
    """DAPO: clip-higher (0.2, 0.28), token-level mean, soft overlong punishment over the last
    `overlong_buffer_len` tokens before max_completion_length (the paper's 4096 of 20480), and dynamic sampling
    (groups whose rewards are all equal are dropped and the batch refilled)."""
    return _rl("grpo", {"name": "ppo_clip", "epsilon": epsilon, "epsilon_high": epsilon_high}, "token_mean",
               shaping=[{"name": "dapo_overlong", "overlong_buffer_len": overlong_buffer_len}],
               samplers=[{"name": "dynamic_sampling", "max_num_gen_batches": max_num_gen_batches}])


@METHODS.register("lite_ppo", **_paper(ADVANTAGES, "lite_ppo"))
def lite_ppo(*, epsilon: float = 0.2):
    """Lite PPO: group-mean baseline with batch-level std, token-level mean, no KL."""
    return _rl("lite_ppo", {"name": "ppo_clip", "epsilon": epsilon}, "token_mean")


@METHODS.register("gspo", **_paper(POLICY_LOSSES, "gspo"))
def gspo(*, epsilon: float = 3e-4, epsilon_high: float = 4e-4):
    """GSPO: sequence-level (length-normalised) ratio and clip, mean over sequences."""
    return _rl("grpo", {"name": "gspo", "epsilon": epsilon, "epsilon_high": epsilon_high}, "seq_mean_token_mean")


@METHODS.register("gspo_token", **_paper(POLICY_LOSSES, "gspo_token"))
def gspo_token(*, epsilon: float = 3e-4, epsilon_high: float = 4e-4):
    """GSPO-token: the sequence ratio's value with per-token gradients."""
    return _rl("grpo", {"name": "gspo_token", "epsilon": epsilon, "epsilon_high": epsilon_high},
               "seq_mean_token_mean")


@METHODS.register("gmpo", **_paper(POLICY_LOSSES, "gmpo"))
def gmpo(*, epsilon: float = 0.4):
    """GMPO: geometric mean of sign-aware log-space clipped token ratios (e^±0.4), mean over sequences."""
    return _rl("grpo", {"name": "gmpo", "epsilon": epsilon}, "seq_mean_token_mean")


@METHODS.register("cispo", **_paper(POLICY_LOSSES, "cispo"))
def cispo(*, epsilon_high: float = 5.0):
    """CISPO: REINFORCE with a clipped stop-gradient IS weight, token-level mean."""
    return _rl("grpo", {"name": "cispo", "epsilon_high": epsilon_high}, "token_mean")


@METHODS.register("ce_gppo", **_paper(POLICY_LOSSES, "ce_gppo"))
def ce_gppo(*, beta1: float = 0.5, beta2: float = 1.0):
    """CE-GPPO: clipped tokens keep a bounded gradient (beta1 low side, beta2 high side), token-level mean."""
    return _rl("grpo", {"name": "ce_gppo", "beta1": beta1, "beta2": beta2}, "token_mean")


@METHODS.register("dual_clip", **_paper(POLICY_LOSSES, "dual_clip"))
def dual_clip(*, dual_clip_c: float = 3.0):
    """Dual-clip PPO on GRPO advantages: negative-advantage tokens' loss capped at -c A."""
    return _rl("grpo", {"name": "dual_clip", "dual_clip_c": dual_clip_c}, "token_mean")


@METHODS.register("simple_po", **_paper(POLICY_LOSSES, "simple_po"))
def simple_po(*, epsilon: float = 0.2):
    """Simple Policy Optimization: the clip replaced by a quadratic penalty, on GRPO advantages."""
    return _rl("grpo", {"name": "simple_po", "epsilon": epsilon}, "seq_mean_token_mean")


@METHODS.register("delta_l", **_paper(AGGREGATIONS, "delta_l"))
def delta_l(*, alpha: float = 1.0):
    """ΔL normalisation: per-sequence weights L^-alpha / sum L^-alpha over a constant length (alpha=0.75 in the
    authors' math recipes)."""
    return _rl("grpo", "ppo_clip", {"name": "delta_l", "alpha": alpha})


@METHODS.register("gvpo", **_paper(POLICY_LOSSES, "gvpo"),
                  notes="the advantage is only logged: the GVPO loss reads the group-centred rewards itself")
def gvpo(*, beta: float = 0.1):
    """GVPO: regression of centred implicit rewards onto centred rewards (needs whole groups per micro-batch)."""
    return _rl("dr_grpo", {"name": "gvpo", "beta": beta}, "seq_mean_token_mean")


@METHODS.register("disco", **_paper(POLICY_LOSSES, "disco"),
                  notes="binary 0/1 rewards; the advantage is only logged")
def disco(*, score: str = "logL", tau: float = 10.0, beta: float = 1e3, delta: float = 1e-4):
    """DisCO: discriminative objective with a squared-hinge KL constraint (needs whole groups per micro-batch)."""
    return _rl("grpo", {"name": "disco", "score": score, "tau": tau, "beta": beta, "delta": delta},
               "seq_mean_token_mean")


@METHODS.register("nft", **_paper(POLICY_LOSSES, "nft"),
                  notes="NVlabs/NFT train_7B.sh / train_32B.sh: neg_weight 1.0, clamp_negative 1.0, normalize 1, "
                        "filter_groups (dynamic sampling, max_num_gen_batches 10); the dr_grpo advantage carries "
                        "each row's group accuracy r_q = r - A to the loss (binary 0/1 rewards)")
def nft(*, negative_weight: float = 1.0, prompt_weight: str = "dr_grpo", negative_clamp: float = 1.0,
        max_num_gen_batches: int = 10):
    """NFT: supervised loss on positives (-log R) and, through the implicit negative policy, on negatives
    (-log((1 - r_q R) / (1 - r_q))), prompt weight 1 - r_q; constant-normalised token sum; dynamic sampling."""
    return _rl("dr_grpo", {"name": "nft", "negative_weight": negative_weight, "prompt_weight": prompt_weight,
                           "negative_clamp": negative_clamp}, "seq_mean_token_sum_norm",
               samplers=[{"name": "dynamic_sampling", "max_num_gen_batches": max_num_gen_batches}])


# --- advantage estimators -----------------------------------------------------------------------------------------

@METHODS.register("rloo", **_paper(ADVANTAGES, "rloo"))
def rloo():
    """RLOO: leave-one-out baseline, REINFORCE on the whole completion (sequence log-likelihood)."""
    return _rl("rloo", "gpg_pg", "seq_mean_token_sum")


@METHODS.register("reinforce_pp", **_paper(ADVANTAGES, "reinforce_pp"))
def reinforce_pp(*, beta: float = 0.01, epsilon: float = 0.2):
    """REINFORCE++: per-token returns with the k1 KL in the reward, globally whitened; PPO clip, token mean
    (beta != 0 needs the reference model's log-probs)."""
    return _rl({"name": "reinforce_pp", "beta": beta}, {"name": "ppo_clip", "epsilon": epsilon}, "token_mean")


@METHODS.register("reinforce_pp_baseline", **_paper(ADVANTAGES, "reinforce_pp_baseline"))
def reinforce_pp_baseline(*, kl_beta: float = 0.0, epsilon: float = 0.2):
    """REINFORCE++-baseline: group-mean baseline then global token whitening; the authors' KL is a k2 loss term
    (kl_beta, off by default: the sources give no coefficient)."""
    return _rl("reinforce_pp_baseline", {"name": "ppo_clip", "epsilon": epsilon}, "token_mean",
               regularizers=_kl(kl_beta, "kl_k2"))


@METHODS.register("opo", **_paper(ADVANTAGES, "opo"))
def opo():
    """OPO: length-weighted optimal group baseline, strictly on-policy PPO loss, token mean."""
    return _rl("opo", "ppo_clip", "token_mean")


@METHODS.register("bnpo", **_paper(ADVANTAGES, "bnpo_beta"))
def bnpo(*, r_min: float = 0.0, r_max: float = 1.0):
    """BNPO: advantage normalised by a Beta density fitted to the batch's success rates (not TRL's
    loss_type='bnpo')."""
    return _rl({"name": "bnpo_beta", "r_min": r_min, "r_max": r_max}, "ppo_clip", "token_mean")


@METHODS.register("gpg", **_paper(ADVANTAGES, "gpg"))
def gpg(*, scale_rewards: bool = False):
    """GPG: plain policy gradient -A log pi with the B/(B-M) invalid-group correction, token mean, no KL."""
    return _rl({"name": "gpg", "scale_rewards": scale_rewards}, "gpg_pg", "token_mean")


@METHODS.register("ngrpo", **_paper(ADVANTAGES, "ngrpo"))
def ngrpo(*, epsilon: float = 0.16, epsilon_high: float = 0.24):
    """NGRPO: a virtual max-reward sample in the group statistics, asymmetric clip (0.16, 0.24)."""
    return _rl("ngrpo", {"name": "ppo_clip", "epsilon": epsilon, "epsilon_high": epsilon_high}, "token_mean")


@METHODS.register("mapo", **_paper(ADVANTAGES, "mapo"))
def mapo():
    """MAPO: mixes the z-score and the percent deviation by the group's certainty 4p(1-p)."""
    return _rl("mapo", "ppo_clip", "token_mean")


@METHODS.register("confucius3", **_paper(ADVANTAGES, "pshw"),
                  notes="Recent Sample Recovery refills for at most max_num_gen_batches generation rounds (the paper "
                        "gives no limit; 10 as verl's DAPO scripts), then trains on the valid groups there are")
def confucius3(*, entropy_target: float = 0.55, entropy_coef: float = 0.001, max_num_gen_batches: int = 10):
    """Confucius3-Math: policy-specific hardness weighting, a two-sided entropy target (rewards +-1), and Recent
    Sample Recovery (dynamic sampling whose surplus valid groups train at the next step)."""
    return _rl("pshw", "ppo_clip", "token_mean", regularizers=[
        {"name": "target_entropy", "entropy_target": entropy_target, "entropy_coef": entropy_coef}],
        samplers=[{"name": "recent_sample_recovery", "max_num_gen_batches": max_num_gen_batches}])


@METHODS.register("grpo_lead", **_paper(ADVANTAGES, "grpo_lead"))
def grpo_lead(*, length_alpha: float = 0.05):
    """GRPO-LEAD: length-penalised correct rewards and difficulty-aware advantage weights."""
    return _rl("grpo_lead", "ppo_clip", "token_mean",
               shaping=[{"name": "grpo_lead_length", "alpha": length_alpha}])


@METHODS.register("edge_grpo", **_paper(ADVANTAGES, "edge_grpo"))
def edge_grpo():
    """EDGE-GRPO: advantages scaled by the batch's mean entropy over each completion's mean entropy."""
    return _rl("edge_grpo", "ppo_clip", "seq_mean_token_mean")


@METHODS.register("reinforce_rej", **_paper(ADVANTAGES, "reinforce_rej"),
                  notes="the rejected groups leave the batch and its token count, as the paper describes; the "
                        "authors' verl code zeroes their advantage and keeps them in the token mean")
def reinforce_rej(*, kl_beta: float = 0.001):
    """Reinforce-Rej: all-correct and all-wrong groups are dropped from the batch (no refill), raw reward as
    advantage; PPO clip; the authors' k3 KL 0.001 (kl_beta=0 drops it)."""
    return _rl("reinforce_rej", "ppo_clip", "token_mean", regularizers=_kl(kl_beta), samplers=["reinforce_rej"])


@METHODS.register("raft_pp", **_paper(ADVANTAGES, "raft_pp"),
                  notes="the rejected samples leave the batch and its token count, as the paper describes; the "
                        "authors' verl code realises the selection as the advantage max(r, 0), keeping them in the "
                        "token mean")
def raft_pp():
    """RAFT++: train on the positive samples only (the others are dropped from the batch and its token count;
    advantage max(r, 0)) with the PPO clip."""
    return _rl("raft_pp", "ppo_clip", "token_mean", samplers=["raft_pp"])


@METHODS.register("unlikeliness", **_paper(SHAPING, "unlikeliness"))
def unlikeliness(*, beta_rank: float = 0.25):
    """Unlikeliness reward: correct but likely completions lose part of their reward, then GRPO."""
    return _rl("grpo", "ppo_clip", "token_mean", shaping=[{"name": "unlikeliness", "beta_rank": beta_rank}])


@METHODS.register("redit", **_paper(SHAPING, "redit"))
def redit(*, sigma: float):
    """ReDit: zero-mean Gaussian reward dithering of standard deviation `sigma` (no default: set it)."""
    return _rl("grpo", "ppo_clip", "token_mean", shaping=[{"name": "redit", "sigma": sigma}])


@METHODS.register("repo_replay", **_paper(SAMPLERS, "repo_replay"),
                  notes="scripts/train_replay_grpo.slurm: highest_k, 8 replays once a prompt's buffer holds 16 "
                        "(max 16), split normalisation, c = 1.0, loss_type grpo, clip 0.2/0.2, beta 0; each loss "
                        "term is normalised over its own samples (the paper's objective), see "
                        "postrain.trainers.grpo_replay")
def repo_replay(*, strategy: str = "highest_k", num_replays: int = 8, min_buffer_size: int = 16,
                max_buffer_size: int = 16, off_policy_loss_coef: float = 1.0, epsilon: float = 0.2):
    """RePO: GRPO (z-score, PPO clip, sequence mean, no KL) plus an off-policy term over each prompt's samples
    replayed from a per-prompt buffer, their advantages normalised among themselves ("split")."""
    return _rl("grpo", {"name": "ppo_clip", "epsilon": epsilon}, "seq_mean_token_mean", samplers=[{
        "name": "repo_replay", "strategy": strategy, "num_replays": num_replays, "min_buffer_size": min_buffer_size,
        "max_buffer_size": max_buffer_size, "off_policy_loss_coef": off_policy_loss_coef}])


@METHODS.register("entropy_bonus_ppo", **_paper(REGULARIZERS, "entropy_bonus"))
def entropy_bonus_ppo(*, entropy_coef: float = 0.01):
    """GRPO with PPO's entropy bonus (c2 = 0.01) added per token."""
    return _rl("grpo", "ppo_clip", "token_mean",
               regularizers=[{"name": "entropy_bonus", "entropy_coef": entropy_coef}])


@METHODS.register("high_entropy_minority", **_paper(REGULARIZERS, "high_entropy_tokens"))
def high_entropy_minority(*, top_entropy_quantile: float = 0.2):
    """Beyond the 80/20 rule: the policy gradient only on the top 20% highest-entropy tokens (DAPO's loss)."""
    return _rl("grpo", {"name": "ppo_clip", "epsilon_high": 0.28}, "token_mean",
               regularizers=[{"name": "high_entropy_tokens", "top_entropy_quantile": top_entropy_quantile}])


# --- expansion at recipe load time --------------------------------------------------------------------------------

def method_call(value: Any, where: str = "method") -> tuple[str, dict[str, Any]]:
    """`dapo` or `{name: dapo, <arguments>}` -> (name, arguments)."""
    spec = normalize_part(value, where)
    return spec.pop("name"), spec


def expand_method(value: Any, where: str = "method") -> tuple[str, dict[str, Any]]:
    """The `rl:` section a `method:` value stands for (RecipeError for an unknown method or argument)."""
    name, kwargs = method_call(value, where)
    variant = METHODS.check_params(name, kwargs, where=where)
    missing = [k for k, p in variant.signature.parameters.items()
               if p.kind is p.KEYWORD_ONLY and p.default is p.empty and k not in kwargs]
    if missing:
        raise RecipeError(f"named method {name!r} ({where}) has no default for {', '.join(missing)}: write "
                          f"method: {{name: {name}, {missing[0]}: ...}}")
    return name, variant.fn(**kwargs)


def merge_rl(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` (the recipe's rl: keys) over `base` (a method's expansion), part by part: a part of the same name
    (or of no name) merges parameter by parameter, a part of another name replaces it whole, and a list replaces
    the list."""
    base, out = normalize_section(base), dict(base)
    for key, value in top.items():
        # a part without a name (`rl.policy_loss.epsilon_high=0.3`) adjusts the method's part of that key
        if key in SINGLE_PARTS and isinstance(value, dict) and isinstance(base.get(key), dict) \
                and value.get("name", base[key]["name"]) == base[key]["name"]:
            out[key] = {**base[key], **value}
        else:
            out[key] = value
    return normalize_section(out)


def apply_method(cfg: dict[str, Any], origins: dict[str, str], leaf_origins) -> None:
    """In place: a GRPO recipe's `rl:` section with every part in `{name: ...}` form and, where the recipe names a
    `method:`, the method's expansion below the recipe's own `rl:` keys; origins of the expanded keys name the
    method. `leaf_origins(data, origin)` maps a mapping's keys to an origin (the loader's helper)."""
    section = cfg.get("rl")
    if section is not None and not isinstance(section, dict):
        return  # the schema check reports the wrong type
    method = cfg.get("method")
    if method is None:
        if section is not None:
            cfg["rl"] = normalize_section(section)
        return
    where = f"method, from {origins.get('method', 'built-in defaults')}"
    name, expansion = expand_method(method, where)
    source = f"method {name}"
    for key, origin in leaf_origins({"rl": expansion}, source).items():
        if key != "rl":
            origins.setdefault(key, origin)
    if section is None:
        origins["rl"] = source
    cfg["rl"] = merge_rl(expansion, section or {})
