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
