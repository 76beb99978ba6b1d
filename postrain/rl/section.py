"""The `rl:` section of a GRPO recipe: which registered parts the GRPO trainer composes, parsed and checked.

    rl:
      advantage: {name: grpo}                         # or just `advantage: grpo`
      policy_loss: {name: ppo_clip, epsilon: 0.2, epsilon_high: 0.28}
      aggregation: {name: token_mean}
      regularizers: [{name: kl_k3, beta: 0.04}]
      shaping: [{name: dapo_overlong, overlong_buffer_len: 64}]
      samplers: [{name: dynamic_sampling, max_num_gen_batches: 10}]

Each part is `name` plus that registry entry's hyperparameters. A part left out takes TRL's own default
(`advantage: grpo` = scale_rewards "group", `policy_loss: ppo_clip` + `aggregation: token_mean` = loss_type "dapo"),
so `rl: {}` trains exactly as TRL's defaults do. Without an `rl:` section the trainer is TRL's, untouched.

`parse_rl_section` is the one parser; a loaded recipe's section is parsed once, by its check, and kept for it
(postrain.recipes.sections.rl_parts): liveness, the dry-run plan, the run and the trainer read that parse.
`check_rl_section` is the load-time check (postrain.jobs.grpo.check): unknown names and parameters,
parts whose data a GRPO batch cannot supply, samplers the trainer cannot apply or combine, TRL options that
the `rl:` path would silently ignore, and the mode and bounds of TRL's vLLM importance-sampling correction, which
the `rl:` path applies as TRL does (postrain.trainers.grpo).

Samplers act at one of these stages of a training step (each entry's `stage=` metadata, `Part.stage`; at most one
sampler per stage; eval batches are never filtered):
  group     before the advantage: a group keep mask from the raw rewards; dropped groups get weight 0 and the
            advantage is computed on the kept groups only. `refill=True` entries generate more groups (from a second,
            seeded pass over the training set) until the generation batch holds enough kept groups or
            `max_num_gen_batches` rounds were generated, then train on what there is (padding the batch with
            dropped groups of weight 0); a `recovers=True` entry (recent_sample_recovery) also carries the kept
            groups beyond the batch to the next step.
  subset    before the advantage: k completions of every group (GFPO); the advantage sees groups of k.
  row       after the advantage: a row keep mask (RAFT++ positives, CPPO pruning by |advantage|).
  reweight  after the advantage: PF-PPO's resampling with replacement, as row multiplicities.
  replay    RePO (`repo_replay`): no row of the batch changes; each prompt's past samples are kept in a buffer
            and up to num_replays of them add an off-policy loss term (postrain.trainers.grpo_replay).
  prompt    before the rollout: GRESO (`greso`) skips prompts (postrain.trainers.grpo_greso).
Samplers read the raw rewards (the weighted sum of the reward functions, before `shaping:`), as verl's DAPO filter
reads accuracy; the advantage reads the shaped ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from postrain.errors import RecipeError, did_you_mean, origin_of
from postrain.registry import FAMILIES, Registry, Variant
from postrain.rl.registry import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES, REGULARIZERS, SAMPLERS, SHAPING

SINGLE_PARTS: dict[str, Registry] = {"advantage": ADVANTAGES, "policy_loss": POLICY_LOSSES, "aggregation": AGGREGATIONS}
LIST_PARTS: dict[str, Registry] = {"regularizers": REGULARIZERS, "shaping": SHAPING, "samplers": SAMPLERS}
# TRL 1.16's defaults: scale_rewards="group" (grpo z-score) and loss_type="dapo" (token-level clip, token mean).
DEFAULT_PARTS = {"advantage": "grpo", "policy_loss": "ppo_clip", "aggregation": "token_mean"}

# The data inputs the GRPO trainer hands each family (postrain.trainers.grpo); an entry reading anything else
# cannot run there. Rewards, masks and log-probs of the whole gathered batch for advantages and shaping.
PROVIDED: dict[str, frozenset[str]] = {
    "advantage": frozenset({"rewards", "group_size", "mask", "entropies", "mean_entropy", "old_logps", "ref_logps"}),
    "policy_loss": frozenset({"logps", "old_logps", "advantages", "mask", "ref_logps", "rewards", "group_size",
                              "entropies", "completion_ids",  # GTPO: the token ids
                              "vocab_logps"}),  # TW-GRPO: log-probs over the vocabulary (an unfused forward)
    "aggregation": frozenset({"per_token_loss", "mask", "global_tokens", "num_sequences", "length_weight_sum"}),
    "regularizer": frozenset({"logps", "ref_logps", "mask", "entropies", "mean_entropy", "all_entropies"}),
    "shaping": frozenset({"rewards", "group_size", "mask", "old_logps", "noise", "ensemble_rewards",
                          "step", "total_steps"}),  # step: the optimizer step the batch was generated at
    "sampler": frozenset({"rewards", "group_size", "mask", "advantages",  # RSR: its buffer leads `rewards`
                          "buffer_rewards", "draws",  # repo_replay: per-prompt buffer rewards, U[0, 1) draws
                          "easy_streak", "hard_streak", "uniform"}),  # greso: per-prompt streaks, U[0, 1) draws
}
# Advantage estimators and reward shaping that read and return a per-prompt history (`state`) declare
# `prompt_state=(width of one prompt's row, first-visit value)` on their entry (Part.prompt_state); the trainer keeps
# it per prompt (postrain.trainers.grpo_state.PromptState), saved with checkpoints.
STATEFUL_FAMILIES = (ADVANTAGES, SHAPING)
# Why a data input is not available in a GRPO batch (for the error message; `state`: see missing_data_reason).
MISSING_DATA = {
    "ref_rewards": "rewards of completions sampled from the reference model, which the GRPO trainer does not "
                   "generate",
    "divergence": "a per-prompt policy divergence since the prompt's previous visit, which the GRPO trainer does "
                  "not track",
    "embeddings": "sentence embeddings of the completions, and no embedding model is configured",
    "preferences": "pairwise preference judgments between completions, and no judge is configured",
}


def missing_data_reason(data_name: str) -> str:
    """Why a GRPO batch does not provide `data_name`, for the error message."""
    if data_name == "state":  # read from the entries when asked, so every family has registered by then
        stateful = sorted(v.name for registry in STATEFUL_FAMILIES for v in registry if v.extra.get("prompt_state"))
        return f"a per-prompt history carried across steps, which the GRPO trainer keeps only for {', '.join(stateful)}"
    return MISSING_DATA.get(data_name, "which a GRPO batch does not provide")


# Entries that cannot run in TRL's trainer (or would silently degrade there) say why on the entry: `unsupported=`.
# Sampler parameters the trainer sets itself (a recipe must not): name -> what the trainer passes.
TRAINER_FILLED = {"batch_groups": "the generation batch in groups (generation_batch_size / num_generations)"}

# TRL options the `rl:` path replaces or does not reproduce: key -> (is it in effect?, what to use instead).
# A key counts only where the recipe sets it (TRL's defaults are what the rl: defaults reproduce).
TRL_CONFLICTS: dict[str, tuple[Any, str]] = {
    "loss_type": (lambda v, t: True, "rl.policy_loss and rl.aggregation (ppo_clip + token_mean = dapo, "
                                     "+ seq_mean_token_mean = grpo)"),
    "scale_rewards": (lambda v, t: True, "rl.advantage (grpo = group, lite_ppo = batch, dr_grpo = none)"),
    "importance_sampling_level": (lambda v, t: True, "rl.policy_loss: gspo (sequence level)"),
    "epsilon": (lambda v, t: True, "rl.policy_loss.epsilon"),
    "epsilon_high": (lambda v, t: True, "rl.policy_loss.epsilon_high"),
    "delta": (lambda v, t: v is not None, "rl.policy_loss: dual_clip (TRL's delta is not reproduced)"),
    "multi_objective_aggregation": (lambda v, t: v != "sum_then_normalize",
                                    "rewards[i].weight (postrain sums the weighted rewards, TRL's "
                                    "sum_then_normalize)"),
    "beta": (lambda v, t: v not in (None, 0, 0.0), "rl.regularizers: [{name: kl_k3, beta: ...}]"),
    "use_bias_correction_kl": (lambda v, t: bool(v) and t.get("beta") not in (None, 0, 0.0),
                               "nothing: postrain's KL regularizers are not multiplied by the ratio"),
    "entropy_coef": (lambda v, t: v not in (None, 0, 0.0), "rl.regularizers: [{name: entropy_bonus, "
                                                         "entropy_coef: ...}]"),
    "use_adaptive_entropy": (lambda v, t: bool(v), "rl.regularizers: target_entropy (TRL's adaptive controller "
                                                   "is not reproduced)"),
    "top_entropy_quantile": (lambda v, t: v is not None and v < 1.0,
                             "rl.regularizers: [{name: high_entropy_tokens, top_entropy_quantile: ...}]"),
    "off_policy_mask_threshold": (lambda v, t: v is not None, "nothing: off-policy sequence masking is not "
                                                              "reproduced by the rl: path"),
    "use_liger_kernel": (lambda v, t: bool(v), "use_liger_kernel: false (Liger's fused GRPO loss bypasses the "
                                               "rl: policy loss)"),
}
# TRL 1.16's vLLM importance-sampling modes: the ratio pi_old / pi_vllm per token or per sequence, and outside
# [clip_min, clip_max] clamped (truncate) or zeroed (mask). TRL raises on any other only at the first generation
# (`_generate_and_score_completions`, pinned by hash in tests/test_grpo_trainer.py).
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
VLLM_IS_KEYS = ("vllm_importance_sampling_mode", "vllm_importance_sampling_clip_min",
                "vllm_importance_sampling_clip_max")


@dataclass(frozen=True)
class Part:
    """One registered entry with the recipe's hyperparameters, and where it sits in the recipe (for errors)."""

    name: str
    params: dict[str, Any]
    where: str
    variant: Variant

    @property
    def stage(self) -> str | None:
        """A sampler's stage in a training step (its entry's `stage=`; see the module docstring)."""
        return self.variant.extra.get("stage")

    @property
    def refills(self) -> bool:
        """Whether a group sampler has the trainer generate more groups while too few are kept (`refill=True`)."""
        return bool(self.variant.extra.get("refill"))

    @property
    def recovers(self) -> bool:
        """Whether a refilling sampler returns the groups for the batch and for a buffer carried to the next step
        (`recovers=True`: recent_sample_recovery)."""
        return bool(self.variant.extra.get("recovers"))

    @property
    def prompt_state(self) -> tuple[int, float] | None:
        """(width of one prompt's row, first-visit value) of the per-prompt history the entry reads and returns
        (its `prompt_state=`), or None for an entry without one."""
        return self.variant.extra.get("prompt_state")

    def value(self, key: str) -> Any:
        """A hyperparameter as the recipe sets it, else the entry's default."""
        return self.params.get(key, self.variant.params.get(key))


