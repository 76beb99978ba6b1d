"""Load-time checks several jobs share: what TRL and the other libraries check only deep inside a run (or not at
all), made when the recipe loads, before anything is written.

Each job's own `check(cfg, origins)` (postrain.jobs.sft, dpo, grpo, evaluate, merge, pipeline) calls these, in
its own fixed order, beside the checks only it needs; postrain.jobs.loading reaches that `check` through the
per-command table of the jobs (postrain.jobs.JOB_MODULES).

TRL reads `loss_type` only when the first loss is computed; a typo there would surface after the model loaded
and data was tokenized. The valid values are read from the installed TRL's own field documentation, so the
check follows the TRL version rather than a copy of its list.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings

from postrain.data.sources import check_source_options
from postrain.data.transforms import TRANSFORMS, given_params
from postrain.errors import RecipeError, did_you_mean, origin_of
from postrain.jobs.guard import check_health_section
from postrain.jobs.hub import check_hub_section
from postrain.jobs.liveness import trl_path_parts
from postrain.jobs.plan import trainer_args_for_check
from postrain.jobs.trackers import check_report_to
from postrain.jobs.train_eval import check_section as check_eval_during_training
from postrain.launch.launcher import check_launch_section
from postrain.recipes.schema import ModelSpec
from postrain.recipes.validate import validate_section
from postrain.registry import FAMILIES
from postrain.trainers import config_class
from postrain.value_types import check_value


@functools.lru_cache(maxsize=None)
def documented_choices(cls: type, field_name: str) -> tuple[str, ...]:
    """The quoted values listed in the help of a TRL config field ('Possible/Supported values are ...')."""
    field = {f.name: f for f in dataclasses.fields(cls)}[field_name]
    help_text = field.metadata.get("help", "")
    match = re.search(r"values are:?(.*?)\.(\s|$)", help_text, re.S)
    if not match:
        return ()
    return tuple(dict.fromkeys(re.findall(r"'([a-z0-9_]+)'", match.group(1))))


def check_loss_types(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """`trainer.loss_type` (DPO, GRPO): values the installed TRL documents for the command's config class."""
    value = (cfg.get("trainer") or {}).get("loss_type")
    if value is None:
        return
    cls = config_class(command)
    choices = documented_choices(cls, "loss_type")
    if not choices:  # the installed TRL documents them differently: leave the check to TRL
        return
    for lt in [value] if isinstance(value, str) else value:
        if lt not in choices:
            hint = did_you_mean(lt, choices, n=1)
            hint = f"{hint} " if hint else ""
            origin = origin_of(origins, "trainer.loss_type")
            raise RecipeError(
                f"unknown trainer.loss_type {lt!r} (from {origin}) for {cls.__name__}: {hint}"
                f"TRL {command} loss types: {', '.join(choices)}"
            )


