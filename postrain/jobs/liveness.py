"""Liveness: whether each method part a recipe names can act under the recipe's batch layout.

A registered entry says what its defining step needs (postrain.registry.Requirement, passed to its registry's
`register`): Lite PPO's batch-level std needs more than one group per generation batch, CISPO's cap of the
importance weight needs updates off the policy that generated the batch, DAPO's soft overlong punishment needs a
length budget below max_completion_length, ... Here each requirement of each part a recipe trains with (its
`rl:` parts after the `method:` expansion, its `loss:` entries, or the registry entries TRL's own options stand
for: `loss_type: cispo`, `scale_rewards: batch`, ...) is checked against the recipe's layout as TRL will derive
it, with the `launch:` section's processes:

    generation_batch_size = per_device_train_batch_size x processes x steps_per_generation   (TRL 1.16 GRPOConfig;
    steps_per_generation = gradient_accumulation_steps unless generation_batch_size or it is set)
    optimizer steps per generation batch = steps_per_generation x num_iterations / gradient_accumulation_steps:
    TRL computes pi_old only when gradient_accumulation_steps % (steps_per_generation x num_iterations) != 0;
    otherwise every micro-batch of a generation batch is trained on by the policy that generated it (ratio 1).

A finding names the part, the step that is inert, the numbers, and a setting that would make it live. The
recipe's `liveness:` key says what a finding does: `warn` (the default) logs it when the recipe loads
(`--dry-run`, a run, a pipeline stage), `error` refuses the recipe. `postrain recipes --check` reports every
shipped recipe. The token-level PPO clip of TRL's default parts at their default settings (what `rl: {}` and a
plain GRPO recipe train with) is not reported inert on-policy: it is inert in DeepSeekMath's own setup too, and no
method's defining step; a clip a recipe or its method sets (DAPO's clip-higher) is.

Not judged here (their figures are known only once data loads): the number of prompts of the dataset (a
`revisits` requirement under `max_steps`), the groups of `group_robust_po`, the list sizes of list-wise losses.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from postrain.errors import RecipeError, origin_of
from postrain.launch.launcher import inside_launch, launch_section, world_size
from postrain.recipes.sections import loss_terms, rl_parts
from postrain.registry import FAMILIES
from postrain.rl.section import DEFAULT_PARTS
from postrain.trainers import config_class
from postrain.variants import all_variants

LOG = logging.getLogger("postrain.liveness")
MODES = ("warn", "error")
# Entries of TRL's own GRPO path (no `rl:`) that liveness judges: TRL options stand for the registry entries
# whose `trl` metadata names them (`scale_rewards=batch` is lite_ppo, `loss_type=cispo` is cispo, ...).
TRL_PATH_FAMILIES = {"grpo": ("advantage", "policy_loss"), "dpo": ("preference",)}
DEFAULT_PART_KEYS = ("advantage", "policy_loss", "aggregation")


@functools.lru_cache(maxsize=None)
def trl_defaults(command: str) -> dict[str, Any]:
    """The installed TRL config class' field defaults (GRPOConfig, DPOConfig, ...)."""
    return {f.name: f.default for f in dataclasses.fields(config_class(command))
            if f.default is not dataclasses.MISSING}