@dataclass
class RLParts:
    advantage: Part
    policy_loss: Part
    aggregation: Part
    regularizers: list[Part] = field(default_factory=list)
    shaping: list[Part] = field(default_factory=list)
    samplers: list[Part] = field(default_factory=list)

    def all(self) -> list[tuple[str, Part]]:
        singles = [("advantage", self.advantage), ("policy_loss", self.policy_loss), ("aggregation", self.aggregation)]
        return singles + [("regularizer", p) for p in self.regularizers] + [("shaping", p) for p in self.shaping] \
            + [("sampler", p) for p in self.samplers]

    def reads(self, data_name: str) -> bool:
        """Whether any part reads `data_name`; an entry reading it only where a hyperparameter is not 0 (its
        `reads_if_nonzero=`, reinforce_pp's log-probs at beta 0) counts by that hyperparameter's value."""
        for _, part in self.all():
            switch = part.variant.extra.get("reads_if_nonzero", {}).get(data_name)
            if switch is not None:
                if part.value(switch) != 0:
                    return True
                continue
            if part.variant.needs(data_name):
                return True
        return False

    def sampler_at(self, stage: str) -> Part | None:
        """The sampler acting at `stage` (at most one: the load-time check refuses two)."""
        return next((p for p in self.samplers if p.stage == stage), None)