def check_inputs(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """What a job reads besides its model: `eval_during_training:` (postrain.jobs.train_eval: schedule, sets,
    rewards), then every data source (check_data_sources)."""
    check_eval_during_training(command, cfg, origins)
    check_data_sources(cfg, origins)


def check_data_sources(cfg: dict, origins: dict[str, str]) -> None:
    """Each data source's `chunk:` (0 <= index < of), `transform:` (a registered one) and its settings (the
    transform's parameters, postrain.data.transforms), and the model specs among them, checked as `model:` is."""
    def check(spec: dict, where: str) -> None:
        check_source_options(spec, where)
        check_transform_models(spec, where)

    def check_transform_models(spec: dict, where: str) -> None:
        if spec.get("transform") is not None:
            variant = TRANSFORMS.get(spec["transform"])
            section = variant.extra.get("section")
            for key in variant.extra.get("models", ()):
                path = f"{where}.{section}.{key}" if section else f"{where}.{key}"
                validate_section(given_params(spec, variant).get(key), ModelSpec | None, path, origins)
        if isinstance(spec.get("mix"), dict):
            check_transform_models(spec["mix"], f"{where}.mix")

    data = cfg.get("data") or {}
    for split in ("train", "eval"):
        if isinstance(data.get(split), dict):
            check(data[split], f"data.{split}")
    for name, spec in (cfg.get("sets") or {}).items():  # eval sets are sources too
        if isinstance(spec, dict):
            check(spec, f"sets.{name}")


def check_run_sections(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """How a run is set up: `launch:` (postrain.launch.launcher), `trainer.report_to` (trackers transformers knows,
    whose packages are installed: postrain.jobs.trackers), `hub:` (a valid repo id; TRL's own
    `trainer.push_to_hub` refused: postrain.jobs.hub)."""
    check_launch_section(command, cfg, origins)
    check_report_to(command, cfg, origins)
    check_hub_section(command, cfg, origins)


def check_trl_conventions(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """Hyperparameter values that are almost certainly a convention mix-up (each registry entry's `conventions`),
    for the entries TRL's own options stand for in a recipe without `rl:` or `loss:` (`loss_type: cispo` with an
    `epsilon_high` below 1, ...). An `rl:` section's parts are checked with the section (postrain.rl.section), a
    `loss:` section's entries by the DPO job (postrain.jobs.dpo)."""
    if cfg.get("rl") is not None:
        return
    trainer = cfg.get("trainer") or {}
    for variant, params, where in trl_path_parts(command, trainer, origins):
        full = {**variant.params, **params}
        for convention in variant.conventions:
            if not convention.check(full):
                continue
            key = convention.param
            if key in trainer:  # the recipe's own key, and the file that set it: that is what the user wrote
                raise RecipeError(f"{FAMILIES[variant.family].what} {variant.name!r} ({where}): "
                                  f"trainer.{key}={trainer[key]!r}: {convention.explain} (trainer.{key} from "
                                  f"{origin_of(origins, f'trainer.{key}')})")
            raise RecipeError(f"{FAMILIES[variant.family].what} {variant.name!r} ({where}): "
                              f"{key}={full[key]!r}: {convention.explain}")


def check_health(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """`health:` counts in range (postrain.jobs.guard)."""
    check_health_section(command, cfg, origins)


# Values of the library configs' fields that the libraries accept but that cannot train (a negative learning rate
# climbs the loss; a batch of 0 or a negative length crashes deep inside the first step, after the run directory
# was made). TRL 1.16, transformers 5 and peft 0.18 check none of these. A field the installed class lacks is
# skipped; None (a library's "unset") is not checked.
TRAINER_RANGES: dict[str, str] = {
    "learning_rate": ">= 0", "weight_decay": ">= 0", "max_grad_norm": ">= 0", "adam_beta1": "in [0, 1)",
    "adam_beta2": "in [0, 1)", "adam_epsilon": ">= 0", "warmup_steps": ">= 0", "num_train_epochs": "> 0",
    "per_device_train_batch_size": ">= 1", "per_device_eval_batch_size": ">= 1",
    "gradient_accumulation_steps": ">= 1", "eval_accumulation_steps": ">= 1", "logging_steps": "> 0",
    "save_steps": "> 0", "eval_steps": "> 0", "save_total_limit": ">= 1", "seed": ">= 0", "data_seed": ">= 0",
    "dataloader_num_workers": ">= 0", "dataset_num_proc": ">= 1", "label_smoothing_factor": "in [0, 1)",
    "max_length": ">= 1", "max_prompt_length": ">= 1", "max_completion_length": ">= 1",
}
PEFT_RANGES: dict[str, str] = {"r": ">= 1", "lora_alpha": "> 0", "lora_dropout": "in [0, 1)"}


def check_library_configs(command: str, cfg: dict, origins: dict[str, str],
                          command_ranges: dict[str, str] | None = None) -> None:
    """`trainer:` and `peft:` of a training job as the job will build them: postrain's ranges first (TRAINER_RANGES
    and the job's own `command_ranges`, naming the key and the file that set it), then the library config objects
    themselves, built exactly as the job builds them (their own checks: GRPO's batch divisibility, DPO's loss
    weights, peft's target modules), so that a value either library refuses stops the load, not the run."""
    trainer = cfg.get("trainer") or {}
    fields = {f.name for f in dataclasses.fields(config_class(command))}
    ranges = {**TRAINER_RANGES, **(command_ranges or {})}
    for key, value in trainer.items():
        if key in ranges and key in fields and value is not None:
            check_value(value, object, ranges[key], f"trainer.{key} (from {origin_of(origins, f'trainer.{key}')})")
    peft = cfg.get("peft")
    if isinstance(peft, dict):
        for key, value in peft.items():
            if key in PEFT_RANGES and value is not None:
                check_value(value, object, PEFT_RANGES[key], f"peft.{key} (from {origin_of(origins, f'peft.{key}')})")
    with warnings.catch_warnings():  # the libraries' advisories are the job's to show (or quiet), once, when it runs
        warnings.simplefilter("ignore")
        trainer_args_for_check(command, cfg)


def check_reward_errors(cfg: dict, origins: dict[str, str]) -> None:
    """`reward_errors:` (and eval_during_training's): limits in seconds > 0 or null, a finite failure score (a NaN
    or infinite one would do to the run what a NaN reward does, postrain.rewards.build.GuardedReward)."""
    sections = {"reward_errors": cfg.get("reward_errors"),
                "eval_during_training.reward_errors": (cfg.get("eval_during_training") or {}).get("reward_errors")}
    for path, section in sections.items():
        if not isinstance(section, dict):
            continue
        for key, allowed in (("timeout", "> 0"), ("completion_timeout", "> 0"), ("score", "in (-inf, inf)")):
            value = section.get(key)
            if value is not None:
                check_value(value, object, allowed, f"{path}.{key} (from {origin_of(origins, f'{path}.{key}')})")
