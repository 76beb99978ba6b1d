"""`postrain recipes`: what recipes ship, what each runs, and which paper it reproduces."""

from __future__ import annotations

from pathlib import Path

import yaml

from postrain.errors import RecipeError
from postrain.recipes.loader import _YamlLoader, find_recipe, recipes_root


def _declared(path: Path, key: str, seen: int = 0):
    """A top-level key as the recipe or, failing that, its `defaults:` chain declares it."""
    try:
        data = yaml.load(path.read_text(), Loader=_YamlLoader) or {}
    except (OSError, yaml.YAMLError):
        return None
    if key in data or seen > 8:
        return data.get(key)
    defaults = data.get("defaults") or []
    for ref in [defaults] if isinstance(defaults, str) else defaults:
        try:
            parent = find_recipe(str(ref), path.parent)  # the loader's own resolution, so listing matches loading
        except RecipeError:
            continue
        found = _declared(parent, key, seen + 1)
        if found is not None:
            return found
    return None


def list_recipes(root: Path | None = None) -> list[dict]:
    root = Path(root) if root else recipes_root()
    rows = []
    for path in sorted(root.rglob("*.yaml")):
        paper = _declared(path, "paper")
        rows.append(
            {
                "path": str(path.relative_to(root.parent)) if root.parent in path.parents else str(path),
                "command": _declared(path, "command"),
                "paper": (paper or {}).get("title") if isinstance(paper, dict) else None,
                "arxiv": (paper or {}).get("arxiv") if isinstance(paper, dict) else None,
                "description": _declared(path, "description"),
            }
        )
    return rows