def normalize_part(value: Any, where: str) -> dict[str, Any]:
    """`name` or `{name: ..., <params>}` -> a fresh `{name: ..., <params>}` mapping."""
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return dict(value)
    raise RecipeError(f"'{where}' must be an entry name or a mapping with `name:` and that entry's parameters, "
                      f"e.g. {{name: ppo_clip, epsilon: 0.2}}; got {value!r}")


def normalize_section(section: dict[str, Any]) -> dict[str, Any]:
    """Every part of an `rl:` mapping in its `{name: ...}` form (lists stay lists)."""
    out = dict(section)
    for key in SINGLE_PARTS:
        if out.get(key) is not None:
            out[key] = normalize_part(out[key], f"rl.{key}")
    for key in LIST_PARTS:
        if out.get(key) is not None:
            if not isinstance(out[key], list):
                raise RecipeError(f"'rl.{key}' must be a list of parts, e.g. [{{name: ...}}]; got {out[key]!r}")
            out[key] = [normalize_part(v, f"rl.{key}[{i}]") for i, v in enumerate(out[key])]
    return out


def _part(registry: Registry, value: Any, path: str, origins: dict[str, str]) -> Part:
    spec = normalize_part(value, path)
    name = spec.pop("name")
    where = f"{path}, from {origin_of(origins, path)}"
    variant = registry.check_params(name, spec, where=where)
    filled = [k for k in TRAINER_FILLED if k in spec and registry is SAMPLERS]
    if filled:
        raise RecipeError(f"{path}.{filled[0]} ({where}) is set by the GRPO trainer to {TRAINER_FILLED[filled[0]]}: "
                          f"remove it")
    missing = [k for k, p in variant.signature.parameters.items()
               if p.kind is p.KEYWORD_ONLY and p.default is p.empty and k not in spec
               and not (registry is SAMPLERS and k in TRAINER_FILLED)]
    if missing:
        raise RecipeError(f"{registry.what} {name!r} ({where}) has no default for {', '.join(missing)}: "
                          f"set {', '.join(f'{path}.{k}' for k in missing)}")
    return Part(name, spec, where, variant)


