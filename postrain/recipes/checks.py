"""Load-time checks that TRL itself makes only deep inside training (or not at all).

TRL reads `loss_type` only when the first loss is computed; a typo there would surface after the model loaded
and data was tokenized. The valid values are read from the installed TRL's own field documentation, so the
check follows the TRL version rather than a copy of its list.
"""

from __future__ import annotations

import dataclasses
import functools
import re

from postrain.data.sources import check_source_options
from postrain.data.transforms import TRANSFORMS, given_params
from postrain.errors import RecipeError, did_you_mean
from postrain.recipes.schema import ModelSpec
from postrain.recipes.validate import origin_of, validate_section


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
    if command not in ("dpo", "grpo"):
        return
    value = (cfg.get("trainer") or {}).get("loss_type")
    if value is None:
        return
    from postrain.trainers import config_class

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


COMMAND_CHECKS = [check_loss_types]


def run_checks(command: str, cfg: dict, origins: dict[str, str]) -> None:
    for check in COMMAND_CHECKS:
        check(command, cfg, origins)


def check_merge_section(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """Validate `merge:` against mergekit's schema and method registry at load time.

    The models need not exist yet (in a pipeline they are produced by earlier stages), so every reference is
    checked with a stand-in hub id here; the merge job checks the real references before it writes anything.
    """
    if command != "merge":
        return
    from postrain.merging import validate_merge_config

    import hashlib

    def stand_in(ref: str) -> str:  # distinct per reference, so mergekit's duplicate-input check still applies
        return "postrain-check/" + hashlib.sha256(str(ref).encode()).hexdigest()[:12]

    validate_merge_config(cfg.get("merge") or {}, resolve_model=stand_in)


COMMAND_CHECKS.append(check_merge_section)


def check_rl_parts(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """A GRPO recipe's `rl:` parts: names, parameters, data a GRPO batch can supply, conflicting TRL options."""
    if command != "grpo" or cfg.get("rl") is None:
        return
    from postrain.rl.section import check_rl_section

    check_rl_section(command, cfg, origins)


COMMAND_CHECKS.append(check_rl_parts)


def check_dpo_losses(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """A DPO recipe's `loss:` entries: names, parameters, data the trainer can give, conflicting TRL options."""
    if command != "dpo" or not cfg.get("loss"):
        return
    from postrain.preference.section import parse_losses  # the preference registry imports torch: slow

    check_loss_models(parse_losses(cfg["loss"], cfg.get("trainer") or {}, origins), origins)


def check_loss_models(terms: list, origins: dict[str, str]) -> None:
    """The models a `loss:` entry names (TGDPO's `token_reward_model`), checked as `ref_model:` is: their keys and
    types against the recipe's model spec (the section's parser, below the recipe schema, checks their form)."""
    for i, term in enumerate(terms):
        if "token_reward_model" in term.inputs:
            validate_section(term.inputs["token_reward_model"], ModelSpec, f"loss[{i}].token_reward_model", origins)


COMMAND_CHECKS.append(check_dpo_losses)


def check_dpo_shared_prefix(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """`trainer.shared_prefix` in a DPO recipe: TRL options, data shapes and attention implementations the shared
    layout cannot reproduce (postrain.trainers.shared_prefix_dpo). The model itself is checked once loaded."""
    if command != "dpo" or not (cfg.get("trainer") or {}).get("shared_prefix"):
        return
    from postrain.preference.section import section_shape
    from postrain.trainers.shared_prefix_dpo import check_options

    models = {"model": cfg.get("model"), "ref_model": cfg.get("ref_model")}
    for i, entry in enumerate(cfg.get("loss") or []):
        if isinstance(entry, dict) and isinstance(entry.get("token_reward_model"), dict):
            models[f"loss[{i}].token_reward_model"] = entry["token_reward_model"]
    check_options(cfg.get("trainer") or {}, section_shape(cfg.get("loss")).name, origins, models)


COMMAND_CHECKS.append(check_dpo_shared_prefix)


def check_eval_settings(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """An eval recipe's per-set generation and metric settings (k <= num_samples, ...) and its `models:`."""
    if command != "eval":
        return
    from postrain.evaluation.settings import check_eval_recipe

    check_eval_recipe(cfg, origins)


COMMAND_CHECKS.append(check_eval_settings)


def check_eval_during_training(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """A training recipe's `eval_during_training:` (postrain.jobs.train_eval): schedule, sets, rewards."""
    from postrain.jobs.train_eval import check_section

    check_section(command, cfg, origins)


COMMAND_CHECKS.append(check_eval_during_training)


def check_data_sources(command: str, cfg: dict, origins: dict[str, str]) -> None:
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


COMMAND_CHECKS.append(check_data_sources)


def check_logp_models(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """A DPO recipe's `logp_models:`: names, a `loss:` entry reading each, MRPO's `references:` naming them."""
    if command != "dpo" or not cfg.get("logp_models") and not any(
            isinstance(e, dict) and "references" in e for e in cfg.get("loss") or []):
        return
    from postrain.trainers.logp_models import check_logp_models as check

    check(command, cfg, origins)


COMMAND_CHECKS.append(check_logp_models)


def check_lm_eval(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """`eval.backend: lm_eval` and its `lm_eval:` section (postrain.evaluation.lm_eval_backend); lm-eval itself is
    imported only when the backend runs."""
    if command != "eval":
        return
    from postrain.evaluation.lm_eval_backend import check_lm_eval_section

    check_lm_eval_section(command, cfg, origins)


COMMAND_CHECKS.append(check_lm_eval)


def check_launch(command: str, cfg: dict, origins: dict[str, str]) -> None:
    from postrain.launch.launcher import check_launch_section

    check_launch_section(command, cfg, origins)


COMMAND_CHECKS.append(check_launch)


def check_trackers(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """`trainer.report_to`: trackers transformers knows, whose packages are installed (postrain.jobs.trackers)."""
    from postrain.jobs.trackers import check_report_to

    check_report_to(command, cfg, origins)


COMMAND_CHECKS.append(check_trackers)


def check_hub(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """`hub:` (a valid repo id) and TRL's own `trainer.push_to_hub`, refused (postrain.jobs.hub)."""
    from postrain.jobs.hub import check_hub_section

    check_hub_section(command, cfg, origins)


COMMAND_CHECKS.append(check_hub)


def check_conventions(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """Hyperparameter values that are almost certainly a convention mix-up (each registry entry's `conventions`),
    for the entries a recipe reaches without `rl:` (its `loss:` entries, or the entries TRL's own options stand for:
    `loss_type: cispo` with an `epsilon_high` below 1, ...). An `rl:` section's parts are checked with the section
    (postrain.rl.section)."""
    if command not in ("dpo", "grpo") or cfg.get("rl") is not None:
        return
    from postrain.recipes.liveness import trl_path_parts
    from postrain.registry import FAMILIES

    if command == "dpo" and cfg.get("loss"):
        from postrain.preference import PREFERENCE

        for i, entry in enumerate(cfg["loss"]):
            if isinstance(entry, dict) and entry.get("name") in PREFERENCE:
                params = {k: v for k, v in entry.items() if k in PREFERENCE.entries[entry["name"]].params}
                errors = PREFERENCE.entries[entry["name"]].convention_errors(params)
                if errors:
                    raise RecipeError(f"preference loss {entry['name']!r} (loss[{i}], from "
                                      f"{origin_of(origins, 'loss')}): {errors[0]}")
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


COMMAND_CHECKS.append(check_conventions)


def check_shared_prefix(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """`trainer.shared_prefix: true` (GRPO): a model and attention implementation that honour the block mask
    (postrain.trainers.shared_prefix)."""
    if command != "grpo" or not (cfg.get("trainer") or {}).get("shared_prefix"):
        return
    from postrain.trainers.shared_prefix import check_recipe

    check_recipe(command, cfg, origins)


COMMAND_CHECKS.append(check_shared_prefix)


def check_health(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """`health:` counts in range (postrain.jobs.guard)."""
    from postrain.jobs.guard import check_health_section

    check_health_section(command, cfg, origins)


COMMAND_CHECKS.append(check_health)


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
COMMAND_TRAINER_RANGES: dict[str, dict[str, str]] = {
    "dpo": {"beta": "> 0", "label_smoothing": "in [0, 0.5]", "ld_alpha": "in [0, 1]", "rpo_alpha": ">= 0",
            "ref_model_mixup_alpha": "in [0, 1]", "ref_model_sync_steps": ">= 1", "precompute_ref_batch_size": ">= 1"},
    "grpo": {"num_generations": ">= 2", "num_generations_eval": ">= 1", "temperature": "> 0", "top_p": "in (0, 1]",
             "min_p": "in [0, 1]", "repetition_penalty": "> 0", "beta": ">= 0", "epsilon": "> 0",
             "epsilon_high": "> 0", "delta": "> 1", "num_iterations": ">= 1", "steps_per_generation": ">= 1",
             "generation_batch_size": ">= 1", "top_entropy_quantile": "in (0, 1]",
             "ref_model_mixup_alpha": "in [0, 1]", "ref_model_sync_steps": ">= 1"},
}
PEFT_RANGES: dict[str, str] = {"r": ">= 1", "lora_alpha": "> 0", "lora_dropout": "in [0, 1)"}


def check_library_configs(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """`trainer:` and `peft:` as the job will build them: postrain's ranges first (naming the key and the file
    that set it), then the library config objects themselves, built exactly as the job builds them (their own
    checks: GRPO's batch divisibility, DPO's loss weights, peft's target modules), so that a value either library
    refuses stops the load, not the run."""
    if command not in ("sft", "dpo", "grpo"):
        return
    from postrain.trainers import config_class
    from postrain.value_types import check_value

    trainer = cfg.get("trainer") or {}
    fields = {f.name for f in dataclasses.fields(config_class(command))}
    ranges = {**TRAINER_RANGES, **COMMAND_TRAINER_RANGES.get(command, {})}
    for key, value in trainer.items():
        if key in ranges and key in fields and value is not None:
            check_value(value, object, ranges[key], f"trainer.{key} (from {origin_of(origins, f'trainer.{key}')})")
    peft = cfg.get("peft")
    if isinstance(peft, dict):
        for key, value in peft.items():
            if key in PEFT_RANGES and value is not None:
                check_value(value, object, PEFT_RANGES[key], f"peft.{key} (from {origin_of(origins, f'peft.{key}')})")
    import warnings

    from postrain.jobs.plan import trainer_args_for_check

    with warnings.catch_warnings():  # the libraries' advisories are the job's to show (or quiet), once, when it runs
        warnings.simplefilter("ignore")
        trainer_args_for_check(command, cfg)


COMMAND_CHECKS.append(check_library_configs)


def check_reward_errors(command: str, cfg: dict, origins: dict[str, str]) -> None:
    """`reward_errors:` (and eval_during_training's): limits in seconds > 0 or null, a finite failure score (a NaN
    or infinite one would do to the run what a NaN reward does, postrain.rewards.build.GuardedReward)."""
    from postrain.value_types import check_value

    sections = {"reward_errors": cfg.get("reward_errors"),
                "eval_during_training.reward_errors": (cfg.get("eval_during_training") or {}).get("reward_errors")}
    for path, section in sections.items():
        if not isinstance(section, dict):
            continue
        for key, allowed in (("timeout", "> 0"), ("completion_timeout", "> 0"), ("score", "in (-inf, inf)")):
            value = section.get(key)
            if value is not None:
                check_value(value, object, allowed, f"{path}.{key} (from {origin_of(origins, f'{path}.{key}')})")


COMMAND_CHECKS.append(check_reward_errors)
