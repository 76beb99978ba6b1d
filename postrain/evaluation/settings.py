"""An eval recipe's settings per set and per model, and their load-time checks.

A set's generation and metric settings are the recipe's top-level `generation:` / `metrics:` with the set's own
keys over them. results.json stores the shared settings once and, per set, only what differs (`differences`).
"""

from __future__ import annotations

from typing import Any

from postrain.errors import RecipeError, did_you_mean, origin_of
from postrain.rewards import REWARDS


def set_generation(cfg: dict, name: str) -> dict[str, Any]:
    """Set `name`'s decoding: the shared `generation:` with the set's `generation:` keys over it."""
    return {**cfg["generation"], **(cfg["sets"][name].get("generation") or {})}


def set_metric_settings(cfg: dict, name: str) -> dict[str, Any]:
    """Set `name`'s metric settings: the shared `metrics:` with the set's `metrics:` keys over it."""
    return {**cfg["metrics"], **(cfg["sets"][name].get("metrics") or {})}


def differences(shared: dict, own: dict) -> dict:
    """The keys of `own` whose value is not the shared one."""
    return {key: value for key, value in own.items() if key not in shared or shared[key] != value}


def model_entries(cfg: dict) -> dict[str, dict]:
    """Name -> model section of every model the recipe evaluates: the `model:` section alone, or (comparison mode)
    one per `models:` entry, each with its reference as `name_or_path` and the other `model:` keys shared."""
    models = cfg.get("models")
    if not models:
        return {cfg["model"]["name_or_path"]: cfg["model"]}
    named = dict(models) if isinstance(models, dict) else {ref: ref for ref in models}
    return {name: {**cfg["model"], "name_or_path": ref} for name, ref in named.items()}


def check_eval_recipe(cfg: dict, origins: dict[str, str]) -> None:
    """What would otherwise stop an eval once models are loaded: unknown per-set generation keys, k values a set
    cannot estimate (k > its num_samples), bad interval settings, a verifier that cannot vote, bad `models:`."""
    for name, spec in cfg["sets"].items():
        overrides = spec.get("generation") or {}
        for key in overrides:
            if key not in cfg["generation"]:
                hint = did_you_mean(key, cfg["generation"]) or f"valid: {', '.join(cfg['generation'])}"
                path = f"sets.{name}.generation.{key}"
                raise RecipeError(f"'{path}' (from {origin_of(origins, path)}) is not a generation setting: {hint}")
        _check_metrics(cfg, name, origins)
    _check_models(cfg.get("models"), origins)


def _check_metrics(cfg: dict, name: str, origins: dict[str, str]) -> None:
    metrics = set_metric_settings(cfg, name)
    own = cfg["sets"][name].get("metrics") or {}

    def where(key: str) -> str:
        path = f"sets.{name}.metrics.{key}" if key in own else f"metrics.{key}"
        return f"'{path}' (from {origin_of(origins, path)})"

    generation = set_generation(cfg, name)
    samples = generation["num_samples"]
    own_generation = cfg["sets"][name].get("generation") or {}
    samples_key = f"sets.{name}.generation.num_samples" if "num_samples" in own_generation else "generation.num_samples"
    if samples > 1 and not generation["do_sample"]:  # transformers refuses, once the model has loaded
        raise RecipeError(
            f"set {name!r} draws {samples} samples per prompt ({samples_key}) with greedy decoding "
            f"(do_sample: false), which gives one completion per prompt: set do_sample: true for sampled "
            f"completions, or num_samples: 1"
        )
    for key, metric in (("pass_at", "pass@k"), ("maj_at", "maj@k")):
        for k in metrics[key] or []:
            if k < 1:
                raise RecipeError(f"{where(key)} asks for {metric} with k={k}; k must be at least 1")
            if k > samples:
                elsewhere = "" if key in own else f", or ask for it only on sets that sample (sets.<set>.metrics.{key})"
                raise RecipeError(
                    f"{where(key)} asks for {metric} with k={k} on set {name!r}, which draws {samples} sample(s) per "
                    f"prompt ({samples_key}); {metric} needs k <= num_samples: raise {samples_key} to {k} or more "
                    f"(with do_sample: true), or drop k={k}{elsewhere}"
                )
    if not 0.0 < metrics["confidence"] < 1.0:
        raise RecipeError(f"{where('confidence')} must be in (0, 1) (e.g. 0.95), got {metrics['confidence']}")
    if metrics["interval"] == "bootstrap" and metrics["resamples"] < 1:
        raise RecipeError(
            f"{where('resamples')} must be at least 1 for the bootstrap (e.g. 1000), got {metrics['resamples']}"
        )
    if metrics["maj_at"]:
        _check_verifier_votes(cfg, where("maj_at"))


def _check_verifier_votes(cfg: dict, where: str) -> None:
    """maj@k votes with the answers the verifier (the first reward) parses: a built-in without `parse` cannot.
    A user function (`fn:`) is checked when it is imported, by the eval job."""
    rewards = cfg.get("rewards") or []
    if not rewards or not rewards[0].get("name"):
        return

    name = rewards[0]["name"]
    if name in REWARDS and not hasattr(REWARDS.get(name).fn, "parse"):
        voters = sorted(v.name for v in REWARDS if hasattr(v.fn, "parse"))
        raise RecipeError(
            f"{where} needs a verifier that extracts answers to vote with, but the first reward, "
            f"{rewards[0]['name']!r}, extracts none; put one of {', '.join(voters)} first under rewards:"
        )


def _check_models(models: Any, origins: dict[str, str]) -> None:
    if models is None:
        return
    where = f"'models' (from {origin_of(origins, 'models')})"
    refs = list(models.values()) if isinstance(models, dict) else list(models)
    if not refs:
        raise RecipeError(f"{where} is empty: list the models to compare, or leave it out to evaluate `model:`")
    bad = [ref for ref in refs if not isinstance(ref, str) or not ref]
    if bad:
        raise RecipeError(f"{where}: every model must be a reference (a run directory, local folder, hub id or "
                          f"'tiny'), got {bad[0]!r}")
    if isinstance(models, list):
        repeated = sorted({ref for ref in refs if refs.count(ref) > 1})
        if repeated:
            raise RecipeError(f"{where} lists {repeated[0]!r} twice; each model's results go under its own name")