@dataclass(frozen=True)
class Layout:
    """The batch layout TRL will derive from a recipe (its trainer section over TRL's defaults, with the
    `launch:` section's processes). Requirement amounts read these attributes."""

    command: str
    world_size: int
    per_device: int  # per_device_train_batch_size: pairs / lists / unpaired rows (dpo), completions (grpo)
    grad_accum: int
    epochs: float | None  # None where max_steps sets the run's length (the dataset size decides the epochs)
    max_steps: int | None
    steps_per_generation: int = 1
    generation_batch_size: int = 0  # completions of one generation batch, over every process
    num_generations: int = 0
    num_iterations: int = 1
    max_completion_length: int = 0
    sets: frozenset = frozenset()  # the trainer keys the recipe sets (for advice that does not conflict)

    @property
    def groups(self) -> int:
        """Groups (prompts) in one generation batch, gathered over the processes."""
        return self.generation_batch_size // max(self.num_generations, 1)

    @property
    def completions_per_process(self) -> int:
        return self.per_device * self.steps_per_generation

    @property
    def micro_batches_per_generation(self) -> int:
        return self.steps_per_generation * self.num_iterations

    @property
    def off_policy(self) -> bool:
        """Whether some micro-batch trains on a generation batch after an optimizer step moved the policy (TRL's own
        condition for computing pi_old: gradient_accumulation_steps % (steps_per_generation x num_iterations))."""
        return self.grad_accum % self.micro_batches_per_generation != 0

    def rows(self, scope: str) -> int:
        """Rows of a batch as an entry sees it: one process' micro-batch, or gathered over the processes."""
        return self.per_device * (self.world_size if scope == "gathered" else 1)

    def generation_derivation(self) -> str:
        """How TRL arrives at generation_batch_size, in words."""
        if "generation_batch_size" in self.sets:
            how = "set by the recipe"
        else:
            how = (f"per_device_train_batch_size {self.per_device} x {self.world_size} process"
                   f"{'es' if self.world_size > 1 else ''} x steps_per_generation {self.steps_per_generation}")
        return f"generation_batch_size {self.generation_batch_size} ({how})"


