"""What the recipe catalog needs from the jobs: the fields a recipe leaves to others, down to the trainer's TRL
config (`postrain recipes --inherited`), and the liveness of every recipe, loaded as its command loads it
(`postrain recipes --check`). The listing itself reads the recipe files only (postrain.recipes.catalog)."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

from postrain.errors import PostrainError, origin_of
from postrain.jobs.liveness import LOG, check_liveness
from postrain.jobs.loading import load_recipe
from postrain.preference import PREFERENCE
from postrain.recipes.catalog import list_recipes
from postrain.recipes.loader import BUILTIN, COMMAND_LINE, recipes_root
from postrain.recipes.schema import RECIPE_SCHEMAS
from postrain.registry import FAMILIES
from postrain.rl.section import LIST_PARTS, SINGLE_PARTS, normalize_part
from postrain.trainers import config_class


def _leaves(data: Any, prefix: str = ""):
    """(dotted key, value) of every leaf of a resolved recipe; lists are leaves, as a layer replaces them whole."""
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif prefix:
        yield prefix, data


def _shown(path: str) -> str:
    root = recipes_root()
    try:
        return str(Path(path).resolve().relative_to(root.resolve().parent))
    except (ValueError, OSError):
        return str(path)


def inherited_fields(recipe) -> list[dict]:
    """Every field a resolved recipe does not set itself, with its value and where it comes from:
    `base recipe` (a file of its `defaults:` chain), `method` (a named method's expansion), `postrain default`
    (the command's built-in defaults, postrain/recipes/schema.py), `entry default` (a registry entry's paper default
    for a hyperparameter its `rl:` part or `loss:` entry leaves out), `library default` (a field of the trainer's
    TRL config, or of peft's LoraConfig, that nothing sets: the installed library's default)."""
    own = str(recipe.path) if recipe.path else None
    rows = []
    for key, value in _leaves(recipe.cfg):
        origin = origin_of(recipe.origins, key)
        if origin in (own, COMMAND_LINE) or origin.startswith("--smoke"):
            continue
        if origin == BUILTIN:
            source, where = "postrain default", "postrain/recipes/schema.py"
        elif origin.startswith("method "):
            source, where = "method", origin
        else:
            source, where = "base recipe", _shown(origin)
        rows.append({"key": key, "value": value, "source": source, "from": where})
    rows += _entry_defaults(recipe)
    rows += _library_defaults(recipe)
    return rows


def _entry_defaults(recipe) -> list[dict]:
    """Hyperparameters of the recipe's rl: parts / loss: entries left at the registry entry's paper default."""
    cfg, rows = recipe.cfg, []

    def add(key: str, variant, given: dict) -> None:
        for param, default in variant.params.items():
            if param not in given and not (variant.family == "sampler" and param == "batch_groups"):
                rows.append({"key": f"{key}.{param}", "value": default, "source": "entry default",
                             "from": f"{FAMILIES[variant.family].what} {variant.name!r} (postrain/registry)"})

    if recipe.command == "grpo" and isinstance(cfg.get("rl"), dict):
        for key, registry in SINGLE_PARTS.items():
            if cfg["rl"].get(key) is not None:
                spec = normalize_part(cfg["rl"][key], f"rl.{key}")
                add(f"rl.{key}", registry.get(spec.pop("name")), spec)
        for key, registry in LIST_PARTS.items():
            for i, value in enumerate(cfg["rl"].get(key) or []):
                spec = normalize_part(value, f"rl.{key}[{i}]")
                add(f"rl.{key}[{i}]", registry.get(spec.pop("name")), spec)
    if recipe.command == "dpo" and cfg.get("loss"):
        for i, entry in enumerate(cfg["loss"]):
            if isinstance(entry, dict) and entry.get("name") in PREFERENCE:
                add(f"loss[{i}]", PREFERENCE.entries[entry["name"]], entry)
    return rows


# Trainer fields postrain's jobs fill in themselves (postrain.jobs.common.trainer_config), not left to TRL.
JOB_FILLED = {"output_dir": "<output_dir>/checkpoints", "seed": "the recipe's seed",
              "bf16": "true where a bf16 GPU is available", "report_to": "'none' unless the recipe sets it"}


def _library_defaults(recipe) -> list[dict]:
    """Fields of the trainer's TRL config (and peft's LoraConfig, where the recipe has `peft:`) that nothing sets."""
    rows = []
    for spec in dataclasses.fields(RECIPE_SCHEMAS[recipe.command]):
        section = recipe.cfg.get(spec.name)
        meta = spec.metadata
        if "trainer_config" in meta:
            cls = config_class(meta["trainer_config"])
        elif "peft" in meta and section is not None:
            import peft  # slow: peft, needed only when this runs

            cls = getattr(peft, meta["peft"])
        else:
            continue
        set_here = section or {}
        for field in dataclasses.fields(cls):
            if not field.init or field.name in set_here or field.name.startswith("_") or \
                    (spec.name == "trainer" and field.name in JOB_FILLED):
                continue
            default = field.default if field.default is not dataclasses.MISSING else (
                field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
            # the library class the default comes from (postrain's own config subclasses add a field or two)
            owner = next((c for c in cls.__mro__ if not c.__module__.startswith("postrain")
                          and field.name in getattr(c, "__dataclass_fields__", {})), cls)
            ours = owner.__module__.startswith("postrain")
            rows.append({"key": f"{spec.name}.{field.name}", "value": default,
                         "source": "postrain default" if ours else "library default",
                         "from": f"{owner.__module__.split('.')[0]} {owner.__name__}"})
    return rows


# --- liveness of every recipe: `postrain recipes --check` ---------------------------------------------------------

def header(path: Path) -> str:
    """A recipe file's leading comment block (where a paper recipe says what it is and how it differs)."""
    lines = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def documented(finding, *paths) -> bool:
    """Whether a recipe's header explains an inert step: a `liveness:` note naming the part, e.g.
    `#   - liveness: disco's KL constraint is inert: ...` (the part is the quoted name in the finding)."""
    part = finding.part.split("'")[1] if "'" in finding.part else finding.part
    return any(re.search(rf"liveness\b.*\b{re.escape(part)}\b", header(p), re.S) for p in paths if p)


