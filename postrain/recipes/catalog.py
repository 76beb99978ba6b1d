"""`postrain recipes`: what recipes ship, what each runs, and which paper it reproduces."""

from __future__ import annotations

from pathlib import Path

import yaml

from postrain.recipes.loader import _YamlLoader, recipes_root


def _declared(path: Path, key: str, seen: int = 0):
    """A top-level key as the recipe or, failing that, its `defaults:` chain declares it."""
    try:
        data = yaml.load(path.read_text(), Loader=_YamlLoader) or {}
    except (OSError, yaml.YAMLError):
        return None
    if key in data or seen > 8:
        return data.get(key)
    for ref in data.get("defaults") or []:
        for cand in (path.parent / ref, path.parent / f"{ref}.yaml", recipes_root() / ref, recipes_root() / f"{ref}.yaml"):
            if cand.is_file():
                found = _declared(cand, key, seen + 1)
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