def layout_of(command: str, cfg: dict) -> Layout:
    """The layout of a resolved dpo or grpo recipe (TRL's GRPOConfig derivation of the generation batch)."""
    trainer = cfg.get("trainer") or {}
    defaults = trl_defaults(command)

    def get(key: str, fallback: Any = None) -> Any:
        value = trainer.get(key, defaults.get(key, fallback))
        return fallback if value is None else value

    world = world_size(launch_section(cfg))
    per_device, accum = int(get("per_device_train_batch_size", 8)), int(get("gradient_accumulation_steps", 1))
    max_steps = int(get("max_steps", -1))
    common = dict(command=command, world_size=world, per_device=per_device, grad_accum=accum,
                  epochs=None if max_steps > 0 else float(get("num_train_epochs", 1.0)),
                  max_steps=max_steps if max_steps > 0 else None,
                  sets=frozenset(k for k, v in trainer.items() if v is not None))
    if command != "grpo":
        return Layout(**common)
    gbs, spg = trainer.get("generation_batch_size"), trainer.get("steps_per_generation")
    if gbs is None and spg is None:  # TRL 1.16 GRPOConfig.__post_init__
        spg = accum
        gbs = per_device * world * spg
    elif gbs is not None:
        spg = max(int(gbs) // (per_device * world), 1)
    else:
        gbs = per_device * world * int(spg)
    return Layout(**common, steps_per_generation=int(spg), generation_batch_size=int(gbs),
                  num_generations=int(get("num_generations", 8)), num_iterations=int(get("num_iterations", 1)),
                  max_completion_length=int(get("max_completion_length", 512)))


@dataclass(frozen=True)
class Finding:
    """A part whose defining step cannot act under the recipe's layout."""

    part: str  # "advantage 'lite_ppo'"
    where: str  # "rl.advantage, from method lite_ppo"
    kind: str
    step: str
    why: str  # the numbers
    fix: str  # a setting that would make it live

    @property
    def message(self) -> str:
        return f"{self.part} ({self.where}): {self.step} is inert under this layout: {self.why}. {self.fix}"


def _amount(requirement, params: dict, layout: Layout):
    amount = requirement.amount
    return amount(params, layout) if callable(amount) else amount


def _off_policy(requirement, params, layout, seen, owner):
    if layout.off_policy:
        return None
    spg, it, accum = layout.steps_per_generation, layout.num_iterations, layout.grad_accum
    why = (f"each generation batch is trained on within one optimizer step (steps_per_generation {spg} x "
           f"num_iterations {it} micro-batches, gradient_accumulation_steps {accum} per optimizer step), so "
           f"pi_old = pi and every ratio pi / pi_old is 1")
    if owner.family == "policy_loss" and owner.needs("group_size"):
        # a loss over whole groups needs steps_per_generation 1 (postrain.rl.section): only reusing a micro-batch
        # that is an optimizer step of its own moves the policy between its passes
        return why, ("This loss compares whole groups, so each micro-batch is a generation batch of its own "
                     "(steps_per_generation 1): it acts only with trainer.gradient_accumulation_steps=1 and "
                     "trainer.num_iterations=2 or more (each micro-batch an update, trained on again)")
    if "generation_batch_size" in layout.sets:
        setting = f"trainer.generation_batch_size={2 * layout.per_device * layout.world_size * accum}"
    else:
        setting = f"trainer.steps_per_generation={2 * accum}"
    return why, (f"It acts with more than one optimizer step per generation batch: e.g. {setting} (two optimizer "
                 f"steps per generation batch) or trainer.num_iterations=2")


def _groups_per_batch(requirement, params, layout, seen, owner):
    if layout.groups >= 2:
        return None
    group = layout.num_generations
    per_process = layout.completions_per_process / group
    why = (f"the generation batch holds {layout.groups} group: {layout.generation_derivation()} / num_generations "
           f"{group}" + (f" ({per_process:g} group(s) per process)" if layout.world_size > 1 else ""))
    step = layout.per_device * layout.world_size
    target = math.lcm(step, group)
    while target // group < 2:
        target += math.lcm(step, group)
    if "steps_per_generation" in layout.sets:
        setting = f"trainer.steps_per_generation={target // step}"
    else:
        setting = f"trainer.generation_batch_size={target}"
    return why, f"It acts with two groups or more per generation batch: e.g. {setting} ({target // group} groups)"


def _group_size(requirement, params, layout, seen, owner):
    if seen >= 2:
        return None
    return (f"each group it sees holds {seen} completion",
            "It acts with groups of 2 completions or more (trainer.num_generations, or the k of a GFPO sampler)")


def _refill(requirement, params, layout, seen, owner):
    rounds = _amount(requirement, params, layout)
    if rounds >= 2:
        return None
    return (f"max_num_gen_batches {params.get('max_num_gen_batches')!r} allows {rounds} generation round per step, "
            f"so what it leaves out is never replaced",
            "It acts with more generation rounds: set its max_num_gen_batches (0: no limit for the refilling "
            "samplers; verl's DAPO scripts use 10)")


def _length_budget(requirement, params, layout, seen, owner):
    budget = _amount(requirement, params, layout)
    if budget is None or budget < layout.max_completion_length:
        return None
    return (f"its length budget never falls below {budget:g} tokens, and no completion is longer than "
            f"trainer.max_completion_length {layout.max_completion_length}",
            "It acts with a budget below trainer.max_completion_length (raise max_completion_length or lower "
            "the budget)")


def _revisits(requirement, params, layout, seen, owner):
    needed = _amount(requirement, params, layout)
    if layout.epochs is None or math.ceil(layout.epochs) >= needed:
        return None
    return (f"it needs each prompt visited {needed} times, and trainer.num_train_epochs is {layout.epochs:g}",
            f"It acts with trainer.num_train_epochs={needed} or more")


def _selection(requirement, params, layout, seen, owner):
    kept, total = _amount(requirement, params, layout)
    if kept < total:
        return None
    return (f"it keeps {kept} of the {total} it sees", "It acts when it keeps fewer than it sees")


def _rows_per_batch(requirement, params, layout, seen, owner):
    needed = int(_amount(requirement, params, layout))
    rows = layout.rows(requirement.scope)
    if rows >= needed:
        return None
    if requirement.scope == "gathered":
        why = (f"a batch holds {rows} row(s) (per_device_train_batch_size {layout.per_device} x "
               f"{layout.world_size} process(es))")
        fix = f"per_device_train_batch_size x processes >= {needed}"
    else:
        why = f"each process' batch holds {rows} row(s) (per_device_train_batch_size {layout.per_device})"
        fix = f"trainer.per_device_train_batch_size={needed} or more"
    return why, f"It acts with {needed} rows or more per batch: {fix}"


EVALUATORS = {"off_policy": _off_policy, "groups_per_batch": _groups_per_batch, "group_size": _group_size,
              "refill": _refill, "length_budget": _length_budget, "revisits": _revisits, "selection": _selection,
              "rows_per_batch": _rows_per_batch}


def evaluate(variant, params: dict, layout: Layout, part: str, where: str, seen_group: int | None = None,
             skip: tuple[str, ...] = ()) -> list[Finding]:
    """The findings of one entry at hyperparameters `params` (over its defaults) under `layout`, except the
    requirement kinds in `skip`."""
    full = {**variant.params, **params}
    if "max_completion_length" in variant.params and params.get("max_completion_length") is None and \
            layout.max_completion_length:
        full["max_completion_length"] = layout.max_completion_length  # the GRPO trainer fills it in
    seen = layout.num_generations if seen_group is None else seen_group
    out = []
    for owner, owner_params, requirement in variant.requirements(full):
        if requirement.kind in skip:
            continue
        verdict = EVALUATORS[requirement.kind](requirement, owner_params, layout, seen, owner)
        if verdict is not None:
            out.append(Finding(part, where, requirement.kind, requirement.step, *verdict))
    return out


def trl_options(variant) -> dict[str, str] | None:
    """`loss_type=cispo` / `scale_rewards=batch` / `loss_type=sigmoid, f_divergence_type=forward_kl` in an entry's
    `trl` metadata as {option: value}; None where the metadata is not of that form."""
    head = (variant.trl or "").split(" (")[0]
    pairs = [p.strip() for p in head.split(",")]
    matches = [re.fullmatch(r"([a-z_]+)=([A-Za-z0-9_]+)", p) for p in pairs]
    if not pairs or not all(matches):
        return None
    return {m.group(1): m.group(2) for m in matches}


def _set_to(trainer: dict, defaults: dict, key: str, value: str) -> bool:
    """Whether TRL will run with option `key` at `value` (the recipe's, else TRL's default; lists: one of them)."""
    got = trainer.get(key, defaults.get(key))
    return str(got) == value or (isinstance(got, list) and value in map(str, got))


def trl_path_parts(command: str, trainer: dict, origins: dict) -> list[tuple[Any, dict, str]]:
    """(entry, hyperparameters, where) of the registry entries that a recipe without `rl:` / `loss:` trains with
    through TRL's own options: each entry whose `trl` metadata names options the recipe sets to those values.
    Hyperparameters of the same name come from the trainer section, as TRL reads them (TRL's epsilon_high
    defaults to epsilon)."""
    defaults = trl_defaults(command)
    out = []
    for family in TRL_PATH_FAMILIES.get(command, ()):
        matched = [(v, o) for v in all_variants(family) if (o := trl_options(v))
                   and all(_set_to(trainer, defaults, k, value) for k, value in o.items())]
        if family in ("advantage", "policy_loss") and matched:
            # one part per axis: the entry of the options the recipe sets itself (loss_type=cispo) over the one of
            # TRL's defaults (importance_sampling_level=token)
            explicit = max(sum(k in trainer for k in o) for _, o in matched)
            matched = [(v, o) for v, o in matched if sum(k in trainer for k in o) == explicit][:1]
        for variant, options in matched:
            params = {k: trainer.get(k, defaults.get(k)) for k in variant.params if k in trainer or k in defaults}
            if "epsilon_high" in params and params["epsilon_high"] is None and variant.params["epsilon_high"] is not None:
                # TRL's epsilon_high defaults to epsilon; an entry whose own default is not "the same as epsilon"
                # (cispo's absolute cap) then runs at TRL's epsilon
                params["epsilon_high"] = trainer.get("epsilon", defaults.get("epsilon"))
            said = ", ".join(f"trainer.{k}={v} (from {origin_of(origins, f'trainer.{k}')})" for k, v in options.items())
            out.append((variant, params, f"TRL's {said}"))
    return out


def _plain_default(key: str, name: str, variant, params: dict) -> bool:
    """A part that is TRL's default at its default settings (what `rl: {}` and a plain GRPO recipe train with)."""
    return DEFAULT_PARTS.get(key) == name and all(variant.params.get(k) == v for k, v in params.items())


# TRL's default parts at their defaults are not reported inert for lack of off-policy updates: their clip is no
# method's defining step (DeepSeekMath's GRPO trains on-policy, with the clip inert, by design).
DEFAULT_SKIPS = ("off_policy",)


def _grpo_findings(cfg: dict, origins: dict, layout: Layout) -> list[Finding]:
    trainer = cfg.get("trainer") or {}
    if cfg.get("rl") is None:
        out = []
        for variant, params, where in trl_path_parts("grpo", trainer, origins):
            skip = DEFAULT_SKIPS if _plain_default(variant.family, variant.name, variant, params) else ()
            out += evaluate(variant, params, layout, f"{FAMILIES[variant.family].what} {variant.name!r}", where,
                            skip=skip)
        return out
    parts = rl_parts(cfg, origins)  # as the job's check parsed them (postrain.recipes.sections)
    subset = parts.sampler_at("subset")
    out = []
    for family, part in parts.all():
        skip = DEFAULT_SKIPS if _plain_default(family, part.name, part.variant, part.params) else ()
        seen = None
        if family == "advantage" and subset is not None:
            seen = int(subset.params.get("k", layout.num_generations))
        out += evaluate(part.variant, part.params, layout, f"{FAMILIES[part.variant.family].what} {part.name!r}",
                        part.where, seen, skip)
    return out


def _dpo_findings(cfg: dict, origins: dict, layout: Layout) -> list[Finding]:
    trainer = cfg.get("trainer") or {}
    if not cfg.get("loss"):
        return [f for variant, params, where in trl_path_parts("dpo", trainer, origins)
                for f in evaluate(variant, params, layout, f"preference loss {variant.name!r}", where)]
    out = []
    for i, term in enumerate(loss_terms(cfg, origins)):  # as the job's check parsed them (postrain.recipes.sections)
        where = f"loss[{i}], from {origin_of(origins, 'loss')}"
        out += evaluate(term.variant, {**term.params, **term.state}, layout,
                        f"{FAMILIES['preference'].what} {term.name!r}", where)
    return out


def check_liveness(command: str, cfg: dict, origins: dict[str, str]) -> list[Finding]:
    """Every finding of a resolved recipe (empty for commands without method parts)."""
    if command not in ("grpo", "dpo"):
        return []
    layout = layout_of(command, cfg)
    return _grpo_findings(cfg, origins, layout) if command == "grpo" else _dpo_findings(cfg, origins, layout)


def report(command: str, cfg: dict, origins: dict[str, str], path=None) -> list[Finding]:
    """Check a recipe's liveness as its `liveness:` key says: log each finding as a warning (`warn`), or refuse the
    recipe naming them all (`error`). Returns the findings."""
    findings = check_liveness(command, cfg, origins)
    if not findings:
        return findings
    mode = cfg.get("liveness", "warn")
    recipe = f"{path}: " if path else ""
    if mode == "error":
        listed = "\n  ".join(f.message for f in findings)
        raise RecipeError(f"{recipe}{len(findings)} method step(s) would be inert (liveness: error, from "
                          f"{origin_of(origins, 'liveness')}):\n  {listed}")
    if not inside_launch():  # the calling process of a launch has said it already
        for finding in findings:
            LOG.warning("warning: %s%s (liveness: error refuses such a recipe)", recipe, finding.message)
    return findings
