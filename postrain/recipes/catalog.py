"""`postrain recipes`: what recipes ship, what each runs, and which paper it reproduces."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

from postrain.errors import RecipeError
from postrain.recipes.loader import YamlLoader, find_recipe, recipes_root


def _declared(path: Path, key: str, parsed: dict[Path, dict], seen: int = 0):
    """A key (dotted for nested ones: `model.name_or_path`) as the recipe or, failing that, its `defaults:` chain
    declares it. `parsed` holds the files read so far (a listing reads each base recipe many times)."""
    if path not in parsed:
        try:
            data = yaml.load(path.read_text(), Loader=YamlLoader)
        except (OSError, yaml.YAMLError):
            data = None
        parsed[path] = data if isinstance(data, dict) else {}
    data = parsed[path]
    found = _lookup(data, key)
    if found is not None or seen > 8:
        return found
    defaults = data.get("defaults") or []
    for ref in [defaults] if isinstance(defaults, str) else defaults:
        try:
            parent = find_recipe(str(ref), path.parent)  # the loader's own resolution, so listing matches loading
        except RecipeError:
            continue
        found = _declared(parent, key, parsed, seen + 1)
        if found is not None:
            return found
    return None


def _lookup(data: Any, dotted: str):
    for part in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def entry_name(entry: Any) -> str:
    """`simpo` or `{name: simpo, ...}` -> `simpo`."""
    return str(entry.get("name")) if isinstance(entry, dict) else str(entry)


def describe_method(command: str | None, method: Any = None, rl: Any = None, loss: Any = None,
                    trainer: dict | None = None, merge: dict | None = None) -> str:
    """What a recipe trains with, in one line: `dapo; rl: shaping=dapo_overlong`, `simpo + dpo_nll x0.5`,
    `TRL loss_type sigmoid`. Works on a recipe file's own keys and on a resolved recipe alike."""
    trainer = trainer or {}
    parts = []
    if method:
        parts.append(entry_name(method))
    if isinstance(rl, dict) and rl:
        names = []
        for key, value in rl.items():
            if isinstance(value, dict) and "name" not in value:  # parameters merged into the method's part
                names += [f"{key}.{k}={v}" for k, v in value.items()]
            elif value not in (None, []):
                values = value if isinstance(value, list) else [value]
                names.append(f"{key}={'+'.join(entry_name(v) for v in values)}")
        parts.append("rl: " + ", ".join(names) if names else "rl: TRL defaults")
    if isinstance(loss, list) and loss:
        parts.append(" + ".join(entry_name(e) + ("" if not isinstance(e, dict) or e.get("weight", 1) == 1
                                                  else f" x{e['weight']}") for e in loss))
    if parts:
        return "; ".join(parts)
    if command in ("dpo", "grpo"):
        loss_type = trainer.get("loss_type")
        if loss_type:
            types = loss_type if isinstance(loss_type, list) else [loss_type]
            return f"TRL loss_type {'+'.join(map(str, types))}"
        return f"TRL {command} defaults"
    if command == "merge" and isinstance(merge, dict) and merge.get("merge_method"):
        return f"merge {merge['merge_method']}"
    return command or ""


def list_recipes(root: Path | None = None) -> list[dict]:
    root = Path(root) if root else recipes_root()
    rows = []
    parsed: dict[Path, dict] = {}
    for path in sorted(root.rglob("*.yaml")):
        declared = functools.partial(_declared, path, parsed=parsed)
        paper = declared("paper")
        command = declared("command")
        rows.append(
            {
                "path": str(path.relative_to(root.parent)) if root.parent in path.parents else str(path),
                "command": command,
                "method": describe_method(command, declared("method"), declared("rl"), declared("loss"),
                                          {"loss_type": declared("trainer.loss_type")},
                                          {"merge_method": declared("merge.merge_method")}),
                "model": declared("model.name_or_path"),
                "paper": (paper or {}).get("title") if isinstance(paper, dict) else None,
                "arxiv": (paper or {}).get("arxiv") if isinstance(paper, dict) else None,
                "description": declared("description"),
            }
        )
    return rows