def parse_rl_section(section: dict[str, Any] | None, origins: dict[str, str] | None = None) -> RLParts:
    """The parts an `rl:` mapping names (TRL's defaults for those left out); RecipeError for unknown names or
    parameters."""
    section = dict(section or {})
    origins = origins or {}
    unknown = set(section) - set(SINGLE_PARTS) - set(LIST_PARTS)
    if unknown:
        raise RecipeError(f"unknown key 'rl.{sorted(unknown)[0]}': valid keys: "
                          f"{', '.join([*SINGLE_PARTS, *LIST_PARTS])}")
    singles = {key: _part(reg, section.get(key) or DEFAULT_PARTS[key], f"rl.{key}", origins)
               for key, reg in SINGLE_PARTS.items()}
    lists = {}
    for key, reg in LIST_PARTS.items():
        values = section.get(key) or []
        if not isinstance(values, list):
            raise RecipeError(f"'rl.{key}' must be a list of parts, e.g. [{{name: ...}}]; got {values!r}")
        lists[key] = [_part(reg, v, f"rl.{key}[{i}]", origins) for i, v in enumerate(values)]
    return RLParts(**singles, **lists)


def _what(part: Part) -> str:
    return FAMILIES[part.variant.family].what


def steps_per_generation(trainer: dict[str, Any], world_size: int = 1) -> int:
    """TRL's default: steps_per_generation = gradient_accumulation_steps unless generation_batch_size sets it (then
    generation_batch_size / (per_device_train_batch_size x processes), as TRL 1.16's GRPOConfig derives it)."""
    if trainer.get("steps_per_generation"):
        return int(trainer["steps_per_generation"])
    if trainer.get("generation_batch_size"):
        per_device = int(trainer.get("per_device_train_batch_size") or 8)
        return max(1, int(trainer["generation_batch_size"]) // (per_device * max(int(world_size), 1)))
    return int(trainer.get("gradient_accumulation_steps") or 1)


def _check_conventions(parts: RLParts) -> None:
    """Hyperparameter values that are almost certainly a convention mix-up (each entry's `conventions`), and
    per-token advantages into a policy loss that takes one advantage per sequence."""
    for _, part in parts.all():
        errors = part.variant.convention_errors(part.params)
        if errors:
            raise RecipeError(f"{_what(part)} {part.name!r} ({part.where}): {errors[0]}")
    loss, advantage = parts.policy_loss, parts.advantage
    if loss.variant.extra.get("advantages") == "per_sequence" and advantage.variant.extra.get("returns") == "per_token":
        # the entry may say what per-token advantages would do to it and what to use instead
        why = loss.variant.extra.get("per_token_advantages",
                                     "it takes one advantage per sequence: use an advantage with one value per sequence")
        raise RecipeError(f"advantage {advantage.name!r} ({advantage.where}) gives one advantage per token, and policy "
                          f"loss {loss.name!r} ({loss.where}) is sequence-level: {why}")


def check_rl_section(command: str, cfg: dict, origins: dict[str, str], parts: RLParts | None = None) -> None:
    """Load-time check of a GRPO recipe's `rl:` section (see the module docstring). `parts`: the section as parsed
    for the recipe (postrain.recipes.sections.rl_parts, which the job's check passes); parsed here where a caller
    has no recipe (a direct call)."""
    if command != "grpo" or cfg.get("rl") is None:
        return
    if parts is None:
        parts = parse_rl_section(cfg["rl"], origins)
    trainer = cfg.get("trainer") or {}
    rl_origin = origin_of(origins, "rl")

    for family, part in parts.all():
        if part.variant.extra.get("unsupported"):
            raise RecipeError(f"{_what(part)} {part.name!r} ({part.where}) cannot run in "
                              f"the GRPO trainer: {part.variant.extra['unsupported']}")
        for data_name, required in part.variant.data.items():
            if required and data_name not in PROVIDED[family]:
                why = missing_data_reason(data_name)
                raise RecipeError(f"{_what(part)} {part.name!r} ({part.where}) reads "
                                  f"`{data_name}`: {why}")

    # the launch's processes (postrain.launch.launcher.world_size; read here, as the registries do not import
    # the launcher): generation_batch_size counts completions over all of them
    launch = cfg.get("launch") or {}
    processes = int(launch.get("num_processes") or 1) * int(launch.get("num_machines") or 1)
    for _family, part in parts.all():
        reason = part.variant.extra.get("one_process")  # the entry's own word: it does not split over processes
        if reason and processes > 1:
            raise RecipeError(f"{_what(part)} {part.name!r} ({part.where}) runs on one process only: {reason}, so "
                              f"on launch.num_processes x num_machines = {processes} processes it would not train "
                              f"as on one. Run it on one process, or choose another {_what(part)}")

    # Losses over whole groups (gvpo, disco) need every micro-batch to hold whole groups: TRL shuffles the
    # generation batch and splits it into steps_per_generation micro-batches, so only one split keeps groups whole.
    _check_conventions(parts)
    if parts.policy_loss.variant.needs("group_size"):
        spg = steps_per_generation(trainer, processes)
        per_device = int(trainer.get("per_device_train_batch_size") or 8)
        group = int(trainer.get("num_generations") or 8)
        if spg != 1 or per_device % group:
            raise RecipeError(
                f"policy loss {parts.policy_loss.name!r} ({parts.policy_loss.where}) compares the completions of a "
                f"group, so each micro-batch must hold whole groups: set trainer.steps_per_generation (or "
                f"gradient_accumulation_steps) to 1 and trainer.per_device_train_batch_size to a multiple of "
                f"trainer.num_generations (now steps_per_generation={spg}, per_device_train_batch_size={per_device}, "
                f"num_generations={group})")

    _check_samplers(parts, trainer)
    for _family, part in parts.all():
        check = part.variant.extra.get("check")
        if check is not None:  # the entry's own: its parameters against the batch, the parts it can run with
            check(part, parts, trainer)

    _check_vllm_correction(parts, trainer, origins)
    for key, (in_effect, instead) in TRL_CONFLICTS.items():
        if key in trainer and in_effect(trainer[key], trainer):
            raise RecipeError(
                f"trainer.{key} ({trainer[key]!r}, from {origin_of(origins, f'trainer.{key}')}) conflicts with rl: "
                f"(from {rl_origin}): the rl: section replaces TRL's loss and advantage path, which would ignore it. "
                f"Remove trainer.{key} and use {instead}")


def vllm_correction(trainer: dict[str, Any]) -> dict[str, Any] | None:
    """TRL's vLLM importance-sampling settings as GRPOConfig will hold them (its defaults where the recipe sets
    none; the deprecated `vllm_importance_sampling_cap` replaces clip_max, as in GRPOConfig.__post_init__), or None
    where the correction is off: no vLLM, or vllm_importance_sampling_correction: false."""
    if not trainer.get("use_vllm") or not trainer.get("vllm_importance_sampling_correction", True):
        return None
    from trl import GRPOConfig  # slow to import; postrain's GRPO config subclass keeps these defaults

    defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig) if f.name in VLLM_IS_KEYS}
    settings = {key: trainer.get(key, defaults[key]) for key in VLLM_IS_KEYS}
    if trainer.get("vllm_importance_sampling_cap") is not None:
        settings["vllm_importance_sampling_clip_max"] = trainer["vllm_importance_sampling_cap"]
    return settings


