"""The layers of postrain, read from the source: cli -> jobs -> trainers -> registries -> models, tensors, errors.

Every import of one postrain package by another (at module level or inside a function: both are arrows) must
point to a lower layer. The arrows that point up or sideways today are listed in KNOWN_ARROWS, one per importing
module and imported package: issue 19 removes them one by one. A new arrow fails here; so does a listed one that
is gone (take it off the list, so it cannot come back unnoticed).
"""

from __future__ import annotations

import ast
from pathlib import Path

POSTRAIN = Path(__file__).resolve().parent.parent / "postrain"

# Lowest first. A module may import its own package and packages of a lower layer.
LAYERS = [
    {"errors"},
    {"value_types", "tensors"},
    {"models", "registry"},                                  # the Registry mechanism; models and their loading
    {"preference", "rl", "rewards", "data", "merging", "evaluation"},  # the registries and libraries
    {"recipes"},                                             # the recipe vocabulary, loading and checks
    {"trainers", "launch", "reports"},
    {"jobs", "coverage"},
    {"cli", "registry_docs"},
]
LAYER = {package: i for i, layer in enumerate(LAYERS) for package in layer}

# module -> the packages it imports against the layering, today (2026-12-07).
KNOWN_ARROWS = {
    "postrain/evaluation/lm_eval_backend.py": {"recipes"},
    "postrain/evaluation/settings.py": {"rewards"},
    "postrain/models/loading.py": {"recipes"},
    "postrain/registry.py": {"preference", "rl"},
    "postrain/reports/model_card.py": {"jobs", "trainers"},
    "postrain/reports/report.py": {"jobs"},
    "postrain/reports/rundir.py": {"jobs"},
}


def package_of(module: str) -> str:
    """'postrain.jobs.common' -> 'jobs'; 'postrain.errors' -> 'errors'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imported_modules(path: Path) -> set[str]:
    module = ".".join(path.relative_to(POSTRAIN.parent).with_suffix("").parts)
    package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the importing module's package, `level - 1` packages up
                base = package_parts[:len(package_parts) - (node.level - 1)]
                names.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.add(node.module)
    return {name for name in names if name.split(".")[0] == "postrain" and "." in name}


def arrows_against_the_layers() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted(POSTRAIN.rglob("*.py")):
        own = package_of(".".join(path.relative_to(POSTRAIN.parent).with_suffix("").parts))
        for target in map(package_of, imported_modules(path)):
            if target != own and LAYER[target] >= LAYER[own]:
                found.setdefault(str(path.relative_to(POSTRAIN.parent)), set()).add(target)
    return found


def test_every_package_has_a_layer():
    packages = {p.stem if p.is_file() else p.name for p in POSTRAIN.iterdir()
                if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())}
    assert packages == set(LAYER), f"give each package a layer: {sorted(packages ^ set(LAYER))}"


def test_imports_point_down_the_layers_except_the_known_arrows():
    found = arrows_against_the_layers()
    new = {m: sorted(t - KNOWN_ARROWS.get(m, set())) for m, t in found.items() if t - KNOWN_ARROWS.get(m, set())}
    gone = {m: sorted(t - found.get(m, set())) for m, t in KNOWN_ARROWS.items() if t - found.get(m, set())}
    assert not new, f"imports against the layering (cli -> jobs -> trainers -> recipes -> registries -> models): {new}"
    assert not gone, f"these arrows are gone: take them off KNOWN_ARROWS: {gone}"


def test_the_checker_sees_a_function_level_import_and_a_relative_one(tmp_path, monkeypatch):
    """The checker itself: an import inside a function counts, and `from ..jobs import x` resolves to jobs."""
    fake = tmp_path / "postrain"
    (fake / "rl").mkdir(parents=True)
    (fake / "jobs").mkdir()
    for init in (fake / "__init__.py", fake / "rl" / "__init__.py", fake / "jobs" / "__init__.py"):
        init.write_text("")
    (fake / "rl" / "a.py").write_text("def f():\n    from postrain.jobs import common\n")
    (fake / "rl" / "b.py").write_text("from ..jobs import common\nfrom . import a\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "POSTRAIN", fake)
    assert arrows_against_the_layers() == {"postrain/rl/a.py": {"jobs"}, "postrain/rl/b.py": {"jobs"}}


def test_no_private_name_is_imported_across_modules():
    """A name with a leading underscore is its module's own; another module that needs it gets a public name."""
    private = []
    for path in sorted(POSTRAIN.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("postrain")):
                private += [f"{path.relative_to(POSTRAIN.parent)}: {alias.name} from {node.module}"
                            for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not private, private