# --- what a recipe leaves to others: `postrain recipes --inherited RECIPE` ---------------------------------------

def resolve_recipe(ref: str) -> Path:
    """A recipe named as a path, a name under recipes/, or a paper recipe's name (`lite_ppo`: recipes/papers/)."""
    try:
        return find_recipe(ref, None)
    except RecipeError:
        try:
            return find_recipe(ref, recipes_root() / "papers")
        except RecipeError:
            raise RecipeError(f"recipe '{ref}' not found (looked in {Path.cwd()}, {recipes_root()} and "
                              f"{recipes_root() / 'papers'})") from None


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
    from postrain.recipes.loader import BUILTIN, COMMAND_LINE
    from postrain.recipes.validate import origin_of

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
    from postrain.registry import FAMILIES

    cfg, rows = recipe.cfg, []

    def add(key: str, variant, given: dict) -> None:
        for param, default in variant.params.items():
            if param not in given and not (variant.family == "sampler" and param == "batch_groups"):
                rows.append({"key": f"{key}.{param}", "value": default, "source": "entry default",
                             "from": f"{FAMILIES[variant.family].what} {variant.name!r} (postrain/registry)"})

    if recipe.command == "grpo" and isinstance(cfg.get("rl"), dict):
        from postrain.rl.section import LIST_PARTS, SINGLE_PARTS, normalize_part

        for key, registry in SINGLE_PARTS.items():
            if cfg["rl"].get(key) is not None:
                spec = normalize_part(cfg["rl"][key], f"rl.{key}")
                add(f"rl.{key}", registry.get(spec.pop("name")), spec)
        for key, registry in LIST_PARTS.items():
            for i, value in enumerate(cfg["rl"].get(key) or []):
                spec = normalize_part(value, f"rl.{key}[{i}]")
                add(f"rl.{key}[{i}]", registry.get(spec.pop("name")), spec)
    if recipe.command == "dpo" and cfg.get("loss"):
        from postrain.preference import PREFERENCE

        for i, entry in enumerate(cfg["loss"]):
            if isinstance(entry, dict) and entry.get("name") in PREFERENCE:
                add(f"loss[{i}]", PREFERENCE.entries[entry["name"]], entry)
    return rows


# Trainer fields postrain's jobs fill in themselves (postrain.jobs.common.trainer_config), not left to TRL.
JOB_FILLED = {"output_dir": "<output_dir>/checkpoints", "seed": "the recipe's seed",
              "bf16": "true where a bf16 GPU is available", "report_to": "'none' unless the recipe sets it"}


def _library_defaults(recipe) -> list[dict]:
    """Fields of the trainer's TRL config (and peft's LoraConfig, where the recipe has `peft:`) that nothing sets."""
    import dataclasses

    from postrain.recipes.schema import RECIPE_SCHEMAS

    rows = []
    for spec in dataclasses.fields(RECIPE_SCHEMAS[recipe.command]):
        section = recipe.cfg.get(spec.name)
        meta = spec.metadata
        if "trainer_config" in meta:
            from postrain.trainers import config_class

            cls = config_class(meta["trainer_config"])
        elif "peft" in meta and section is not None:
            import peft

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
    import re

    part = finding.part.split("'")[1] if "'" in finding.part else finding.part
    return any(re.search(rf"liveness\b.*\b{re.escape(part)}\b", header(p), re.S) for p in paths if p)


def check_recipes(root: Path | None = None, papers: bool = False, stage_loader=None) -> list[dict]:
    """Load every recipe under `root` (recipes/) and report what liveness finds (postrain.recipes.liveness): one row
    per recipe, or per stage of a pipeline (loaded by `stage_loader(pipeline, name, stage)`, the pipeline job's own
    loading, with the stage's overrides). `findings` are the inert steps the recipe does not explain, `documented`
    those its header explains (`documented`); a recipe that does not load is reported with its error. `base/`
    holds layers for other recipes' `defaults:`, not recipes to run, and is left out."""
    import logging

    from postrain.errors import PostrainError
    from postrain.recipes.liveness import LOG, check_liveness
    from postrain.recipes.loader import load_recipe

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