def _check_vllm_correction(parts: RLParts, trainer: dict[str, Any], origins: dict[str, str]) -> None:
    """With vLLM the trainer applies TRL's importance-sampling correction to the rl: policy loss: its mode must be
    one TRL knows and its bounds must keep a sample on which vLLM and the trainer agree (ratio 1) at weight 1."""
    settings = vllm_correction(trainer)
    if settings is None:
        return

    def value(key: str) -> str:
        if key == "vllm_importance_sampling_clip_max" and trainer.get("vllm_importance_sampling_cap") is not None:
            key = "vllm_importance_sampling_cap"
        where = f"from {origin_of(origins, f'trainer.{key}')}" if key in trainer else "TRL's default"
        return f"trainer.{key} ({settings.get(key, trainer.get(key))!r}, {where})"

    mode = settings["vllm_importance_sampling_mode"]
    if mode not in VLLM_IS_MODES:
        hint = did_you_mean(str(mode), VLLM_IS_MODES, n=1)
        raise RecipeError(f"{value('vllm_importance_sampling_mode')} is not a vLLM importance-sampling mode of TRL: "
                          f"{hint + ' ' if hint else ''}use one of {', '.join(VLLM_IS_MODES)}")
    low, high = settings["vllm_importance_sampling_clip_min"], settings["vllm_importance_sampling_clip_max"]
    if mode.endswith("_mask"):  # a ratio outside the bounds zeroes its token or sequence: 1 strictly inside
        if low is not None and not 0 <= low < 1:
            raise RecipeError(f"{value('vllm_importance_sampling_clip_min')} must lie in [0, 1) with mode {mode}: "
                              f"a ratio below it zeroes its token or sequence, and the ratios of a vLLM that matches "
                              f"the trainer scatter around 1, so {low} would mask half the samples or more")
        if high is not None and not high > 1:
            raise RecipeError(f"{value('vllm_importance_sampling_clip_max')} must be > 1 with mode {mode}: a ratio "
                              f"above it zeroes its token or sequence, and the ratios of a vLLM that matches the "
                              f"trainer scatter around 1, so {high} would mask half the samples or more (TRL's "
                              f"default: 3.0)")
    else:  # a ratio outside the bounds is clamped: 1 inside, or even matching samples would be reweighted
        if low is None and high is None:
            raise RecipeError(f"{value('vllm_importance_sampling_clip_min')} and "
                              f"{value('vllm_importance_sampling_clip_max')}: mode {mode} clamps the ratio to "
                              f"[clip_min, clip_max], so set at least one of them (TRL's default clip_max: 3.0)")
        if low is not None and not 0 <= low <= 1:
            raise RecipeError(f"{value('vllm_importance_sampling_clip_min')} must lie in [0, 1] with mode {mode}: "
                              f"every ratio below it is raised to it, so above 1 even samples on which vLLM and the "
                              f"trainer agree (ratio 1) would be weighted {low}")
        if high is not None and not high >= 1:
            raise RecipeError(f"{value('vllm_importance_sampling_clip_max')} must be >= 1 with mode {mode}: every "
                              f"ratio above it is lowered to it, so below 1 even samples on which vLLM and the "
                              f"trainer agree (ratio 1) would be weighted {high} (TRL's default: 3.0)")
        if low is not None and high is not None and not low < high:
            raise RecipeError(f"{value('vllm_importance_sampling_clip_min')} must be below "
                              f"{value('vllm_importance_sampling_clip_max')} (TRL's GRPOConfig requires it)")
    replay = parts.sampler_at("replay")
    if replay is not None:
        raise RecipeError(f"sampler 'repo_replay' ({replay.where}) cannot be combined with trainer.use_vllm (from "
                          f"{origin_of(origins, 'trainer.use_vllm')}) and TRL's vLLM importance-sampling "
                          f"correction: the replay buffer stores the trainer's behaviour log-probs of each sample, "
                          f"not vLLM's, so its off-policy term would train on vLLM's samples without the correction "
                          f"the on-policy term gets. Set trainer.vllm_importance_sampling_correction: false (both "
                          f"terms then treat vLLM's samples as the trainer's), or remove repo_replay")