def check_recipes(root: Path | None = None, papers: bool = False, stage_loader=None) -> list[dict]:
    """Load every recipe under `root` (recipes/) and report what liveness finds (postrain.jobs.liveness): one row
    per recipe, or per stage of a pipeline (loaded by `stage_loader(pipeline, name, stage)`, the pipeline job's own
    loading, with the stage's overrides). `findings` are the inert steps the recipe does not explain, `documented`
    those its header explains (`documented`); a recipe that does not load is reported with its error. `base/`
    holds layers for other recipes' `defaults:`, not recipes to run, and is left out."""
    listed = {r["path"]: r for r in list_recipes(root)}
    root = Path(root) if root else recipes_root()
    rows = []
    level = LOG.level
    LOG.setLevel(logging.ERROR)  # the findings are this listing's, not warnings of each load
    try:
        for path in sorted(root.rglob("*.yaml")):
            shown = str(path.relative_to(root.parent)) if root.parent in path.parents else str(path)
            if path.relative_to(root).parts[0] == "base":
                continue
            if papers and not listed.get(shown, {}).get("paper"):
                continue
            row = {"path": shown, "stage": None, "findings": [], "documented": [], "error": None}

            def split(found, *paths) -> dict:
                return {"findings": [f.message for f in found if not documented(f, *paths)],
                        "documented": [f.message for f in found if documented(f, *paths)]}

            try:
                recipe = load_recipe(path, liveness=False)
            except PostrainError as e:
                rows.append({**row, "error": str(e)})
                continue
            if recipe.command == "pipeline" and stage_loader is not None:
                for name, stage in (recipe.cfg.get("stages") or {}).items():
                    srow = {**row, "stage": name}
                    try:
                        loaded = stage_loader(recipe, name, stage)
                    except PostrainError as e:
                        rows.append({**srow, "error": str(e)})
                        continue
                    found = check_liveness(loaded.command, loaded.cfg, loaded.origins)
                    rows.append({**srow, **split(found, path, loaded.path)})
                continue
            found = check_liveness(recipe.command, recipe.cfg, recipe.origins)
            rows.append({**row, **split(found, path)})
    finally:
        LOG.setLevel(level)
    return rows