def _check_samplers(parts: RLParts, trainer: dict[str, Any]) -> None:
    """At most one sampler per stage; a refill's rounds; no row-level sampler under a policy loss that compares
    whole groups. (A sampler's own parameters: its entry's `check=`.)"""
    by_stage: dict[str, Part] = {}
    for part in parts.samplers:
        stage = part.stage
        if stage in by_stage:
            raise RecipeError(f"samplers {by_stage[stage].name!r} ({by_stage[stage].where}) and {part.name!r} "
                              f"({part.where}) both act at the {stage!r} stage: keep one of them")
        by_stage[stage] = part
    for part in parts.samplers:
        key = part.where.split(",")[0]
        if part.refills:
            rounds = part.params.get("max_num_gen_batches", part.variant.params["max_num_gen_batches"])
            if not isinstance(rounds, int) or rounds < 0:
                raise RecipeError(f"{key}.max_num_gen_batches ({rounds!r}, {part.where}) must be an integer >= 0 "
                                  f"(0: generate until the batch is full, as verl's DAPO recipe)")
    rows = [p for p in parts.samplers if p.stage != "group"]
    if rows and parts.policy_loss.variant.needs("group_size"):
        raise RecipeError(f"sampler {rows[0].name!r} ({rows[0].where}) drops or repeats single completions, but "
                          f"policy loss {parts.policy_loss.name!r} ({parts.policy_loss.where}) compares the "
                          f"completions of whole groups: use a group-level sampler (dynamic_sampling, "
                          f"online_difficulty, reinforce_rej) or another policy loss")


def reference_beta(parts: RLParts) -> float | None:
    """The `beta` to hand TRL's GRPOConfig so that it builds the reference model and computes its log-probs, or
    None where no part reads them. TRL does both only where beta != 0; under rl: its loss never reads beta
    otherwise, so the value is the switch (the first reading part's own beta, for a config that reads true)."""
    if not parts.reads("ref_logps"):
        return None
    for _, part in parts.all():
        if part.variant.needs("ref_logps"):
            beta = part.params.get("beta", part.variant.params.get("beta"))
            if beta:
                return float(beta)
    return 1.0
